"""`kmd bench-loop` on the tiny model: real cycles, figures taken from the ledger."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kmd.daemon.cli import app


@pytest.mark.slow  # ~20 s idle: three real cycles with the 337-prompt locality suite
def test_bench_loop_reports_entry_to_commit_times(tiny_model_dir, tmp_path):
    out = tmp_path / "loop.json"
    result = CliRunner().invoke(app, ["bench-loop", "--entries", "2", "--model", str(tiny_model_dir),
                                      "--workdir", str(tmp_path / "work"), "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    assert figures["backend"] == "llp" and figures["locality_prompts"] >= 300
    assert [row["entry"] for row in figures["entries"]] == [0, 1, 2] and figures["entries"][0]["warm_up"]
    for row in figures["entries"]:
        if row["status"] == "committed" and not row["warm_up"]:
            # the cycle includes the apply and the probes it reports
            assert row["entry_to_commit_s"] >= row["apply_s"] + row["probe_s"] > 0
