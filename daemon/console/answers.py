"""Base vs edited answers for the console, generated when a page asks, with a small cache.

The base answer comes from the same model with the editor's hooks suspended; the edited
answer from the model as it serves now. Both are generated as `/v1/generate` serves a
prompt (`host.format_prompt`, greedy), under the serving lock, so neither sees a model
half-way through an edit. Base answers never change (cached by prompt); edited answers
are cached by prompt and the set of edits applied, so any commit or revert refreshes them.

This is the console's one seam to the model (like `openai_api.token_stream` for the
OpenAI endpoints): a batched serving engine can take over its body.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kmd.editors.answers import answer_line

if TYPE_CHECKING:
    from kmd.daemon.surface import Service

MAX_NEW_TOKENS = 16
CACHE_SIZE = 512
LOCK_WAIT_SECONDS = 10.0  # an edit in flight holds the lock; the page says so rather than hang


class ModelBusy(RuntimeError):
    """The model is busy (an edit or revert in flight) or not loaded yet."""


@dataclass(frozen=True)
class Pair:
    prompt: str
    base: str  # the whole continuation
    edited: str

    @property
    def base_line(self) -> str:
        return answer_line(self.base)

    @property
    def edited_line(self) -> str:
        return answer_line(self.edited)

    @property
    def changed(self) -> bool:
        return self.base != self.edited


class AnswerCache:
    def __init__(self, daemon: Service, *, size: int = CACHE_SIZE, max_new_tokens: int = MAX_NEW_TOKENS,
                 wait: float = LOCK_WAIT_SECONDS) -> None:  # fmt: skip
        self.daemon, self.size, self.max_new_tokens, self.wait = daemon, size, max_new_tokens, wait
        self._cache: OrderedDict[tuple[str, ...], str] = OrderedDict()
        self._mutex = threading.Lock()  # guards the dict only; generation runs under the serving lock
        self.generated = 0  # prompts generated (not served from the cache): for tests and curiosity

    def _get(self, key: tuple[str, ...]) -> str | None:
        with self._mutex:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            return None

    def _put(self, key: tuple[str, ...], value: str) -> None:
        with self._mutex:
            self._cache[key] = value
            self._cache.move_to_end(key)
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)

    def pairs(self, prompts: Sequence[str]) -> list[Pair]:
        from kmd.editors.scoring import generate_text

        source = self.daemon.replica or self.daemon.maintainer
        if source is None or source.editor is None:
            raise ModelBusy("the model is not loaded yet")
        if not source.lock.acquire(timeout=self.wait):
            raise ModelBusy("the model is busy with an edit or revert; reload the page in a moment")
        try:
            editor, host = source.editor, source.host
            state = hashlib.sha256("\n".join(editor.edit_ids).encode()).hexdigest()
            base_keys = [("base", p) for p in prompts]
            edited_keys = [("edited", str(id(editor)), state, p) for p in prompts]
            missing_base = list(dict.fromkeys(k[-1] for k in base_keys if self._get(k) is None))
            missing_edited = list(dict.fromkeys(k[-1] for k in edited_keys if self._get(k) is None))
            if missing_edited:
                texts = generate_text(host, editor, missing_edited, self.max_new_tokens)
                for p, t in zip(missing_edited, texts, strict=True):
                    self._put(("edited", str(id(editor)), state, p), t)
            if missing_base:
                with editor.suspended():  # the base model: no edit hooks attached
                    texts = generate_text(host, None, missing_base, self.max_new_tokens)
                for p, t in zip(missing_base, texts, strict=True):
                    self._put(("base", p), t)
            self.generated += len(missing_base) + len(missing_edited)
            out = []
            for p, bk, ek in zip(prompts, base_keys, edited_keys, strict=True):
                base, edited = self._get(bk), self._get(ek)
                if base is None or edited is None:  # evicted by a huge page: generate without the cache
                    return self._uncached(prompts)
                out.append(Pair(p, base, edited))
            return out
        finally:
            source.lock.release()

    def _uncached(self, prompts: Sequence[str]) -> list[Pair]:
        from kmd.editors.scoring import generate_text

        source = self.daemon.replica or self.daemon.maintainer
        editor, host = source.editor, source.host
        edited = generate_text(host, editor, list(prompts), self.max_new_tokens)
        with editor.suspended():
            base = generate_text(host, None, list(prompts), self.max_new_tokens)
        return [Pair(p, b, e) for p, b, e in zip(prompts, base, edited, strict=True)]
