"""Base vs edited answers for the console, generated when a page asks, with a small cache.

Both come from the serving engine, the one path every generated token takes: the edited
answer from the committed state as it serves now, the base answer from the same engine
with no edit acting on that row (`GenerationRequest(base=True)`: the editor is suspended
for those rows only, while other requests keep their edits). Prompts are formatted as
`/v1/generate` formats them (greedy, 16 tokens), and spend the viewer's generation budget.
Base answers never change (cached by prompt); edited answers are cached by prompt and the
state that answered, so any commit or revert refreshes them.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kmd.daemon.serving import GenerationRequest, Refused
from kmd.daemon.surface import NotServingError
from kmd.editors.answers import answer_line

if TYPE_CHECKING:
    from kmd.daemon.serving import ServedState, TokenStream
    from kmd.daemon.surface import Service

MAX_NEW_TOKENS = 16
CACHE_SIZE = 512
WAIT_SECONDS = 30.0  # the page says the model is busy rather than hang longer


class ModelBusy(RuntimeError):
    """No answers now: the model is not loaded yet, or generation is saturated."""


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


def _state_key(state: ServedState) -> str:
    """The served state's id (the saved state's hash, else its editor and edits)."""
    editor = state.editor
    edits = "\n".join(editor.edit_ids) if editor is not None else ""
    return state.version or f"{id(editor)}:{hashlib.sha256(edits.encode()).hexdigest()}"


class AnswerCache:
    def __init__(self, daemon: Service, *, size: int = CACHE_SIZE, max_new_tokens: int = MAX_NEW_TOKENS,
                 wait: float = WAIT_SECONDS) -> None:  # fmt: skip
        self.daemon, self.size, self.max_new_tokens, self.wait = daemon, size, max_new_tokens, wait
        self._cache: OrderedDict[tuple[str, ...], str] = OrderedDict()
        self._mutex = threading.Lock()
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

    def pairs(self, prompts: Sequence[str], caller: str) -> list[Pair]:
        """Base and edited answers to `prompts` (blocks while they generate); ModelBusy when
        there are none to give now."""
        try:
            engine, served = self.daemon.engine(), self.daemon.served_state()
        except NotServingError as exc:
            raise ModelBusy("the model is not loaded yet") from exc
        base = {p: self._get(("base", p)) for p in prompts}
        edited = {p: self._get(("edited", _state_key(served), p)) for p in prompts}
        wanted = [(True, p) for p in dict.fromkeys(p for p in prompts if base[p] is None)]
        wanted += [(False, p) for p in dict.fromkeys(p for p in prompts if edited[p] is None)]
        host = engine.host
        streams: list[tuple[bool, str, TokenStream]] = []
        try:
            for is_base, prompt in wanted:
                request = GenerationRequest(host.encode(host.format_prompt(prompt)), self.max_new_tokens, caller=caller,
                                            base=is_base)  # fmt: skip
                streams.append((is_base, prompt, engine.submit(request)))
            for is_base, prompt, stream in streams:
                text = host.tokenizer.decode(stream.result(self.wait), skip_special_tokens=True)
                if is_base:
                    base[prompt] = text
                    self._put(("base", prompt), text)
                else:  # cached under the state that answered (a commit may have come in between)
                    edited[prompt] = text
                    self._put(("edited", _state_key(stream.state), prompt), text)
        except (Refused, TimeoutError) as exc:
            raise ModelBusy("generation is busy; reload the page in a moment") from exc
        except NotServingError as exc:
            raise ModelBusy("the model is not loaded yet") from exc
        finally:
            for _, _, stream in streams:
                stream.cancel()  # no-op for the finished ones
        self.generated += len(wanted)
        return [Pair(p, base[p], edited[p]) for p in prompts]  # type: ignore[arg-type]
