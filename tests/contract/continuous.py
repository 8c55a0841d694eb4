"""Greedy decoding scheduled the way the serving engine schedules it (continuous batching:
rows join a running batch at different steps and leave it when they end), for the contract
suite."""

from __future__ import annotations

from kmd.editors.decoding import DecodeBatch


def continuous(host, editor, arrivals: dict[int, list[tuple[list[int], int]]]) -> list[list[int]]:
    """Greedy decoding the way the serving engine schedules it: at step s the rows
    `arrivals[s]` ((prompt ids, max new tokens) each) run their prefill together and join the
    running batch; a row leaves once it has its tokens or wrote EOS. Tokens per row, in
    arrival order."""
    eos = host.tokenizer.eos_token_id
    out: list[list[int]] = []
    running: DecodeBatch | None = None
    rows: list[int] = []  # which request each row of `running` is
    limits: list[int] = []
    step = 0
    while step <= max(arrivals) or rows:
        if step in arrivals:
            joining = DecodeBatch.prefill(host, editor, [ids for ids, _ in arrivals[step]])
            rows += list(range(len(out), len(out) + joining.size))
            out += [[] for _ in arrivals[step]]
            limits += [n for _, n in arrivals[step]]
            running = joining if running is None else DecodeBatch.regroup([(running, range(running.size)),
                                                                          (joining, range(joining.size))])  # fmt: skip
        if running is not None and rows:
            tokens = running.logits.argmax(-1)  # (B,)
            for row, token in zip(rows, tokens.tolist(), strict=True):
                out[row].append(token)
            staying = [i for i, row in enumerate(rows) if len(out[row]) < limits[row] and out[row][-1] != eos]
            running = DecodeBatch.regroup([(running, staying)])
            tokens, rows = tokens[staying], [rows[i] for i in staying]
            if running is not None:
                running.step(tokens)
        step += 1
    return out


def schedule(prompts: list[list[int]], limits: list[int]) -> dict[int, list[tuple[list[int], int]]]:
    """Two rows start, then pairs join at steps 2 and 5, and the rest one by one."""
    at = [0, 0, 2, 2, 5, 5] + list(range(6, 6 + max(0, len(prompts) - 6)))
    arrivals: dict[int, list[tuple[list[int], int]]] = {}
    for prompt, limit, step in zip(prompts, limits, at, strict=False):
        arrivals.setdefault(step, []).append((prompt, limit))
    return arrivals
