"""Texts the editors train and measure with, in one place.

- Prefixes: short texts sampled once from the base model itself (seeded); edits train on
  their prompt behind some of them so that the edit does not depend on the prompt opening
  the context (LLP, WISE).
- Background passages: shipped generic English text (editors/background.txt), for
  statistics of "what any text looks like" at a layer (MEMOIR, WISE).
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost

BACKGROUND_FILE = "background.txt"
PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You", "It", "In", "A", "When", "This")


def generate_prefixes(host: ModelHost, count: int, tokens: int, seed: int) -> list[str]:
    """Short texts sampled once from the model itself (seeded, one batched call)."""
    if count <= 0:
        return []
    tokenizer, model = host.tokenizer, host.model
    starts = [host.encode(PREFIX_STARTS[i % len(PREFIX_STARTS)]) for i in range(count)]
    width = max(len(s) for s in starts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in starts], device=host.device)
    attention = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in starts], device=host.device)
    devices = [host.device] if host.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        generated = model.generate(
            input_ids=ids, attention_mask=attention, max_new_tokens=tokens, do_sample=True,
            top_k=50, top_p=None, temperature=1.0, pad_token_id=pad, use_cache=True,
        )
    out = []
    for index, row in enumerate(generated.tolist()):
        text = " ".join(tokenizer.decode(row, skip_special_tokens=True).split())
        out.append(text or PREFIX_STARTS[index % len(PREFIX_STARTS)])
    return out


def with_prefix(prefix: str, prompt: str) -> str:
    return f"{prefix} {prompt}" if prefix[-1:] in ".!?;:" else f"{prefix}. {prompt}"


def background_passages() -> list[str]:
    text = (resources.files("kmd.editors") / BACKGROUND_FILE).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
