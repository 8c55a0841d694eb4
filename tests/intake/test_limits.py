"""Bounded inputs for config files (issue 16, finding 5): a 324-byte YAML alias bomb hung
`kmd intake check-policy`, and a 50 MB policy file was accepted."""

from __future__ import annotations

import threading
import time

import pytest
from typer.testing import CliRunner

from intake.helpers import BASE_POLICY
from kmd.daemon.policy import PolicyError, load_policy, parse_policy

SOURCES = """\
sources:
  - id: wire
    kind: feed
    location: https://wire.example.net/rss.xml
    trust: medium
    relations: [capital]
"""

BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def _within(seconds: float, fn):
    """Run fn in a thread; fail (instead of hanging the suite) if it takes longer."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return box, time.monotonic() - started


def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    box, took = _within(10, lambda: load_policy(path))
    assert isinstance(box.get("error"), PolicyError), box
    assert "aliases are not allowed" in str(box["error"]) and took < 2
    result = CliRunner().invoke(__import__("kmd.daemon.cli", fromlist=["app"]).app, ["intake", "check-policy", str(path)])
    assert result.exit_code == 1 and "aliases are not allowed" in result.output


def test_a_single_alias_is_refused_with_its_line():
    text = BASE_POLICY + SOURCES + "fetch: &limits {max_entries: 5}\nprobes: *limits\n"
    with pytest.raises(PolicyError) as info:
        parse_policy(text, name="p.yaml")
    (problem,) = info.value.problems
    assert problem.line == text.count("\n") and "*limits" in problem.message


def test_oversized_policy_file_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(BASE_POLICY + SOURCES + ("# padding\n" * 200_000))  # 2 MB of comments
    with pytest.raises(PolicyError, match="byte cap"):
        load_policy(path)


def test_deep_nesting_is_refused():
    with pytest.raises(PolicyError, match="nested deeper"):
        parse_policy("version: " + "[" * 5000 + "]" * 5000 + "\n")
