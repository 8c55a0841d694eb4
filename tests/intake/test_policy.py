from __future__ import annotations

import pytest
from pydantic import ValidationError

from kmd.daemon.policy import PolicyError, example_policy_path, load_policy, parse_policy
from intake.helpers import BASE_POLICY

SOURCES = """\
sources:
  - id: wire
    kind: feed
    location: https://wire.example.net/rss.xml
    trust: medium
    relations: [capital]
"""


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, name="p.yaml")
    return [str(p) for p in info.value.problems]


def test_example_policy_loads_and_is_pinned_by_digest():
    policy = load_policy(example_policy_path())
    assert policy.backend == "recipe"
    assert policy.version_tag.startswith("example-1@") and len(policy.digest) == 64
    wire = policy.source("wire")
    assert wire.limits is not None and wire.limits.connect_timeout == 3.0 and wire.poll_interval == 1800.0
    assert policy.source("gazette").rate_limit.per == 3600.0
    assert policy.is_sensitive("head_of_state") and not policy.is_sensitive("capital")
    assert str(policy.source("intranet-mirror").network.allow_networks[0]) == "10.20.0.0/24"
    assert policy.source("curated").public_keys[0] and len(policy.source("curated").public_keys[0]) == 32


def test_policy_is_frozen():
    policy = parse_policy(BASE_POLICY + SOURCES)
    with pytest.raises(ValidationError):
        policy.backend = "other"  # type: ignore[misc]


def test_unknown_key_names_file_line_and_key():
    text = BASE_POLICY + SOURCES + "    colour: red\n"
    assert problems(text) == [f"p.yaml:{text.count(chr(10))}: sources[0].colour: unknown key"]


def test_bad_value_names_line_key_and_value():
    text = BASE_POLICY + SOURCES.replace("trust: medium", "trust: hgh")
    line = text.splitlines().index("    trust: hgh") + 1
    (problem,) = problems(text)
    assert problem.startswith(f"p.yaml:{line}: sources[0].trust: ") and "'hgh'" in problem


def test_every_problem_is_reported():
    text = BASE_POLICY.replace("quorum: 2", "quorum: 0").replace("similarity_threshold: 0.85", "similarity_threshold: 2")
    text += SOURCES.replace("poll_interval", "x").replace("trust: medium", "trust: medium\n    poll_interval: often")
    found = problems(text)
    assert any("verification.quorum" in p for p in found)
    assert any("verification.similarity_threshold" in p for p in found)
    assert any("sources[0].poll_interval" in p and "duration" in p for p in found)


def test_missing_key_points_at_its_parent():
    text = BASE_POLICY + SOURCES.replace("    trust: medium\n", "")
    (problem,) = problems(text)
    assert "sources[0].trust: Field required" in problem
    assert problem.startswith(f"p.yaml:{text.splitlines().index('  - id: wire') + 1}:")


def test_duplicate_keys_are_errors():
    text = BASE_POLICY + SOURCES + "    trust: high\n"
    (problem,) = problems(text)
    assert "sources[0].trust: duplicate key" in problem


def test_references_are_checked_with_their_location():
    text = BASE_POLICY + SOURCES.replace("relations: [capital]", "relations: [capital, cto]")
    (problem,) = problems(text)
    assert "sources[0].relations[1]" in problem and "unknown relation 'cto'" in problem
    assert problem.startswith(f"p.yaml:{text.splitlines().index('    relations: [capital, cto]') + 1}:")


def test_duplicate_source_ids():
    text = BASE_POLICY + SOURCES + SOURCES.replace("sources:\n", "")
    assert any("sources[1].id" in p and "duplicate source id" in p for p in problems(text))


def _cases():
    return [
        (BASE_POLICY.replace("{subject} is\"\n    paraphrases", "{country} is\"\n    paraphrases") + SOURCES,
         "must contain '{subject}'"),
        (BASE_POLICY + SOURCES.replace("https://wire.example.net/rss.xml", "file:///etc/passwd"), "http:// or https://"),
        (BASE_POLICY + SOURCES + "    extract:\n      - pattern: '(?P<subject>.+)'\n        relation: capital",
         "named groups"),
        (BASE_POLICY + SOURCES + "    extract:\n      - pattern: '(?P<subject>'\n        relation: capital",
         "invalid regular expression"),
        (BASE_POLICY + SOURCES + "    network: {allow_networks: [10.0.0.1/8]}", "CIDR"),
        (BASE_POLICY + SOURCES + "    require_signature: true", "jsonl sources only"),
        (BASE_POLICY + SOURCES.replace("kind: feed", "kind: jsonl") + "    require_signature: true",
         "at least one pinned key"),
        (BASE_POLICY + SOURCES.replace("kind: feed", "kind: jsonl") + "    signing_keys: ['ed25519:AAAA']", "32 bytes"),
        (BASE_POLICY + SOURCES.replace("id: wire", "id: Wire Feed"), "source id"),
        (BASE_POLICY.replace("single_source_trust: high", "single_source_trust: low") + SOURCES, "single_source_trust"),
    ]  # fmt: skip


@pytest.mark.parametrize(("text", "expect"), _cases())
def test_bad_values_are_refused_with_a_reason(text, expect):
    found = problems(text)
    assert any(expect in p for p in found), found
    assert all(p.startswith("p.yaml:") for p in found)


def test_yaml_syntax_error_has_a_line():
    (problem,) = problems("version: x\nbackend: [unclosed\n")
    assert problem.startswith("p.yaml:") and "YAML syntax" in problem


def test_durations_and_file_errors(tmp_path):
    policy = parse_policy(BASE_POLICY + SOURCES + "    poll_interval: 90s\n    rate_limit: {max_claims: 5, per: 2h}\n")
    assert policy.sources[0].poll_interval == 90.0 and policy.sources[0].rate_limit.per == 7200.0
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE_POLICY + SOURCES + "    trust: hgh\n")
    with pytest.raises(PolicyError, match=str(bad)):
        load_policy(bad)


def test_the_generic_yaml_loader_serves_other_config_files(tmp_path):
    from kmd.common.config import ConfigError, Duration, StrictModel, load_yaml_model

    class Schedule(StrictModel):
        every: Duration = 60.0

    class Settings(StrictModel):
        name: str
        schedule: Schedule = Schedule()

    path = tmp_path / "settings.yaml"
    path.write_text("name: x\nschedule:\n  every: 2m\n")
    assert load_yaml_model(path, Settings).schedule.every == 120.0
    path.write_text("name: x\nschedule:\n  every: soon\n  colour: red\n")
    with pytest.raises(ConfigError) as info:
        load_yaml_model(path, Settings)
    assert str(info.value).startswith("invalid configuration:")
    assert [(p.line, p.key) for p in info.value.problems] == [(3, "schedule.every"), (4, "schedule.colour")]
