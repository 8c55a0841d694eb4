"""Backend registry: lazy, strict, and helpful on typos.

Built-in backends are listed by import path and imported only when asked for, so
importing kmd does not import every method. Plug-ins call `register_backend`.

A backend that must be trained for a model before it can edit (RECIPE) also names its
trainer module; the CLI offers `kmd <backend> train` for each (`trainer_backends`), without
importing it until the command runs. A trainer module provides `TrainOptions` (a frozen
dataclass with at least `steps`, `max_minutes`, `val_every`, `val_size`, `seed`),
`Trainer(host, records, val_records, out, options)` whose `run(progress)` returns a dict
with the `best` checkpoint, and `split_validation(records, n, seed)`.

A backend whose thresholds are derived from data for a model names its calibrator module
the same way (`kmd calibrate --backend <name>`, `calibrator_backends`). A calibrator module
provides `calibrate(host, records, *, progress=None, **overrides) -> dict`: `records` are
`kmd.editors.bench.data.EditRecord`s, `progress(phase, done, total)` reports progress and
`overrides` are backend options to calibrate with; it returns `{"options": {...},
"report": {...}}` (the options for the model's profile, and free-form evidence).
"""

from __future__ import annotations

import difflib
import importlib
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kmd.editors.protocol import Editor

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

# name -> "module:Class" (lazy) or the class itself once imported / registered.
_BACKENDS: dict[str, str | type] = {
    "fake": "kmd.editors.fake:FakeEditor",  # a lookup table for tests, not an editing method
    "grace": "kmd.editors.grace:GraceEditor",
    "llp": "kmd.editors.llp:LlpEditor",
    "memoir": "kmd.editors.memoir:MemoirEditor",
    "recipe": "kmd.editors.recipe:RecipeEditor",
    "wise": "kmd.editors.wise:WiseEditor",
}


# name -> "module" of the backend's trainer (see the module docstring).
_TRAINERS: dict[str, str] = {
    "recipe": "kmd.editors.recipe.train",
}

# name -> "module" of the backend's calibrator (see the module docstring).
_CALIBRATORS: dict[str, str] = {
    "llp": "kmd.editors.llp.calibration",
    "memoir": "kmd.editors.memoir.calibration",
}


class UnknownBackendError(LookupError):
    pass


def register_backend(name: str, target: str | type, *, trainer: str | None = None,
                     calibrator: str | None = None) -> None:  # fmt: skip
    """Register a backend class (or a lazy "module:Class" path) under a unique name;
    `trainer` names its trainer module when it needs training first, `calibrator` its
    calibrator module when its thresholds are calibrated from data."""
    if not _NAME.match(name):
        raise ValueError(f"backend name {name!r} must be lowercase letters, digits and _ (max 32)")
    if name in _BACKENDS:
        raise ValueError(f"backend {name!r} is already registered")
    _BACKENDS[name] = target
    if trainer is not None:
        _TRAINERS[name] = trainer
    if calibrator is not None:
        _CALIBRATORS[name] = calibrator


def trainer_backends() -> list[str]:
    """Backends with a trainer (`kmd <name> train`)."""
    return sorted(_TRAINERS)


def get_trainer(name: str):  # noqa: ANN201 - a module following the trainer contract
    """The trainer module of a backend (imported now)."""
    if name not in _TRAINERS:
        raise UnknownBackendError(f"backend {name!r} has no trainer (backends with one: {', '.join(trainer_backends())})")
    return importlib.import_module(_TRAINERS[name])


def calibrator_backends() -> list[str]:
    """Backends with a calibrator (`kmd calibrate --backend <name>`)."""
    return sorted(_CALIBRATORS)


def get_calibrator(name: str):  # noqa: ANN201 - a module following the calibrator contract
    """The calibrator module of a backend (imported now)."""
    if name not in _CALIBRATORS:
        raise UnknownBackendError(f"backend {name!r} has no calibration (backends with one: "
                                  f"{', '.join(calibrator_backends())})")  # fmt: skip
    return importlib.import_module(_CALIBRATORS[name])


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> type[Editor]:
    if name not in _BACKENDS:
        near = difflib.get_close_matches(name, _BACKENDS, n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise UnknownBackendError(f"unknown backend {name!r} (known: {', '.join(backend_names())}){hint}")
    target = _BACKENDS[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
        _BACKENDS[name] = target
    if getattr(target, "name", None) != name:
        raise TypeError(f"backend class {target!r} must declare name = {name!r}")
    return target  # type: ignore[return-value]
