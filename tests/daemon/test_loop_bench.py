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
    result = CliRunner().invoke(app, ["bench-loop", "--burst", "4", "--subjects", "distinct", "--model", str(tiny_model_dir),
                                      "--workdir", str(tmp_path / "work"), "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    burst = figures["burst"]
    assert [row["entry"] for row in figures["entries"]] == [0] and figures["edit_batch"] == 50
    assert figures["subjects"] == "distinct"
    assert burst["entries"] == 4 and burst["committed"] + burst["reverted"] + burst["skipped"] == 4
    if burst["committed"]:
        assert burst["seconds"] > 0 and burst["batches"][0]["size"] >= 2


def test_distinct_burst_subjects_share_no_name_and_neighbours_share_no_part():
    from kmd.daemon.bench.loop import MAX_BURST, _fact

    facts = [_fact(i, "distinct") for i in range(MAX_BURST + 1)]
    assert len({company for company, _ in facts}) == len({person for _, person in facts}) == MAX_BURST + 1
    for (a, p), (b, q) in zip(facts, facts[1:]):
        assert not set(a.split()) & set(b.split()) and not set(p.split()) & set(q.split()), (a, b, p, q)
    heads = {}
    for company, _ in facts:  # the companies of one name head are in different trades
        heads.setdefault(company[:3], []).append(company.split()[1])
    assert all(len(set(trades)) == len(trades) for trades in heads.values()), heads
    alike = [_fact(i) for i in range(MAX_BURST + 1)]
    assert len({company for company, _ in alike}) == MAX_BURST + 1 and len({company.split()[0] for company, _ in alike}) == 10


@pytest.mark.slow  # every phase of HTTP requests, an edit loop with the 337-prompt suite, a flood
def test_bench_serve_reports_throughput_and_latency(tiny_model_dir, tmp_path):
    out = tmp_path / "serve.json"
    result = CliRunner().invoke(app, ["bench-serve", "--clients", "4", "--requests", "12", "--serial-requests", "4",
                                      "--max-tokens", "4", "--flood", "8", "--edits", "3", "--model", str(tiny_model_dir),
                                      *[f"--probe={k}=0" for k in ("min_rel", "min_gen", "min_loc", "min_earlier_rel",
                                                                            "min_served_rel", "min_served_gen")],
                                      "--workdir", str(tmp_path / "work"), "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    phases = figures["phases"]
    assert set(phases) == {"reference serial", "reference concurrent", "edits reference", "edits unedited engine",
                           "edits served", "equal edits reference", "equal edits unedited engine", "equal edits served",
                           "serial", "concurrent", "during edits"}  # fmt: skip
    assert all(p["failed"] == 0 and p["tokens_per_s"] > 0 for p in phases.values())
    # at equal work every request writes max_tokens, on each side
    assert all(phases[f"equal edits {k}"]["tokens"] == 12 * 4 for k in ("reference", "unedited engine", "served"))
    assert figures["edited_cost_over_unedited_equal_work"] > 0
    assert phases["serial"]["ttft_p50_s"] is not None and phases["concurrent"]["per_token_p50_s"] is not None
    assert figures["stale_answers"] == 0 and figures["failed_requests"] == 0
    assert figures["flood"]["revert_status"] == 200 and figures["flood"]["healthz_status"] == 200
