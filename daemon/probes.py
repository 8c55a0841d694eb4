"""Regression probes run after every edit, and the locality baseline they compare against.

Three probes (thresholds come from the policy's `probes:` section):
1. the edit itself: teacher-forced accuracy of the target after the edit prompt (`rel`)
   and after each paraphrase (`gen`): did it take?
2. locality: held-out prompts whose greedy continuations by the *unedited* model were
   recorded when the baseline was created; `loc` is the fraction of those tokens the
   edited model still predicts (teacher-forced, one batched pass);
3. earlier edits: a sample of committed edits re-scored: are they still held?
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from kmd.editors.scoring import generate, score_targets, score_token_targets

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost
    from kmd.editors.protocol import EditRequest, Editor

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


@dataclass(frozen=True)
class LocalityBaseline:
    """The unedited model's greedy continuations of the locality prompts."""

    model_fingerprint: str
    prompts: tuple[str, ...]
    continuations: tuple[tuple[int, ...], ...]

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.prompts).encode()).hexdigest()

    @classmethod
    def record(cls, host: ModelHost, prompts: Sequence[str], tokens: int = 8, batch_size: int = 32) -> LocalityBaseline:
        logger.info("recording the unedited model's answers to {} locality prompts", len(prompts))
        continuations = generate(host, None, list(prompts), tokens, batch_size)
        return cls(host.identity.fingerprint, tuple(prompts), tuple(tuple(c) for c in continuations))

    def save(self, path: Path) -> None:
        data = json.dumps(asdict(self)).encode()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def load_or_record(cls, path: Path, host: ModelHost, prompts: Sequence[str]) -> LocalityBaseline:
        """Reuse a recorded baseline for the same model and prompts, else record a new one.

        The baseline must come from the *unedited* model: call this before any edit is
        attached (the daemon does it at start, before restoring the editor state).
        """
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                found = cls(data["model_fingerprint"], tuple(data["prompts"]), tuple(tuple(c) for c in data["continuations"]))
                if found.model_fingerprint == host.identity.fingerprint and found.prompts == tuple(prompts):
                    return found
                logger.warning("locality baseline {} is for another model or suite; recording anew", path)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("locality baseline {} unreadable ({}); recording anew", path, exc)
        baseline = cls.record(host, prompts)
        path.parent.mkdir(parents=True, exist_ok=True)
        baseline.save(path)
        return baseline


@dataclass(frozen=True)
class ProbeReport:
    rel: float
    gen: float | None
    loc: float
    earlier_rel: float | None
    earlier_checked: int
    failures: tuple[str, ...]  # human-readable reasons; empty means pass
    took: bool  # the edit itself took (rel and gen thresholds met)

    @property
    def passed(self) -> bool:
        return not self.failures

    def figures(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "failures"} | {"failures": list(self.failures)}


@dataclass(frozen=True)
class Thresholds:
    min_rel: float = 0.9
    min_gen: float = 0.5
    min_loc: float = 0.98
    earlier_edits_sample: int = 20
    min_earlier_rel: float = 0.9

    @classmethod
    def of(cls, policy_probes: Any) -> Thresholds:
        return cls(**{name: getattr(policy_probes, name) for name in cls.__dataclass_fields__})


class Prober:
    def __init__(self, host: ModelHost, baseline: LocalityBaseline, thresholds: Thresholds, batch_size: int = 32) -> None:
        self.host, self.baseline, self.thresholds, self.batch_size = host, baseline, thresholds, batch_size
        self._encoded = [
            (host.encode(host.format_prompt(p)), list(c)) for p, c in zip(baseline.prompts, baseline.continuations, strict=True) if c
        ]

    def locality(self, editor: Editor | None) -> float:
        scores = score_token_targets(self.host, editor, self._encoded, self.batch_size)
        return sum(s.accuracy for s in scores) / max(len(scores), 1)

    def edit_scores(self, editor: Editor, request: EditRequest) -> tuple[float, float | None]:
        pairs = [(request.prompt, request.target)] + [(p, request.target) for p in request.rephrases]
        scores = score_targets(self.host, editor, pairs, self.batch_size)
        gen = [s.accuracy for s in scores[1:]]
        return scores[0].accuracy, (sum(gen) / len(gen) if gen else None)

    def earlier(self, editor: Editor, requests: Sequence[EditRequest], seed: int = 0) -> tuple[float | None, int]:
        k = min(self.thresholds.earlier_edits_sample, len(requests))
        if k == 0:
            return None, 0
        sample = random.Random(seed).sample(list(requests), k)
        scores = score_targets(self.host, editor, [(r.prompt, r.target) for r in sample], self.batch_size)
        return sum(s.accuracy for s in scores) / k, k

    def check(self, editor: Editor, request: EditRequest, earlier: Sequence[EditRequest] = ()) -> ProbeReport:
        t = self.thresholds
        rel, gen = self.edit_scores(editor, request)
        loc = self.locality(editor)
        earlier_rel, checked = self.earlier(editor, earlier)
        failures = []
        if rel < t.min_rel:
            failures.append(f"edit did not take: rel {rel:.3f} < {t.min_rel}")
        if gen is not None and gen < t.min_gen:
            failures.append(f"paraphrases not answered: gen {gen:.3f} < {t.min_gen}")
        if loc < t.min_loc:
            failures.append(f"locality degraded: loc {loc:.4f} < {t.min_loc}")
        if earlier_rel is not None and earlier_rel < t.min_earlier_rel:
            failures.append(f"earlier edits lost: rel {earlier_rel:.3f} < {t.min_earlier_rel} over {checked}")
        took = rel >= t.min_rel and (gen is None or gen >= t.min_gen)
        return ProbeReport(rel, gen, loc, earlier_rel, checked, tuple(failures), took)
