"""The editor protocol every backend obeys.

    editor = get_backend("grace")(host)        # or load_editor(path, host)
    edit_id = editor.apply(EditRequest(prompt=..., target=..., subject=...))
    editor.revert(edit_id)
    save_editor(editor, path); load_editor(path, host)   # kmd.editors.state

Backends subclass `Editor` and implement five small methods (`_apply`, `_revert`,
`_hook_specs`, `state_tensors`, `_restore`). The base class owns the bookkeeping that
must be the same everywhere: ids, validation, when hooks are attached, routing context,
persistence. Base weights are never written: an editor with no edits has no hooks
installed, so the model is exactly the base model.

Concurrency: the routing context of a forward lives in a context variable (one per
thread), not on the editor, and names the editor whose edits act on that forward. So
several editors may have hooks on one model (a serving snapshot made with `fork()` and
the writer's working editor), and concurrent forwards in other threads never see each
other's routing. A served batch that rows join and leave (continuous batching) keeps its
routing context between forwards: `resume` re-enters it and `regroup` carries each row's
decision into a new batch (backends implement `_regroup`). Two optional methods,
`routing_features` and `routes`, let callers (the daemon's locality probes) tell from
prompt tokens alone which rows an edit reaches.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
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
    steps with the KV cache), whose new tokens all come after the prompt. `owner` is
    the editor whose edits act on the forwards of this context (None: no editor does).
    """

    prompt_mask: torch.Tensor | None  # (B, T) bool; None: every token of the first forward
    decisions: dict[str, Any] = field(default_factory=dict)
    owner: Editor | None = None
    implicit: bool = False  # made by a raw model call outside any `query`

    def mask_for(self, batch: int, seq: int, device: torch.device) -> torch.Tensor:
        if self.prompt_mask is None:
            return torch.ones(batch, seq, dtype=torch.bool, device=device)
        return self.prompt_mask.to(device)

    def last_prompt_index(self, batch: int, seq: int, device: torch.device) -> torch.Tensor:
        """(B,) index of each row's last prompt token (works for left or right padding)."""
        mask = self.mask_for(batch, seq, device)
        positions = torch.arange(seq, device=device).expand(batch, seq)
        return torch.where(mask, positions, -1).amax(dim=1)


# The routing context of the forward in progress, per thread (and per asyncio task).
_ROUTING: ContextVar[Routing | None] = ContextVar("kmd_routing", default=None)


@contextmanager
def base_model() -> Iterator[None]:
    """Forwards in this block (in this thread only) run as the base model: no editor acts,
    whatever hooks are installed. Other threads are not affected."""
    token = _ROUTING.set(Routing(None, owner=None))
    try:
        yield
    finally:
        _ROUTING.reset(token)


