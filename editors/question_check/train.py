"""Training the question check (`kmd question-check train`).

The sentence encoder stays frozen, so every text is encoded once (cached in --out, keyed
by the texts) and training runs the small MLP only: minutes on one CPU core. Pairs come
from editors/question_check/data.py; 5 % of them (by a hash of the pair) are held out for
validation. Each epoch is validated; the best epoch by balanced accuracy is kept. The
threshold on the logit is then set on the validation pairs so that at least `recall` of
the positives pass: a missed rephrase costs an answer, a passed same-subject question
costs a hijack, so the default asks for high recall and lets training make the negatives
fall below it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from loguru import logger
from safetensors.torch import load_file, save_file

from kmd.editors.question_check.data import Pair
from kmd.editors.question_check.model import CheckNetwork, CheckShape, encode, save_network

Progress = Callable[[int, int, dict[str, float]], None]


@dataclass(frozen=True)
class CheckTrainOptions:
    epochs: int = 12
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    hidden: int = 256
    recall: float = 0.985  # of validation positives the threshold lets through
    val_fraction: float = 0.05
    relation_pairs: int = 20000  # positive and negative pairs each from the relations file
    cross_style: int = 2  # cross-style negatives per record (data.cross_style_pairs)
    seed: int = 0


def _held_out(pair: Pair, fraction: float) -> bool:
    digest = hashlib.sha256(f"{pair.question}\x00{pair.prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") < fraction * 2**32


def embed(pairs: Sequence[Pair], cache_dir: Path, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) question and prompt embeddings of `pairs`, every distinct text encoded once
    (cached in `cache_dir`, keyed by the texts)."""
    texts = sorted({p.question for p in pairs} | {p.prompt for p in pairs})
    key = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]
    cache = cache_dir / f"encoded-{key}.safetensors"
    if cache.is_file():
        table = load_file(str(cache))["embeddings"].to(device)
    else:
        logger.info("question check: encoding {} distinct texts", len(texts))
        table = encode(texts, device)
        cache_dir.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": table.cpu().contiguous()}, str(cache))
    index = {t: i for i, t in enumerate(texts)}
    q = table[torch.tensor([index[p.question] for p in pairs], device=device)]
    p = table[torch.tensor([index[p.prompt] for p in pairs], device=device)]
    return q, p


@torch.no_grad()
def figures(network: CheckNetwork, q: torch.Tensor, p: torch.Tensor, labels: torch.Tensor, threshold: float,
            sources: Sequence[str]) -> dict[str, float]:  # fmt: skip
    """Accept rates at `threshold`: positives accepted, negatives accepted (false), per source."""
    accepted = network(q, p) > threshold
    positive = labels > 0.5
    out = {
        "recall": float(accepted[positive].float().mean()) if positive.any() else float("nan"),
        "false_accept": float(accepted[~positive].float().mean()) if (~positive).any() else float("nan"),
    }
    for source in sorted(set(sources)):
        rows = torch.tensor([s == source for s in sources], device=labels.device)
        out[f"accept[{source}]"] = float(accepted[rows].float().mean())
    return out


def threshold_for(logits: torch.Tensor, labels: torch.Tensor, recall: float) -> float:
    """The largest threshold that lets at least `recall` of the positives through."""
    positives = logits[labels > 0.5].sort().values
    if positives.numel() == 0:
        return 0.0
    k = int((1.0 - recall) * positives.numel())
    return float(positives[k]) - 1e-6


def train(pairs: Sequence[Pair], out: Path, options: CheckTrainOptions, progress: Progress | None = None,
          training_info: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    device = torch.device("cpu")
    torch.manual_seed(options.seed)
    started = time.perf_counter()
    val = [p for p in pairs if _held_out(p, options.val_fraction)]
    fit = [p for p in pairs if not _held_out(p, options.val_fraction)]
    if not fit or not val or len({p.label for p in fit}) < 2:
        raise ValueError("question check training needs positive and negative pairs in both the training and validation split")
    q, p = embed(fit, out, device)
    vq, vp = embed(val, out, device)
    y = torch.tensor([x.label for x in fit], device=device)
    vy = torch.tensor([x.label for x in val], device=device)
    network = CheckNetwork(CheckShape(hidden=options.hidden)).to(device)
    optimiser = torch.optim.AdamW(network.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    best: tuple[float, dict[str, torch.Tensor], int] | None = None
    history = []
    for epoch in range(1, options.epochs + 1):
        network.train()
        order = torch.randperm(len(fit), generator=torch.Generator().manual_seed(options.seed + epoch))
        for start in range(0, len(fit), options.batch_size):
            rows = order[start : start + options.batch_size]
            loss = F.binary_cross_entropy_with_logits(network(q[rows], p[rows]), y[rows])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        network.eval()
        with torch.no_grad():
            logits = network(vq, vp)
        accepted = logits > 0
        balanced = 0.5 * (float(accepted[vy > 0.5].float().mean()) + float((~accepted[vy < 0.5]).float().mean()))
        history.append({"epoch": epoch, "loss": round(loss.item(), 5), "val_balanced_accuracy": round(balanced, 5)})
        logger.info("question check: epoch {} loss {:.4f} validation balanced accuracy {:.4f}", epoch, loss.item(), balanced)
        if progress is not None:
            progress(epoch, options.epochs, history[-1])
        if best is None or balanced > best[0]:
            best = (balanced, {k: v.clone() for k, v in network.state_dict().items()}, epoch)
    assert best is not None
    network.load_state_dict(best[1])
    network.eval()
    with torch.no_grad():
        threshold = threshold_for(network(vq, vp), vy, options.recall)
    validation = figures(network, vq, vp, vy, threshold, [x.source for x in val])
    info = {"options": asdict(options), "best_epoch": best[2], "pairs": len(fit), "validation_pairs": len(val),
            "validation": {k: round(v, 4) for k, v in validation.items()}, "history": history,
            "seconds": round(time.perf_counter() - started, 1), **(training_info or {})}  # fmt: skip
    path = save_network(network, out / "question-check.safetensors", threshold, info)
    return {"path": str(path), "threshold": threshold, **info}
