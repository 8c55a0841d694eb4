"""One serving path: every generated token goes through one engine (vLLM's split, small).

    engine.py     `ServingEngine`: takes requests, runs the model thread, streams tokens
    scheduler.py  `Scheduler`: who runs at each step; per-caller budgets; `Refused` (429)
    sampling.py   per-request sampling (temperature, top_p, seed), greedy = arg max
    stream.py     `GenerationRequest` and `TokenStream` (blocking or async reading, cancel)
    state.py      `ServedState`: the committed edits' snapshot and its state id

The model runner is `kmd.editors.decoding.DecodeBatch`: batches that rows join and leave,
each row routed on its own prompt tokens (`Editor.query`, `Editor.regroup`).
docs/daemon.md, "Serving", tells the whole path.
"""

from kmd.daemon.serving.engine import EngineStats, ServingEngine
from kmd.daemon.serving.sampling import Sampling
from kmd.daemon.serving.scheduler import Budget, Refused, Scheduler
from kmd.daemon.serving.state import ServedState
from kmd.daemon.serving.stream import GenerationRequest, TokenStream

__all__ = ["Budget", "EngineStats", "GenerationRequest", "Refused", "Sampling", "Scheduler", "ServedState",
           "ServingEngine", "TokenStream"]
