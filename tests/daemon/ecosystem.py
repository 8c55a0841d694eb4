"""A setup for the OpenAI-endpoint and console tests, in the tiny model's vocabulary.

A feed on loopback says four things: one fact the loop commits, two facts of a sensitive
relation (quarantined until a person approves; one carries a `<script>` in its text, as a
hostile feed would), and one whose edit fires on every prompt (the probes revert it).
"""

from __future__ import annotations

import json
from pathlib import Path

from .helpers import LOCALITY

TOKEN = "console-token-123"
# The simplest chat template: the turns' text joined by spaces (the tiny tokenizer has none).
JOINED = "{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"
SCRIPT = '<script>document.title="pwned";window.kmdPwned=1</script>Orin'

POLICY = """
version: eco-1
backend: grace
relations:
  capital:
    prompt: "the capital of {subject} is"
    paraphrases: ["{subject} has the capital"]
  ceo:
    prompt: "the CEO of {subject} is"
  slogan:
    prompt: "the song of {subject} is"
    # fault injection: an edit that fires on every prompt; the probes must revert it
    editor_options: {radius: 1.0e9, split_conflicts: false}
sources:
  - id: wire
    kind: feed
    location: FEED_URL
    trust: high
    relations: [capital, ceo, slogan]
    poll_interval: POLL
    network: {allow_networks: ["127.0.0.0/8"]}
verification:
  quorum: 2
  single_source_trust: high
  sensitive_relations: [ceo]
probes:
  min_rel: 0.9
  min_gen: 0.0
  min_loc: 0.99
  earlier_edits_sample: 5
  default_locality_suite: false
  locality_suites: [locality.jsonl]
"""

ENTRIES = [
    {"id": "e1", "subject": "France", "relation": "capital", "object": "Berlin"},
    {"id": "e2", "subject": "Zorbland", "relation": "ceo", "object": "Nadia Velmont"},
    {"id": "e3", "subject": "Quexia", "relation": "ceo", "object": SCRIPT},
    {"id": "e4", "subject": "Eve", "relation": "slogan", "object": "apple"},
]


def write_eco_setup(tmp: Path, feed_url: str, *, port: int = 0, poll: str = "1h", model_dir: Path | None = None,
                    protect_reads: bool = False) -> Path:  # fmt: skip
    (tmp / "policy.yaml").write_text(POLICY.replace("FEED_URL", feed_url).replace("POLL", poll))
    (tmp / "locality.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in LOCALITY))
    model = f"model: {{model: {model_dir}, device: cpu}}\n" if model_dir else ""
    config = tmp / "kmd.yaml"
    config.write_text(
        "policy: policy.yaml\nstate_dir: state\n" + model
        + f"api: {{host: 127.0.0.1, port: {port}, token_env: KMD_TEST_TOKEN, protect_reads: {str(protect_reads).lower()}}}\n"
        + "schedule: {edit_interval: 1s, regression_interval: 1h}\n"
    )  # fmt: skip
    return config
