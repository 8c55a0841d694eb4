"""Where a claim came in, and whether the policy lets that source say it that way.

Claims reach the ledger through exactly two doors: the intake (a polled `feed`, `jsonl` or
`wikidata` source) and the API (`POST /v1/facts`, recorded under an `api` source). The
ledger stamps every claim with the door it came through (the flag `via:<channel>`, part of
the claim's hashed record), and the verifier admits a claim only if its source exists, is
of the same kind as that door and may assert the relation (`origin_problem`). So a submission through
the API can never pass as the signed curated file or a feed: whatever source id it names,
it is an `api` claim, and an `api` claim of a `jsonl` source is rejected.

The doors check the same thing up front (`Intake.poll_many`, `Daemon.submit_fact`; the
intake records through `kmd.daemon.intake.LedgerSink`) so
people get a clear error at once; the verifier's check is the one nothing goes around.
`tests/intake/test_admission.py` enumerates every call that records claims.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from kmd.daemon.policy import Policy
from kmd.sources.claims import Claim

__all__ = ["CHANNELS", "channel_of", "origin_problem", "via_flag"]

CHANNELS = ("feed", "jsonl", "wikidata", "api")
_VIA = "via:"
_CHANNEL_RE = re.compile(r"^[a-z]{1,16}$")


def via_flag(channel: str) -> str:
    if not _CHANNEL_RE.match(channel):
        raise ValueError(f"bad channel name {channel!r}")
    return _VIA + channel


def channel_of(flags: Iterable[str], ref: str = "") -> str | None:
    """The door a recorded claim came through; None if it does not say (then its source's
    kind is assumed, except for claims the API recorded before channels were stamped)."""
    for flag in flags:
        if flag.startswith(_VIA):
            return flag[len(_VIA) :]
    return "api" if ref.startswith("api:") else None


def origin_problem(policy: Policy, claim_source: str, relation: str, channel: str | None) -> str | None:
    """Why the policy refuses this claim's origin, or None when it is admissible."""
    try:
        source = policy.source(claim_source)
    except KeyError:
        return f"source {claim_source!r} is not in the policy"
    if channel is not None and channel != source.kind:
        return f"source {claim_source} is a {source.kind} source; a claim that came in through {channel} cannot use its id"
    if relation not in source.relations:
        return f"source {claim_source} may not assert {relation!r}"
    return None


def claim_problem(policy: Policy, claim: Claim, channel: str) -> str | None:
    """`origin_problem` for a claim about to be recorded through `channel`."""
    return origin_problem(policy, claim.source_id, claim.relation, channel)
