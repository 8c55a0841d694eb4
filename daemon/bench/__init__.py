"""The daemon's benchmarks, one module each (figures and how to reproduce them: BENCHMARKS.md).

    intake.py   feeds -> claims -> facts: ingestion, revalidation, verification, verify-chain
                (`kmd intake bench`, `python -m kmd.daemon.bench.intake`)
    loop.py     a new feed entry -> a committed, probed edit, through the real loop (`kmd bench-loop`)
    serve.py    served requests while edits are applied (`kmd bench-serve`)

The editor benchmarks (one backend, N sequential edits, the evaluation protocol) are the
model side's: `kmd.editors.bench`, run by `kmd bench`.
"""
