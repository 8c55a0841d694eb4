"""Options and helpers shared by the commands that load a model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from kmd.editors.model import ModelHost

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="'embedded' (SmolLM2-135M-Instruct), a Hugging Face id, or a local path.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (float32 on CPU, bfloat16 on CUDA) or a torch dtype name.")]
ProfileOpt = Annotated[str | None, typer.Option(help="Per-model profile name or YAML file (default: matched by model config).")]
ChatOpt = Annotated[bool, typer.Option("--chat-template/--no-chat-template", help="Wrap prompts in the tokenizer's chat template.")]


def load_host(model: str, device: str, dtype: str, profile: str | None, chat: bool) -> ModelHost:
    from kmd.editors.model import ModelHost, ModelNotFoundError, ModelSettings

    settings = ModelSettings(model=model, device=device, dtype=dtype, profile=profile, use_chat_template=chat)
    try:
        return ModelHost.load(settings)
    except ModelNotFoundError as exc:
        raise fail(str(exc)) from exc


def fail(message: str) -> typer.Exit:
    """Print a clear error and return the exit to raise (status 2: bad input)."""
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(2)
