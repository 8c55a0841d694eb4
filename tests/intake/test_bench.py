"""The intake benchmark runs end to end (tiny size, no model)."""

from __future__ import annotations

from kmd.daemon.bench.intake import run_bench


def test_bench_runs_small(capsys):
    figures = run_bench(feeds=4, entries=5, workers=2, encoder="ngram")
    assert figures["claims"] == 20 and figures["refused"] == 0 and figures["not_modified"] == 4
    assert figures["facts"] >= 4 and figures["chain_ok"] == 1.0  # exact-form pairs verify without a model
    out = capsys.readouterr().out
    assert "claims verified/s" in out and "entries/s" in out
