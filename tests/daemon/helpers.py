"""A policy, curated file and daemon settings for the tiny test model's vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

POLICY = """
version: test-1
backend: fake  # the registered in-memory backend (kmd.editors.fake)
relations:
  capital:
    prompt: "the capital of {subject} is"
    paraphrases: ["{subject} has the capital"]
  language:
    prompt: "the language of {subject} is"
sources:
  - id: curated
    kind: jsonl
    location: {jsonl}
    trust: high
    relations: [capital, language]
    poll_interval: 1h
verification:
  quorum: 2
  single_source_trust: high
probes:
  min_served_rel: {min_served_rel}   # the tiny random model writes word salad after the target
  min_served_gen: {min_served_gen}
  min_rel: 0.9
  min_gen: 0.0
  min_loc: {min_loc}
  earlier_edits_sample: 5
  min_earlier_rel: 0.9
  default_locality_suite: false
  locality_suites: [locality.jsonl]
"""


# Held-out prompts in the tiny model's vocabulary (the shipped suite is slow on CPU tests).
LOCALITY = [
    "the dog and the cat", "who wrote the book ?", "the sun and the moon", "Bob plays music",
    "the river of Japan", "Alice wrote a song", "the mother of Bob is", "red green blue",
    "one two three four", "the tree in the sky", "Carol painted the film", "Dave works for the team",
]


def write_curated(path: Path, sequence: int, facts: list[tuple[str, str, str]]) -> None:
    lines = [json.dumps({"kmd_jsonl": 1, "source": "curated", "sequence": sequence})]
    lines += [json.dumps({"subject": s, "relation": r, "object": o, "id": f"{s}-{r}-{sequence}"}) for s, r, o in facts]
    path.write_text("\n".join(lines) + "\n")


def write_setup(
    tmp: Path, facts: list[tuple[str, str, str]], *, min_loc: float = 0.9, api_port: int = 0, min_served_rel: float = 0.0,
    min_served_gen: float = 0.0,
) -> Path:
    suite = [p for p in LOCALITY]
    (tmp / "locality.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in suite))
    jsonl = tmp / "facts.jsonl"
    write_curated(jsonl, 1, facts)
    (tmp / "policy.yaml").write_text(POLICY.replace("{jsonl}", str(jsonl)).replace("{min_loc}", str(min_loc))
                                   .replace("{min_served_rel}", str(min_served_rel))
                                   .replace("{min_served_gen}", str(min_served_gen)))
    config = tmp / "kmd.yaml"
    config.write_text(
        f"policy: policy.yaml\nstate_dir: state\n"
        f"api: {{host: 127.0.0.1, port: {api_port}, token_env: KMD_TEST_TOKEN}}\n"
        f"schedule: {{edit_interval: 1s, regression_interval: 1h}}\n"
    )
    return config


def add_motto_relation(policy: Path, editor_options: str = "{fires_everywhere: true}") -> None:
    """Add a relation `motto` to the test policy whose edits are bad (the fake backend's
    fault injection, per relation as a policy would set it)."""
    text = policy.read_text().replace(
        "relations:\n", f"relations:\n  motto:\n    prompt: \"the motto of {{subject}} is\"\n    editor_options: {editor_options}\n", 1
    ).replace("relations: [capital, language]", "relations: [capital, language, motto]")
    policy.write_text(text)
