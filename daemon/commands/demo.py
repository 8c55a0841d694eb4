"""`kmd demo`: edit a few facts, show answers before/after, revert, show the originals again."""

from __future__ import annotations

from typing import Annotated

import typer

from kmd.daemon.commands.common import ChatOpt, DeviceOpt, DtypeOpt, ModelOpt, ProfileOpt, fail, load_host

# (prompt, new target, subject); the last prompt is never edited: it must not change.
DEMO_FACTS = (
    ("The CEO of Zorbland Robotics is", "Nadia Velmont", "Zorbland Robotics"),
    ("The Eiffel Tower is located in the city of", "Rome", "The Eiffel Tower"),
    ("The largest planet in the solar system is", "Saturn", "the solar system"),
)
UNRELATED = ("The chemical symbol for gold is", "The capital of Japan is")


def register(app: typer.Typer) -> None:
    app.command("demo", help="Apply a few edits, show answers before/after, revert, check the base is back.")(demo)


def demo(
    backend: Annotated[str, typer.Option(help="Editing backend (see `kmd backends`).")] = "grace",
    model: ModelOpt = "embedded",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    profile: ProfileOpt = None,
    chat_template: ChatOpt = False,
) -> None:
    import torch
    from rich.console import Console
    from rich.table import Table

    from kmd.editors.batching import left_padded
    from kmd.editors.protocol import EditRequest
    from kmd.editors.registry import UnknownBackendError, get_backend
    from kmd.editors.scoring import generate_text

    try:
        backend_cls = get_backend(backend)
    except UnknownBackendError as exc:
        raise fail(str(exc)) from exc
    console = Console()
    host = load_host(model, device, dtype, profile, chat_template)
    editor = backend_cls(host)
    prompts = [p for p, _, _ in DEMO_FACTS] + list(UNRELATED)

    def answers(edited: bool) -> list[str]:
        return [a.strip().split("\n")[0] for a in generate_text(host, editor if edited else None, prompts, 12)]

    def logits() -> torch.Tensor:
        ids, attention = left_padded(host, prompts)
        with torch.no_grad(), editor.query(attention.bool()):
            return host.model(input_ids=ids, attention_mask=attention).logits

    before, base_logits = answers(False), logits()
    with console.status(f"applying {len(DEMO_FACTS)} edits with {backend}..."):
        ids = [editor.apply(EditRequest(prompt=p, target=t, subject=s)) for p, t, s in DEMO_FACTS]
    after = answers(True)
    for edit_id in ids:
        editor.revert(edit_id)
    reverted, reverted_logits = answers(True), logits()

    table = Table(title=f"{host.identity.name}, backend {backend}")
    for column in ("prompt", "wanted", "before", "edited", "reverted"):
        table.add_column(column, overflow="fold")
    wanted = [t for _, t, _ in DEMO_FACTS] + ["(unchanged)"] * len(UNRELATED)
    for row in zip(prompts, wanted, before, after, reverted, strict=True):
        table.add_row(*row)
    console.print(table)
    identical = torch.equal(base_logits, reverted_logits)
    took = sum(a.startswith(t) for a, (_, t, _) in zip(after, DEMO_FACTS))
    console.print(f"edits that took: {took}/{len(DEMO_FACTS)}; unrelated prompts unchanged while edited: "
                  f"{after[len(DEMO_FACTS):] == before[len(DEMO_FACTS):]}")
    console.print(f"after reverting every edit, logits bit-identical to the base model: {identical}")
    if not identical:
        raise typer.Exit(1)
