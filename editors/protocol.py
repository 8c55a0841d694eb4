"""The editor protocol every backend obeys.

    editor = get_backend("grace")(host)        # or Editor.load(path, host)
    edit_id = editor.apply(EditRequest(prompt=..., target=..., subject=...))
    editor.revert(edit_id)
    editor.save(path); Editor.load(path, host)

Backends subclass `Editor` and implement five small methods (`_apply`, `_revert`,
`_hook_specs`, `state_tensors`, `_restore`). The base class owns the bookkeeping that
must be the same everywhere: ids, validation, when hooks are attached, routing context,
persistence. Base weights are never written: an editor with no edits has no hooks
installed, so the model is exactly the base model.
"""

from __future__ import annotations

import dataclasses
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kmd.editors.hooks import HookHandle, HookSpec, install_hooks
from kmd.editors.profiles import build_config, coerce_options

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost

MAX_PROMPT_CHARS = 4000
MAX_TARGET_CHARS = 4000
MAX_REPHRASES = 32


class EditorError(RuntimeError):
    """An edit could not be applied, reverted, saved or loaded."""


class UnknownEditError(EditorError, KeyError):
    """No edit with that id is held by the editor."""


class InvalidRequestError(EditorError, ValueError):
    """An edit request failed validation."""


@dataclass(frozen=True)
class EditRequest:
    """What should change: `prompt` should now continue with `" " + target`.

    `subject` is the span of the prompt naming the entity (used by methods that key on
    the subject's last token); `rephrases` are paraphrases of the prompt (probes and, for
    some methods, training signal); `locality` are prompts that must not change.
    """

    prompt: str
    target: str
    subject: str | None = None
    rephrases: tuple[str, ...] = ()
    locality: tuple[str, ...] = ()
    edit_id: str | None = None

    def __post_init__(self) -> None:
        # Accept lists from JSON/YAML callers but store tuples (the request is immutable).
        object.__setattr__(self, "rephrases", tuple(self.rephrases))
        object.__setattr__(self, "locality", tuple(self.locality))

    def validate(self) -> None:
        problems = []
        for name, limit in (("prompt", MAX_PROMPT_CHARS), ("target", MAX_TARGET_CHARS)):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                problems.append(f"{name} must be a non-empty string")
            elif len(value) > limit:
                problems.append(f"{name} is {len(value)} characters (limit {limit})")
        if self.subject is not None and (not isinstance(self.subject, str) or not self.subject.strip()):
            problems.append("subject, when given, must be a non-empty string")
        for name in ("rephrases", "locality"):
            values = getattr(self, name)
            if len(values) > MAX_REPHRASES:
                problems.append(f"{name}: {len(values)} entries (limit {MAX_REPHRASES})")
            if any(not isinstance(v, str) or not v.strip() or len(v) > MAX_PROMPT_CHARS for v in values):
                problems.append(f"{name}: every entry must be a non-empty string of at most {MAX_PROMPT_CHARS} characters")
        if problems:
            raise InvalidRequestError("invalid edit request: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["rephrases"], data["locality"] = list(self.rephrases), list(self.locality)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditRequest:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequestError(f"unknown edit request field(s): {unknown}")
        return cls(**data)


@dataclass
class Routing:
    """Routing context for one batch: which tokens are prompt, and per-row decisions.

    Retrieval decisions are made from prompt tokens only (never answer tokens) on the
    first forward of the context (the prefill), and reused by later forwards (decode
    steps with the KV cache), whose new tokens all come after the prompt.
    """

    prompt_mask: torch.Tensor | None  # (B, T) bool; None: every token of the first forward
    decisions: dict[str, Any] = field(default_factory=dict)

    def mask_for(self, batch: int, seq: int, device: torch.device) -> torch.Tensor:
        if self.prompt_mask is None:
            return torch.ones(batch, seq, dtype=torch.bool, device=device)
        return self.prompt_mask.to(device)

    def last_prompt_index(self, batch: int, seq: int, device: torch.device) -> torch.Tensor:
        """(B,) index of each row's last prompt token (works for left or right padding)."""
        mask = self.mask_for(batch, seq, device)
        positions = torch.arange(seq, device=device).expand(batch, seq)
        return torch.where(mask, positions, -1).amax(dim=1)


class Editor(ABC):
    """Base class of every editing backend."""

    name: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, host: ModelHost, config: Any | None = None) -> None:
        self.host = host
        self.config = config if config is not None else self.default_config(host)
        self._requests: dict[str, EditRequest] = {}  # insertion-ordered: the edit history
        self._explicit: Routing | None = None  # set by `query(...)`
        self._implicit: Routing | None = None  # one per raw model call outside `query`
        self._handle: HookHandle | None = None
        self._suspended = 0

    # ----- configuration -------------------------------------------------------------
    @classmethod
    def default_config(cls, host: ModelHost, **overrides: Any) -> Any:
        """Hyperparameters: class defaults < the model profile's options < overrides."""
        options = host.profile.backend_options(cls.name) | overrides
        return build_config(cls.config_class, options, f"profile {host.profile.name}, backend {cls.name}")

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def stronger_overrides(self) -> dict[str, Any]:
        """Config overrides for one retry of an edit that did not take ({}: no retry).

        Only optimisation settings (steps, learning rate, stopping) belong here: layer
        choices are fixed when the editor is built.
        """
        return {}

    @contextmanager
    def configured(self, **overrides: Any) -> Iterator[None]:
        """Apply edits inside this block with some hyperparameters overridden."""
        saved = self.config
        self.config = dataclasses.replace(saved, **coerce_options(type(saved), overrides, f"{self.name} overrides"))
        try:
            yield
        finally:
            self.config = saved

    # ----- the protocol ------------------------------------------------------------------
    @property
    def edit_ids(self) -> list[str]:
        return list(self._requests)

    def request(self, edit_id: str) -> EditRequest:
        try:
            return self._requests[edit_id]
        except KeyError:
            raise UnknownEditError(f"no edit with id {edit_id!r}") from None

    def apply(self, request: EditRequest) -> str:
        """Apply one edit; returns its id. All-or-nothing: on error nothing is kept."""
        request.validate()
        edit_id = request.edit_id or uuid.uuid4().hex
        if edit_id in self._requests:
            raise EditorError(f"an edit with id {edit_id!r} already exists")
        request = dataclasses.replace(request, edit_id=edit_id)
        self._detach()  # the edit is computed on the model as it is, hooks re-attached after
        try:
            self._apply(edit_id, request)
            self._requests[edit_id] = request
        finally:
            self._sync_hooks()
        return edit_id

    def revert(self, edit_id: str) -> None:
        """Remove one edit exactly."""
        self.request(edit_id)
        self._detach()
        try:
            self._revert(edit_id)
            del self._requests[edit_id]
        finally:
            self._sync_hooks()

    def revert_all(self) -> None:
        for edit_id in reversed(self.edit_ids):
            self.revert(edit_id)

    def save(self, path: str | Path) -> Path:
        from kmd.editors.state import save_editor

        return save_editor(self, Path(path))

    @staticmethod
    def load(path: str | Path, host: ModelHost) -> Editor:
        from kmd.editors.state import load_editor

        return load_editor(Path(path), host)

    # ----- serving ------------------------------------------------------------------------
    @contextmanager
    def query(self, prompt_mask: torch.Tensor | None) -> Iterator[Routing]:
        """Route the forwards inside this block by `prompt_mask` (B, T) bool."""
        outer, self._explicit = self._explicit, Routing(prompt_mask)
        try:
            yield self._explicit
        finally:
            self._explicit = outer

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Run the base model (hooks removed) inside this block."""
        self._suspended += 1
        self._detach()
        try:
            yield
        finally:
            self._suspended -= 1
            self._sync_hooks()

    def routing(self) -> Routing:
        """The routing context for the forward in progress (used by backend hooks)."""
        return self._explicit or self._implicit or Routing(None)

    def _sync_hooks(self) -> None:
        wanted = bool(self._requests) and not self._suspended
        if wanted and self._handle is None:
            specs = [HookSpec(path="", fn=self._start_forward, kind="forward_pre"), *self._hook_specs()]
            self._handle = install_hooks(self.host.model, specs)
        elif not wanted:
            self._detach()

    def _detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _start_forward(self, module: torch.nn.Module, args: tuple) -> None:
        # A raw model call outside `query(...)`: treat its whole input as prompt.
        if self._explicit is None:
            self._implicit = Routing(None)

    # ----- persistence hooks for editors.state ---------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """JSON-serialisable backend state stored in the manifest (besides tensors)."""
        return {}

    def restore(self, requests: Sequence[EditRequest], tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self._detach()
        self._restore(requests, tensors, extra)
        self._requests = {r.edit_id: r for r in requests}  # type: ignore[misc]
        self._sync_hooks()

    # ----- what a backend implements ----------------------------------------------------
    @abstractmethod
    def _apply(self, edit_id: str, request: EditRequest) -> None:
        """Compute and store the edit. Raise without side effects on failure."""

    @abstractmethod
    def _revert(self, edit_id: str) -> None:
        """Remove exactly what `_apply(edit_id, ...)` stored."""

    @abstractmethod
    def _hook_specs(self) -> list[HookSpec]:
        """Hooks that make the stored edits act on forwards (installed while edits exist)."""

    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """All tensors needed to rebuild the editor (saved as safetensors)."""

    @abstractmethod
    def _restore(self, requests: Sequence[EditRequest], tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        """Rebuild from `state_tensors()` / `extra_state()` output."""


def late_layer(backend: str, num_layers: int, layer: int | None) -> int:
    """The layer whose down_proj a side-memory backend wraps: `layer`, else ~0.85 of depth.

    The last layer is refused: its output goes straight to the final norm.
    """
    if num_layers < 2:
        raise EditorError(f"{backend}: needs a model with at least 2 layers")
    chosen = layer if layer is not None else min(int(0.85 * num_layers + 0.5), num_layers - 2)
    if not 0 <= chosen <= num_layers - 2:
        raise EditorError(f"{backend}: layer {chosen} outside 0..{num_layers - 2} (the last layer is not supported)")
    return chosen
