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


@pytest.mark.slow  # a warm-up edit and a batch of four, with the 337-prompt locality suite
def test_bench_loop_burst_reports_the_time_to_all_committed(tiny_model_dir, tmp_path):
    out = tmp_path / "burst.json"
    result = CliRunner().invoke(app, ["bench-loop", "--burst", "4", "--model", str(tiny_model_dir),
                                      "--workdir", str(tmp_path / "work"), "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    burst = figures["burst"]
    assert [row["entry"] for row in figures["entries"]] == [0] and figures["edit_batch"] == 50
    assert burst["entries"] == 4 and burst["committed"] + burst["reverted"] + burst["skipped"] == 4
    if burst["committed"]:
        assert burst["seconds"] > 0 and burst["batches"][0]["size"] >= 2


@pytest.mark.slow  # three phases of HTTP requests and an edit loop with the 337-prompt suite
def test_bench_serve_reports_throughput_and_latency(tiny_model_dir, tmp_path):
    out = tmp_path / "serve.json"
    result = CliRunner().invoke(app, ["bench-serve", "--clients", "4", "--requests", "12", "--serial-requests", "4",
                                      "--max-new-tokens", "4", "--model", str(tiny_model_dir),
                                      "--workdir", str(tmp_path / "work"), "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    phases = figures["phases"]
    assert set(phases) == {"serial", "idle", "during_edits"}
    assert all(p["failed"] == 0 and p["requests_per_s"] > 0 for p in phases.values())
    assert phases["during_edits"]["stale_answers"] == 0
