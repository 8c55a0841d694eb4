"""The trained part of RECIPE: MLPs on a frozen sentence encoder, and the Knowledge Sentinel.

    statement "prompt target" --encoder--> e_k --knowledge MLP--> r_k --prompt MLP--> P (n_prompts, D)
    query prompt              --encoder--> e_q --query MLP-->     r_q
    retrieve row i when cos(r_q, r_k_i) > cos(r_q, sentinel)

The encoder is the packaged all-MiniLM-L6-v2, kept frozen: only the MLPs and the sentinel
train (`editors/recipe/train.py`), which fits a CPU and lets training cache the encoder's
outputs. The paper fine-tunes a RoBERTa encoder instead.

A trained editor is one safetensors file: the MLP weights and the sentinel, with JSON
metadata naming the base model's identity (refused on any other model), the shapes and
how it was trained. Nothing is pickled.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from kmd.editors.hooks import resolve_module
from kmd.editors.protocol import EditorError

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost

FORMAT = "kmd-recipe-editor/1"
MAX_STATEMENT_TOKENS = 128  # per repeat of an edit's statement context


class CheckpointError(EditorError):
    """A trained RECIPE editor is missing, unreadable, or belongs to another base model."""


@dataclass(frozen=True)
class RecipeShape:
    """Sizes of the trained networks (stored in the checkpoint)."""

    encoder_dim: int = 384  # all-MiniLM-L6-v2
    hidden: int = 1024
    rep_dim: int = 384
    n_prompts: int = 3  # continuous prompt vectors per edit (the paper: 3)
    d_model: int = 576
    temperature: float = 0.05  # of the retrieval softmax over cosines
    # Ours: the prompts are the base model's own embeddings of the target's first n_prompts
    # tokens plus the prompt MLP's output (zero at initialisation), instead of the MLP's output
    # alone. Training then starts from "the answer is in the context" rather than from noise
    # (on SmolLM2-135M those embeddings alone lift teacher-forced ZsRE accuracy 0.13 -> 0.26).
    target_tokens: bool = False
    # Ours: the edit's statement ("prompt target" and a newline), as the base model's token
    # embeddings, repeated this many times after the continuous prompts. A repeated pattern
    # is what a small LM copies from best: untrained, on 100 ZsRE val records, SmolLM2-135M's
    # teacher-forced accuracy is 0.16 bare, 0.62 with the statement once, 0.87 twice, 0.93
    # three times (BENCHMARKS.md, RECIPE, fourth session). The paper: 0 (prompts only).
    context_repeats: int = 0


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


class RecipeNetworks(nn.Module):
    def __init__(self, shape: RecipeShape, embed_rms: float) -> None:
        super().__init__()
        self.shape = shape
        self.knowledge = mlp(shape.encoder_dim, shape.hidden, shape.rep_dim)
        self.query = mlp(shape.encoder_dim, shape.hidden, shape.rep_dim)
        self.prompts = mlp(shape.rep_dim, shape.hidden, shape.n_prompts * shape.d_model)
        self.sentinel = nn.Parameter(torch.randn(shape.rep_dim) * 0.02)
        if shape.target_tokens:  # start from the target's embeddings alone
            nn.init.zeros_(self.prompts[-1].weight)
            nn.init.zeros_(self.prompts[-1].bias)
        # Prompt vectors are produced in units of the RMS of the model's token embeddings.
        self.register_buffer("embed_rms", torch.tensor(float(embed_rms)))

    def knowledge_reps(self, encoded: torch.Tensor) -> torch.Tensor:
        """(N, encoder_dim) -> (N, rep_dim) unit vectors."""
        return F.normalize(self.knowledge(encoded), dim=-1)

    def query_reps(self, encoded: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.query(encoded), dim=-1)

    def prompt_vectors(self, reps: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """(N, rep_dim) -> (N, n_prompts, d_model), to prepend to the token embeddings.

        base (N, n_prompts, d_model): the target's token embeddings, required with `target_tokens`.
        """
        out = self.prompts(reps).view(reps.shape[0], self.shape.n_prompts, self.shape.d_model) * self.embed_rms
        if self.shape.target_tokens:
            if base is None:
                raise ValueError("recipe: this editor builds its prompts on the target's token embeddings")
            out = out + base.to(out.dtype)
        return out

    def retrieval_logits(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(B, R) query reps, (N, R) knowledge reps -> (B, 1 + N) cosines / T; column 0 is the sentinel."""
        sentinel = F.normalize(self.sentinel, dim=-1)[None]
        return torch.cat([queries @ sentinel.T, queries @ keys.T], dim=1) / self.shape.temperature


@torch.no_grad()
def encode_texts(texts: Sequence[str], device: torch.device | str, batch_size: int = 64) -> torch.Tensor:
    """(N, 384) unit embeddings from the packaged all-MiniLM-L6-v2 (frozen)."""
    from kmd.editors.encoder import load_sentence_encoder

    encoder = load_sentence_encoder(str(device))
    out = encoder.encode(
        list(texts), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
    )
    return out.float().to(device)


