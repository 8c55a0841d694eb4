"""The locality suite and what the unedited model answers to it.

The suite is held-out prompts (kmd ships several hundred varied ones in
`daemon/probes_data/locality.jsonl`; a policy may add its own JSONL files). The
`LocalityBaseline` is the *unedited* model's greedy continuation of each prompt, recorded
once per model in fixed chunks; a `LocalityState` says which prompts an editor state still
continues token for token the same way. The probes (`kmd.daemon.probes`) compare against it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from kmd.editors.scoring import generate
from kmd.editors.state import write_atomic

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost

__all__ = ["LOCALITY_CHUNK", "LOCALITY_TOKENS", "LocalityBaseline", "LocalityState", "ProbeSuiteError", "read_suite"]

DEFAULT_SUITE = "locality.jsonl"
MAX_SUITE_PROMPTS = 5000
MAX_PROMPT_CHARS = 2000


class ProbeSuiteError(ValueError):
    pass


def read_suite(path: str | Path | None = None) -> list[str]:
    """Prompts from a JSONL suite (`{"prompt": ...}` per line); None: the shipped default."""
    if path is None:
        text = (resources.files("kmd.daemon.probes_data") / DEFAULT_SUITE).read_text()
        origin = f"<default {DEFAULT_SUITE}>"
    else:
        text, origin = Path(path).read_text(encoding="utf-8"), str(path)
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ProbeSuiteError(f"{origin}:{number}: not valid JSON ({exc.msg})") from exc
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
            raise ProbeSuiteError(f"{origin}:{number}: needs a non-empty 'prompt' of at most {MAX_PROMPT_CHARS} characters")
        prompts.append(prompt)
    if not prompts or len(prompts) > MAX_SUITE_PROMPTS:
        raise ProbeSuiteError(f"{origin}: {len(prompts)} prompts (need 1..{MAX_SUITE_PROMPTS})")
    return prompts


LOCALITY_TOKENS = 8  # recorded greedy tokens per locality prompt
LOCALITY_CHUNK = 16  # prompts generated together; a chunk is the unit of re-generation


@dataclass(frozen=True)
class LocalityBaseline:
    """The unedited model's greedy continuations of the locality prompts.

    Recorded in chunks of `chunk` consecutive prompts (left-padded batches), exactly as the
    probes generate them, so a chunk no edit reaches gives the recorded tokens bit for bit.
    """

    model_fingerprint: str
    prompts: tuple[str, ...]
    continuations: tuple[tuple[int, ...], ...]
    chunk: int = LOCALITY_CHUNK

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.prompts).encode()).hexdigest()

    @classmethod
    def record(cls, host: ModelHost, prompts: Sequence[str], tokens: int = LOCALITY_TOKENS, chunk: int = LOCALITY_CHUNK) -> LocalityBaseline:
        logger.info("recording the unedited model's answers to {} locality prompts", len(prompts))
        continuations = generate(host, None, list(prompts), tokens, chunk)
        return cls(host.identity.fingerprint, tuple(prompts), tuple(tuple(c) for c in continuations), chunk)

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps(asdict(self)).encode())

    @classmethod
    def load_or_record(cls, path: Path, host: ModelHost, prompts: Sequence[str]) -> LocalityBaseline:
        """Reuse a recorded baseline for the same model, prompts and chunking, else record a new one.

        The baseline must come from the *unedited* model: call this before any edit is
        attached (the daemon does it at start, before restoring the editor state).
        """
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                found = cls(data["model_fingerprint"], tuple(data["prompts"]),
                            tuple(tuple(c) for c in data["continuations"]), int(data.get("chunk", 0)))  # fmt: skip
                if (found.model_fingerprint, found.prompts, found.chunk) == (host.identity.fingerprint, tuple(prompts), LOCALITY_CHUNK):
                    return found
                logger.warning("locality baseline {} is for another model, suite or chunking; recording anew", path)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("locality baseline {} unreadable ({}); recording anew", path, exc)
        baseline = cls.record(host, prompts)
        path.parent.mkdir(parents=True, exist_ok=True)
        baseline.save(path)
        return baseline


@dataclass(frozen=True)
class LocalityState:
    """What one state of an editor does on the locality suite.

    `routes[c]` are the route tokens (`Editor.routes`) of chunk c's rows in that state
    (None: not known, the chunk must be generated to compare); `verdicts[i]` says whether
    prompt i still continues token for token as the baseline recorded.
    """

    routes: tuple[tuple[Hashable | None, ...] | None, ...]
    verdicts: tuple[bool, ...]
    changed: dict[int, tuple[int, ...]] = field(default_factory=dict)  # prompt index -> its new tokens
    rows_run: int = 0  # prompts generated to get this state
    full: bool = False  # every chunk was generated

    @property
    def loc(self) -> float:
        return sum(self.verdicts) / max(len(self.verdicts), 1)
