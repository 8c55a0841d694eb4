"""The one place that installs hooks into a model.

Every module path is resolved before any hook goes in, so a wrong path fails loudly and
leaves the model untouched. `hooked(...)` removes its own hooks in `finally` (nesting
composes) and they act only on forwards run by the thread that installed them: the
writer computes an edit with capture and training hooks while other threads serve from
the same model. Long-lived edits hold a `HookHandle` (every thread) and remove it explicitly.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from torch import nn
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    import torch

    from kmd.editors.model import ModelHost


class MissingModuleError(LookupError):
    """A module path from a profile/layout does not exist in the model."""


@dataclass(frozen=True)
class HookSpec:
    """One hook: a module path (already formatted, e.g. `model.layers.3.mlp.down_proj`).

    `forward` hooks get `(module, args, output)` and may return a replacement output;
    `forward_pre` hooks get `(module, args)` (or `(module, args, kwargs)` with
    `with_kwargs`) and may return replacement inputs.
    """

    path: str
    fn: Callable
    kind: Literal["forward", "forward_pre"] = "forward"
    with_kwargs: bool = False


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise MissingModuleError(
            f"module {path!r} not found in {type(model).__name__}; check the profile's layout"
        ) from exc


class HookHandle:
    """Hooks installed together and removed together (idempotent)."""

    def __init__(self, handles: list[RemovableHandle]) -> None:
        self._handles = handles

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def install_hooks(model: nn.Module, specs: Sequence[HookSpec]) -> HookHandle:
    """Resolve every path first, then install; on any failure nothing stays installed."""
    modules = [resolve_module(model, spec.path) for spec in specs]
    handles: list[RemovableHandle] = []
    try:
        for module, spec in zip(modules, specs, strict=True):
            if spec.kind == "forward":
                handles.append(module.register_forward_hook(spec.fn, with_kwargs=spec.with_kwargs))
            elif spec.kind == "forward_pre":
                handles.append(module.register_forward_pre_hook(spec.fn, with_kwargs=spec.with_kwargs))
            else:
                raise ValueError(f"unknown hook kind {spec.kind!r}")
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return HookHandle(handles)


def _this_thread_only(fn: Callable) -> Callable:
    owner = threading.get_ident()

    def hook(*args):
        return fn(*args) if threading.get_ident() == owner else None

    return hook


@contextmanager
def hooked(model: nn.Module, specs: Sequence[HookSpec]) -> Iterator[HookHandle]:
    """Hooks for the duration of a block, acting on this thread's forwards only; removed
    in `finally` whatever happens."""
    handle = install_hooks(model, [dataclasses.replace(spec, fn=_this_thread_only(spec.fn)) for spec in specs])
    try:
        yield handle
    finally:
        handle.remove()


class _Stop(Exception):
    """Raised by the hook after the last module a partial forward needs."""


def run_stopped(model: nn.Module, specs: Sequence[HookSpec], forward: Callable[[], Any], stop_after: str | None) -> None:
    """Call `forward()` with `specs` installed (this thread's forwards only), and stop it right
    after the module at `stop_after` has run (None: run it whole): the layers after the last
    one a capture reads are never computed."""

    def stop(module, args, output):
        raise _Stop

    try:
        with hooked(model, [*specs, *([HookSpec(stop_after, stop)] if stop_after else [])]):
            forward()
    except _Stop:
        pass


def run_until(host: ModelHost, path: str, input_ids: torch.Tensor, attention_mask: torch.Tensor, specs: list[HookSpec]) -> None:
    """A plain forward of (B, T) ids and mask with `specs` installed, stopping after the module at `path`."""
    run_stopped(host.model, specs, lambda: host.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False), path)