def edit_prompts(networks: RecipeNetworks, host: ModelHost, reps: torch.Tensor, targets: Sequence[str]) -> torch.Tensor:
    """(N, n_prompts, d_model) the continuous prompts of N edits from their knowledge reps and targets."""
    base = target_embeddings(host, targets, networks.shape.n_prompts) if networks.shape.target_tokens else None
    return networks.prompt_vectors(reps, base)


def context_ids(host: ModelHost, shape: RecipeShape, prompt: str, target: str) -> list[int]:
    """The token ids of an edit's statement context (`context_repeats`; empty without it)."""
    if not shape.context_repeats:
        return []
    # Bounded: a long statement keeps its end (the target and what leads to it).
    once = host.encode(f"{statement(prompt, target)}\n", special=False)[-MAX_STATEMENT_TOKENS:]
    return once * shape.context_repeats


def edit_prefix(host: ModelHost, shape: RecipeShape, prompts: torch.Tensor, prompt: str, target: str) -> torch.Tensor:
    """The prefix one edit is served and trained with, (n_prompts + len(context), d_model): its
    continuous prompts (n_prompts, d_model), then the token embeddings of its statement context."""
    context = context_ids(host, shape, prompt, target)
    if not context:
        return prompts
    ids = torch.tensor(context, dtype=torch.long, device=prompts.device)
    return torch.cat([prompts, token_embedding(host)(ids).to(prompts.dtype)])


@torch.no_grad()
def target_embeddings(host: ModelHost, targets: Sequence[str], n: int) -> torch.Tensor:
    """(N, n, d_model) the base model's embeddings of each target's first n tokens (the last repeated)."""
    rows = []
    for target in targets:
        ids = host.encode(" " + target.strip(), special=False)[:n]
        rows.append(ids + ids[-1:] * (n - len(ids)))
    return token_embedding(host)(torch.tensor(rows, dtype=torch.long, device=host.device)).float()


def token_embedding(host: ModelHost) -> nn.Embedding:
    return resolve_module(host.model, host.profile.layout.embed)


def statement(prompt: str, target: str) -> str:
    return f"{prompt.strip()} {target.strip()}"


FACT_LEAD = "Known fact (current, verified): "


def fact_context_ids(host: ModelHost, prompt: str, target: str) -> list[int]:
    """The token ids of an edit's fact sentence ("statement" context), bounded like the trained
    context (a long statement keeps its end)."""
    text = statement(prompt, target)
    text += "" if text[-1:] in ".!?" else "."
    return host.encode(f"{FACT_LEAD}{text}\n\n", special=False)[-MAX_STATEMENT_TOKENS:]


def embed_rms(host: ModelHost) -> float:
    weight = token_embedding(host).weight
    return float(weight.float().pow(2).mean().sqrt())


def new_networks(host: ModelHost, **shape: Any) -> RecipeNetworks:
    shape = RecipeShape(d_model=host.model.config.hidden_size, **shape)
    return RecipeNetworks(shape, embed_rms(host)).to(host.device)


def save_networks(networks: RecipeNetworks, host: ModelHost, path: Path, training: dict[str, Any]) -> Path:
    """One safetensors file (written to a temporary name, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": FORMAT,
        "model": json.dumps(host.identity.to_dict(), sort_keys=True),
        "shape": json.dumps(asdict(networks.shape), sort_keys=True),
        "training": json.dumps(training, sort_keys=True),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in networks.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def read_metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"recipe: no trained editor at {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
        meta = {k: json.loads(v) if k != "format" else v for k, v in raw.items()}
    except Exception as exc:
        raise CheckpointError(f"recipe: {path} is not a readable trained editor ({exc})") from exc
    if meta.get("format") != FORMAT or not {"model", "shape"} <= set(meta):
        raise CheckpointError(f"recipe: {path} is not a {FORMAT} file")
    return meta


PACKAGED = Path(__file__).parent / "trained"  # trained editors shipped with kmd (one per base model)


def packaged_checkpoint(host: ModelHost) -> Path | None:
    """The shipped trained editor for `host`'s model (matched by its identity), or None."""
    for path in sorted(PACKAGED.glob("*.safetensors")):
        try:
            meta = read_metadata(path)
        except CheckpointError:
            continue
        if not host.identity.mismatches(meta["model"]):
            return path
    return None


def load_networks(path: Path, host: ModelHost) -> tuple[RecipeNetworks, dict[str, Any]]:
    """The trained networks for `host`; refuses a checkpoint trained for another base model."""
    meta = read_metadata(path)
    mismatches = host.identity.mismatches(meta["model"])
    if mismatches:
        raise CheckpointError(
            f"recipe: {path} was trained for another base model ({meta['model'].get('name')}): " + "; ".join(mismatches)
        )
    networks = RecipeNetworks(RecipeShape(**meta["shape"]), 1.0)
    try:
        networks.load_state_dict(load_file(str(path)))
    except Exception as exc:
        raise CheckpointError(f"recipe: {path}: weights do not fit the stored shape ({exc})") from exc
    return networks.to(host.device).eval().requires_grad_(False), meta
