"""Verification: turning claims into verified facts under the policy.

One `Verifier.run()` takes every claim the intake recorded since the last run (`new`) and,
in one ledger transaction:

1. **Admission.** The claim's source must still be in the policy and allowed to assert the
   relation, and the source must be within its rate limit (claims admitted per window).
   Otherwise the claim is rejected with the reason.
2. **Corroboration.** Admitted claims whose object matches the fact already speaking for
   that (subject, relation) are accepted as support for it.
3. **Quorum.** The other pending claims for the key are clustered by object (exact
   normalisation, then MiniLM cosine >= `similarity_threshold`). A cluster is verified when
   at least `quorum` independent source groups back it, or one group whose trust is at
   least `single_source_trust`. A single low-trust source is never enough, whatever the
   policy says. Claims from a malformed (bozo, down-weighted) feed count one trust level
   lower.
4. **Conflict.** If a fact already speaks for the key with a different object, the newer
   verified cluster supersedes it: a not-yet-edited fact is marked superseded at once; an
   applied or committed one is named in the new fact's `supersedes_fact_id`, and the
   maintenance loop reverts its edit before applying the new fact. A cluster that is not
   newer than the existing fact is rejected as stale.
5. **Quarantine.** Facts of sensitive relations start `quarantined` and wait for a person.

Claims short of quorum stay `pending` and count again when more claims arrive, until
they are `pending_max_age_days` old (policy; 90 by default): then they are rejected as
expired.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from loguru import logger

from kmd.daemon.admission import channel_of, origin_problem
from kmd.daemon.independence import Independence
from kmd.daemon.ledger import ClaimRecord, ClaimUpdate, FactRecord, Ledger, LedgerTransaction
from kmd.daemon.matching import ObjectMatcher
from kmd.daemon.policy import Policy
from kmd.sources.config import TRUST_LEVELS
from kmd.sources.claims import clean_text, normalize_text, utcnow

__all__ = ["VerifyReport", "Verifier"]

_ADMITTED = ("pending", "accepted")


@dataclass(frozen=True)
class VerifyReport:
    claims_seen: int  # new claims examined
    admitted: int
    rejected: int  # at admission (unknown source, relation not allowed, rate limited)
    rate_limited: int
    corroborating: int  # accepted as support for an existing fact
    new_facts: tuple[int, ...]  # fact ids created (ready or quarantined)
    quarantined: tuple[int, ...]  # of those, the ones waiting for approval
    superseded: tuple[int, ...]  # facts marked superseded (before they were edited)
    stale: int  # claims rejected as older than the fact they contradict
    waiting: int  # claims still pending (short of quorum)
    expired: int  # pending claims rejected as older than the policy's pending_max_age_days
    seconds: float


class Verifier:
    """Applies the policy's verification rules to the claims in the ledger."""

    def __init__(
        self,
        policy: Policy,
        ledger: Ledger,
        matcher: ObjectMatcher,
        *,
        clock: Callable[[], datetime] = utcnow,
        actor: str = "verifier",
    ):
        self.policy = policy
        self.ledger = ledger
        self.matcher = matcher
        self._clock = clock
        self.actor = actor
        self._independence = Independence(policy)

    # -- trust -----------------------------------------------------------------------------
    def _trust(self, claim: ClaimRecord) -> int | None:
        """Index into TRUST_LEVELS, one lower for claims from malformed feeds; None if unknown."""
        try:
            source = self.policy.source(claim.source_id)
        except KeyError:
            return None
        level = TRUST_LEVELS.index(source.trust)
        if "malformed" in claim.flags:
            level -= 1
        return level

    def _groups(self, claims: Sequence[ClaimRecord]) -> int:
        """Independent source groups among the claims (see `kmd.daemon.independence`)."""
        return len(self._independence.count(claims, self._trust))

    def _qualifies(self, claims: Sequence[ClaimRecord]) -> tuple[bool, str]:
        """Whether the claims make a fact, and why (for the log)."""
        count = self._independence.count(claims, self._trust)
        groups = count.trust
        rules = self.policy.verification
        why = f"{count.describe()}; quorum {rules.quorum}"
        if not groups:
            return False, "no admissible source"
        if len(groups) >= rules.quorum and not (len(groups) == 1 and max(groups.values()) == 0):
            return True, why  # a lone low-trust group never qualifies, even with quorum 1
        if len(groups) == 1 and rules.single_source_trust is not None:
            trust = TRUST_LEVELS[max(groups.values())] if max(groups.values()) >= 0 else "none"
            ok = max(groups.values()) >= TRUST_LEVELS.index(rules.single_source_trust)
            return ok, f"{why}; single source trust {trust} (policy: {rules.single_source_trust} suffices)"
        return False, why

    # -- the run ----------------------------------------------------------------------------
    def run(self, *, full: bool = False) -> VerifyReport:
        """Verify the claims recorded since the last run (`full`: re-examine every pending key)."""
        started = time.perf_counter()
        now = self._clock()
        with self.ledger.transaction(self.actor) as tx:
            new = tx.claims(status="new")
            decisions: dict[int, ClaimUpdate] = {}
            counters: Counter = Counter()
            self._expire(tx, now, decisions, counters)
            admitted = self._admit(tx, new, now, decisions, counters)
            keys = {c.key for c in admitted}
            if full:
                keys |= {c.key for c in tx.claims(status="pending")}
            pending_by_key: dict[tuple[str, str], list[ClaimRecord]] = defaultdict(list)
            for c in tx.claims_for_keys(keys, status=["pending"]) + admitted:
                if c.id not in decisions or decisions[c.id].status == "pending":  # not just expired
                    pending_by_key[c.key].append(c)
            facts_by_key = tx.active_facts(keys)
            # One encoder batch for the objects that need it: keys whose objects still differ
            # after exact normalisation (most keys need no model at all).
            to_encode: list[str] = []
            for key, claims in pending_by_key.items():
                objects = [c.object for c in claims] + [f.object for f in facts_by_key.get(key, [])]
                if len({normalize_text(o) for o in objects}) > 1:
                    to_encode += objects
            self.matcher.prime(to_encode)
            new_facts: list[FactRecord] = []
            superseded: list[int] = []
            for key in sorted(pending_by_key):
                self._evaluate(tx, key, pending_by_key[key], facts_by_key.get(key, []), decisions, new_facts,
                               superseded, counters)  # fmt: skip
            tx.update_claims(list(decisions.values()))
        waiting = sum(
            1 for cs in pending_by_key.values() for c in cs if c.id not in decisions or decisions[c.id].status == "pending"
        )
        report = VerifyReport(
            claims_seen=len(new),
            admitted=len(admitted),
            rejected=len(new) - len(admitted),
            rate_limited=counters["rate_limited"],
            corroborating=counters["corroborating"],
            new_facts=tuple(f.id for f in new_facts),
            quarantined=tuple(f.id for f in new_facts if f.status == "quarantined"),
            superseded=tuple(superseded),
            stale=counters["stale"],
            expired=counters["expired"],
            waiting=waiting,
            seconds=time.perf_counter() - started,
        )
        if new or report.expired:
            logger.info(
                "verified {} claims: {} admitted, {} new facts ({} quarantined), {} superseded, {} waiting for quorum, "
                "{} expired",
                report.claims_seen, report.admitted, len(report.new_facts), len(report.quarantined),
                len(report.superseded), report.waiting, report.expired,
            )  # fmt: skip
        return report

    def _expire(self, tx: LedgerTransaction, now: datetime, decisions: dict[int, ClaimUpdate], counters: Counter) -> None:
        """Reject the pending claims older than the policy's `pending_max_age_days`."""
        days = self.policy.verification.pending_max_age_days
        if days is None:
            return
        for c in tx.claims(status="pending", ingested_before=now - timedelta(days=days)):
            decisions[c.id] = ClaimUpdate(c.id, "rejected", f"expired: short of quorum for more than {days:g} days")
            counters["expired"] += 1

    def _admit(
        self,
        tx: LedgerTransaction,
        new: list[ClaimRecord],
        now: datetime,
        decisions: dict[int, ClaimUpdate],
        counters: Counter,
    ) -> list[ClaimRecord]:
        admitted: list[ClaimRecord] = []
        used: dict[str, int] = {}  # admitted per source in its current window, this run included
        for c in new:
            # The one check every door into the ledger passes (kmd.daemon.admission).
            problem = origin_problem(self.policy, c.source_id, c.relation, channel_of(c.flags, c.ref))
            if problem is not None:
                decisions[c.id] = ClaimUpdate(c.id, "rejected", problem)
                continue
            limit = self.policy.source(c.source_id).rate_limit
            if c.source_id not in used:
                used[c.source_id] = tx.count_claims(c.source_id, status=_ADMITTED,
                                                    since=now - timedelta(seconds=limit.per))  # fmt: skip
            if used[c.source_id] >= limit.max_claims:
                decisions[c.id] = ClaimUpdate(c.id, "rejected", "rate_limited")
                counters["rate_limited"] += 1
                continue
            used[c.source_id] += 1
            decisions[c.id] = ClaimUpdate(c.id, "pending", "admitted")
            admitted.append(c)
        return admitted

    def _evaluate(
        self,
        tx: LedgerTransaction,
        key: tuple[str, str],
        pending: list[ClaimRecord],
        facts: list[FactRecord],
        decisions: dict[int, ClaimUpdate],
        new_facts: list[FactRecord],
        superseded: list[int],
        counters: Counter,
    ) -> None:
        committed = next((f for f in reversed(facts) if f.status in ("applied", "committed")), None)
        unedited = next((f for f in reversed(facts) if f.status in ("quarantined", "ready", "blocked")), None)
        current = unedited or committed

        remaining: list[ClaimRecord] = []
        for c in pending:
            if current is not None and self.matcher.same(c.object, current.object):
                decisions[c.id] = ClaimUpdate(c.id, "accepted", f"corroborates fact {current.id}", current.id)
                counters["corroborating"] += 1
            else:
                remaining.append(c)
        if not remaining:
            return

        labels = self.matcher.cluster([c.object for c in remaining])
        clusters: dict[int, list[ClaimRecord]] = defaultdict(list)
        for c, label in zip(remaining, labels, strict=True):
            clusters[label].append(c)
        qualifying = []
        for cs in clusters.values():
            ok, why = self._qualifies(cs)
            what = f"{cs[0].subject} {key[1]} -> {cs[0].object}"
            # Why a quorum was or was not met is worth a line whenever sources were merged.
            level = "INFO" if ok or "count as one" in why or "are in group" in why else "DEBUG"
            logger.log(level, "quorum {} for {}: {}", "met" if ok else "not met", what, why)
            if ok:
                qualifying.append(cs)
        if not qualifying:
            return  # wait for more sources
        # The best-supported cluster wins; among equals, the most recent.
        winner = max(qualifying, key=lambda cs: (self._groups(cs), max(c.observed_at for c in cs)))
        newest = max(c.observed_at for c in winner)

        if current is not None and newest <= current.observed_at:
            for c in winner:
                decisions[c.id] = ClaimUpdate(c.id, "rejected", f"stale: not newer than fact {current.id}")
                counters["stale"] += 1
            return

        if committed is not None and unedited is not None and self.matcher.same(winner[0].object, committed.object):
            # Sources went back to the value the model already holds: drop the pending change.
            reason = f"superseded: newer claims confirm committed fact {committed.id}"
            tx.set_fact_status(unedited.id, "superseded", reason=reason)
            superseded.append(unedited.id)
            for c in winner:
                decisions[c.id] = ClaimUpdate(c.id, "accepted", f"corroborates fact {committed.id}", committed.id)
                counters["corroborating"] += 1
            return

        obj = self._surface(winner, lambda c: c.object)
        subject = self._surface(winner, lambda c: c.subject)
        approvers = sorted({c.source_id for c in winner if self._needs_approval(c.source_id)})
        sensitive = self.policy.is_sensitive(key[1]) or bool(approvers)
        replaced = [f.id for f in (committed, unedited) if f is not None]
        fact = tx.add_fact(
            subject=subject, relation=key[1], object=obj, subject_key=key[0], observed_at=newest,
            claim_ids=[c.id for c in winner], sensitive=sensitive, policy_version=self.policy.version_tag,
            supersedes_fact_id=committed.id if committed else None,
            reason=(f"quorum of {len(winner)} claims" + (f"; supersedes fact {', '.join(map(str, replaced))}" if replaced else "")
                    + ("; sensitive relation: awaiting approval" if self.policy.is_sensitive(key[1]) else "")
                    + (f"; source {', '.join(approvers)} needs approval" if approvers else "")),
        )  # fmt: skip
        new_facts.append(fact)
        if unedited is not None:
            tx.set_fact_status(unedited.id, "superseded", reason=f"superseded by fact {fact.id} before it was edited")
            superseded.append(unedited.id)
        for c in winner:
            decisions[c.id] = ClaimUpdate(c.id, "accepted", f"supports fact {fact.id}", fact.id)
        for c in remaining:
            if c.id not in {w.id for w in winner} and c.observed_at <= newest:
                decisions[c.id] = ClaimUpdate(c.id, "rejected", f"outvoted by fact {fact.id}")
        logger.info("fact {}: {} {} -> {} ({})", fact.id, subject, key[1], obj, fact.status)

    def _needs_approval(self, source_id: str) -> bool:
        try:
            return self.policy.source(source_id).requires_approval
        except KeyError:
            return True

    def _surface(self, claims: Sequence[ClaimRecord], field: Callable[[ClaimRecord], str]) -> str:
        """The most common spelling among the claims; ties go to the most trusted source, then
        to the shortest spelling (a tighter edit target), then to the earliest claim."""
        counts = Counter(clean_text(field(c)) for c in claims)
        best = max(
            claims,
            key=lambda c: (counts[clean_text(field(c))], self._trust(c) or 0, -len(field(c)), -c.id),
        )
        return clean_text(field(best))