def _copy_containers(value: Any) -> Any:
    """Copy lists, dicts, sets and mutable dataclasses recursively; share everything else
    (tensors, modules, frozen configs). Backends replace tensors rather than write into
    them, except where `_forked` says otherwise or through `editors.rows.GrowingRows` (which
    writes only rows no fork holds), so shared tensors stay private to each."""
    if isinstance(value, list):
        return [_copy_containers(v) for v in value]
    if isinstance(value, tuple) and type(value) is tuple:
        return tuple(_copy_containers(v) for v in value)
    if isinstance(value, OrderedDict):
        return OrderedDict((k, _copy_containers(v)) for k, v in value.items())
    if type(value) is dict:
        return {k: _copy_containers(v) for k, v in value.items()}
    if isinstance(value, set):
        return set(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        params = getattr(type(value), "__dataclass_params__", None)
        if params is not None and not params.frozen:
            clone = copy.copy(value)
            for f in dataclasses.fields(value):
                setattr(clone, f.name, _copy_containers(getattr(value, f.name)))
            return clone
    return value


class Editor(ABC):
    """Base class of every editing backend."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    # Config options that change how the stored edits are served, never what an apply
    # computes: a checkpointed edit sequence (`kmd bench --checkpoint`) resumes under others.
    SERVING_ONLY: ClassVar[tuple[str, ...]] = ()

    def __init__(self, host: ModelHost, config: Any | None = None) -> None:
        self.host = host
        self.config = config if config is not None else self.default_config(host)
        self._requests: dict[str, EditRequest] = {}  # insertion-ordered: the edit history
        self._handle: HookHandle | None = None
        self._suspended = 0
        self._lock = threading.RLock()  # guards hook attachment and the counters below
        self._users = 0  # `query` blocks in progress (any thread)
        self._retired = False  # a replaced snapshot: hooks go once its last query ends
        self._raw_calls = True  # edits act on raw model calls outside `query` (not for forks)
        self._unchecked: set[str] = set()  # edits applied with `question_check` off (it is per edit)

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
        self.config = dataclasses.replace(saved, **coerce_options(type(saved), overrides, f"{self.name} overrides", base=saved))
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
            if not getattr(self.config, "question_check", True):
                self._unchecked.add(edit_id)
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
            self._unchecked.discard(edit_id)
        finally:
            self._sync_hooks()

    def revert_all(self) -> None:
        for edit_id in reversed(self.edit_ids):
            self.revert(edit_id)

    # ----- serving ------------------------------------------------------------------------
    @contextmanager
    def query(self, prompt_mask: torch.Tensor | None) -> Iterator[Routing]:
        """Route the forwards inside this block (this thread only) by `prompt_mask` (B, T) bool."""
        with self.resume(Routing(prompt_mask, owner=self)) as routing:
            yield routing

    @contextmanager
    def resume(self, routing: Routing) -> Iterator[Routing]:
        """Run more forwards (this thread only) in a routing context made before, by `query`
        or `regroup`: the decode steps of a served batch that is kept between blocks."""
        if routing.owner is not self:
            raise ValueError(f"{self.name}: that routing context belongs to another editor")
        with self._lock:
            self._users += 1
            self._sync_hooks()  # a retired snapshot still serves the requests that hold it
        token = _ROUTING.set(routing)
        try:
            yield routing
        finally:
            _ROUTING.reset(token)
            with self._lock:
                self._users -= 1
                self._sync_hooks()

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Run the base model (hooks removed) inside this block."""
        with self._lock:
            self._suspended += 1
            self._detach()
        try:
            yield
        finally:
            with self._lock:
                self._suspended -= 1
                self._sync_hooks()

    def regroup(self, parts: Sequence[tuple[Routing, torch.Tensor]]) -> Routing:
        """The routing context of a batch made of rows of batches whose prefill ran under this
        editor (continuous batching: rows leave a running batch, others join it): part k gives
        its rows `keep_k` ((n_k,) indices into its batch, in the new order), after those of
        part k - 1. Each row keeps its decision and answer tracking, so the new batch's decode
        steps compute for every row what they would in its own batch (contract suite)."""
        from kmd.editors.regroup import Regroup

        if any(routing.owner is not self for routing, _ in parts):
            raise ValueError(f"{self.name}: cannot regroup routing contexts of another editor")
        how = Regroup(tuple(keep.long().cpu() for _, keep in parts))
        decisions = [routing.decisions for routing, _ in parts]
        merged = self._regroup(how, decisions) if any(decisions) else {}
        return Routing(None, merged, owner=self)

    def _regroup(self, how: Any, decisions: list[dict[str, Any]]) -> dict[str, Any]:
        """A backend's entries of the regrouped decisions (`how`: an `editors.regroup.Regroup`;
        `decisions`: each part's `Routing.decisions` after its prefill)."""
        raise NotImplementedError(f"{self.name}: its routing decisions cannot be regrouped (no _regroup)")

    def routing(self) -> Routing:
        """The routing context for the forward in progress (used by backend hooks)."""
        current = _ROUTING.get()
        return current if current is not None and current.owner is self else Routing(None, owner=self)

    def fork(self) -> Editor:
        """An independent copy holding the same edits (a serving snapshot).

        Tensors are shared, containers copied: later applies and reverts on either copy do
        not change the other. A fork's edits act only inside its own `query` blocks (never
        on raw model calls), so it can serve while this editor is changed and probed.
        """
        with self._lock:
            clone = copy.copy(self)
            for name, value in vars(self).items():
                if name not in ("host", "config"):  # the model host and the frozen config are shared
                    setattr(clone, name, _copy_containers(value))
            clone._handle, clone._suspended, clone._users = None, 0, 0
            clone._lock, clone._retired, clone._raw_calls = threading.RLock(), False, False
            clone._forked()
            clone._sync_hooks()
        return clone

    def retire(self) -> None:
        """This editor will serve no new requests: remove its hooks once the last one ends."""
        with self._lock:
            self._retired = True
            self._sync_hooks()

    def _acts(self) -> bool:
        """Do this editor's edits act on the forward in progress (in this thread)?"""
        current = _ROUTING.get()
        if current is None:
            return self._raw_calls
        return current.owner is self

    def _gated(self, fn):
        def hook(*args):
            return fn(*args) if self._acts() else None

        return hook

    def _sync_hooks(self) -> None:
        with self._lock:
            wanted = bool(self._requests) and not self._suspended and (not self._retired or self._users > 0)
            if wanted and self._handle is None:
                specs = [HookSpec(path="", fn=self._start_forward, kind="forward_pre"), *self._hook_specs()]
                specs = [dataclasses.replace(spec, fn=self._gated(spec.fn)) for spec in specs]
                self._handle = install_hooks(self.host.model, specs)
            elif not wanted:
                self._detach()

    def _detach(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.remove()
                self._handle = None

    def _start_forward(self, module: torch.nn.Module, args: tuple) -> None:
        # A raw model call outside `query(...)`: treat its whole input as prompt.
        current = _ROUTING.get()
        if current is None or current.implicit:
            _ROUTING.set(Routing(None, owner=self, implicit=True))

    # ----- the question check ----------------------------------------------------------------
    def answerable(self, questions: Sequence[str], edit_ids: Sequence[str]) -> list[bool]:
        """For rows the backend routed to these edits: may each edit answer its row's question
        (a chat turn's latest user message, else the prompt)? The question check
        (editors/question_check: the same relation of the subject, not only the subject) for
        backends with the `question_check` option, except for edits applied with it off (the
        option is per edit, like a relation's other editor options); otherwise every row may."""
        if not questions or not hasattr(self.config, "question_check"):
            return [True] * len(questions)
        from kmd.editors.question_check import QuestionCheck

        # edits applied with the check off pass; an edit being applied has no request yet
        known = [i for i, e in enumerate(edit_ids) if e in self._requests and e not in self._unchecked]
        out = [True] * len(questions)
        if known:
            check = QuestionCheck.load(device=self.host.device)
            verdicts = check.accepts([questions[i] for i in known], [self._requests[edit_ids[i]] for i in known]).tolist()
            for i, ok in zip(known, verdicts, strict=True):
                out[i] = bool(ok)
        return out

    def first_answerable(self, hit: torch.Tensor, best: torch.Tensor, row_ids: Sequence[str],
                         questions: Callable[[list[int]], list[str]],
                         candidates: Callable[[int, str], Sequence[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The edit each routed row keeps: its first candidate whose edit may answer the row's
        question (`answerable`); a row with none accepted runs as the base model.

        hit (B,) bool: the rows the backend routed; best (B,): each row's winner as an index
        into `row_ids`; `questions(rows)`: those rows' questions (asked only when the check
        is on); `candidates(row, question)`: the row's edits in order, its winner first
        (None: the winner alone). A retrieval ranks "Nimbrook Energy" first for a question
        about "Nimbrook Labs" as readily as the other way round; the next edits that also
        cleared the backend's bar are its runner-ups. Checked in rounds (every row's first,
        then the refused rows' next), so a row its winner answers costs one check.
        -> (best, hit), each (B,)."""
        rows = hit.nonzero().flatten().tolist()
        if not rows or not hasattr(self.config, "question_check"):
            return best, hit
        asked = dict(zip(rows, questions(rows), strict=True))
        queue = {row: list(candidates(row, asked[row])) if candidates else [int(best[row])] for row in rows}
        best, hit = best.clone(), hit.clone()
        hit[rows] = False
        while offered := [(row, keys.pop(0)) for row, keys in queue.items() if keys]:
            verdicts = self.answerable([asked[row] for row, _ in offered], [row_ids[key] for _, key in offered])
            for (row, key), ok in zip(offered, verdicts, strict=True):
                if ok:
                    best[row], hit[row] = key, True
                    del queue[row]
        return best, hit

    # ----- routing-aware probing (optional) ------------------------------------------------
    def routing_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """What this backend's routing reads from a left-padded batch (B, T) of prompts,
        computed from prompt tokens alone, exactly as the prefill of `scoring.generate_ids`
        computes it for that same batch (the states below the edited layer of the base
        model, or the encoder's output). None: the backend cannot tell which rows fire.

        Features do not depend on the edits, only on the model and the backend's config.
        """
        return None

    def routes(self, features: dict[str, torch.Tensor]) -> list[Hashable | None]:
        """Per row of the batch `features` came from: a token that fixes what the edits do
        to that row under the editor's current edits. Two states of an editor that give a
        row the same token give it the same output (bit for bit, in the same batch); None:
        no edit acts on the row (it is the base model's)."""
        raise NotImplementedError(f"{self.name}: routes() without routing_features()")

    def _forked(self) -> None:
        """Called on a new fork: give it private copies of tensors the backend writes into."""

    # ----- persistence hooks for editors.state ---------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """JSON-serialisable backend state stored in the manifest (besides tensors)."""
        return {}

    def unchecked_edits(self) -> list[str]:
        """The edits applied with `question_check` off (saved with the state)."""
        return sorted(self._unchecked & set(self._requests))

    def restore(self, requests: Sequence[EditRequest], tensors: dict[str, torch.Tensor], extra: dict[str, Any],
                unchecked: Sequence[str] = ()) -> None:  # fmt: skip
        self._detach()
        self._restore(requests, tensors, extra)
        self._requests = {r.edit_id: r for r in requests}  # type: ignore[misc]
        self._unchecked = set(unchecked) & set(self._requests)
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


def ranked_candidates(winner: torch.Tensor, scores: torch.Tensor, cleared: torch.Tensor, limit: int
                      ) -> Callable[[int, str], list[int]]:  # fmt: skip
    """`Editor.first_answerable`'s candidates for a backend that ranks every edit per row:
    each row's winner, then its `limit` runner-ups by `scores` among the edits that
    `cleared` the backend's bar. winner (B,); scores, cleared (B, N)."""

    def candidates(row: int, _question: str) -> list[int]:
        best = int(winner[row])
        return [best, *runners_up_of(scores[row], best, limit, cleared[row])]

    return candidates


def runners_up_of(score: torch.Tensor, best: int, limit: int, eligible: torch.Tensor) -> list[int]:
    """The `limit` edits ranked next after `best` by `score` (N,), those of them `eligible`
    (N,) bool (they cleared the backend's bar too): the candidates after a row's winner
    (`Editor.first_answerable`)."""
    if limit < 1:
        return []
    top = score.topk(min(limit + 1, score.shape[0])).indices.tolist()  # not a sort of all N edits
    ranked = [key for key in top if key != best]
    return [key for key in ranked[:limit] if bool(eligible[key])]


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
