"""Verification: quorum, trust, rate limits, supersession, quarantine and approval."""

from __future__ import annotations

from datetime import timedelta

import pytest

from intake.helpers import SynonymEncoder, make_policy
from kmd.daemon.edit_request import build_edit_request
from kmd.daemon.ledger import Ledger, LedgerError
from kmd.daemon.matching import NgramEncoder, ObjectMatcher
from kmd.daemon.verify import Verifier
from kmd.sources.claims import Claim

SOURCES = """\
  - {id: a, kind: feed, location: "https://a.example/f", trust: medium, relations: [capital, head_of_state]}
  - {id: b, kind: feed, location: "https://b.example/f", trust: medium, group: bgroup, relations: [capital, head_of_state]}
  - {id: b2, kind: feed, location: "https://b2.example/f", trust: medium, group: bgroup, relations: [capital]}
  - {id: hi, kind: feed, location: "https://hi.example/f", trust: high, relations: [capital, head_of_state]}
  - {id: lo, kind: feed, location: "https://lo.example/f", trust: low, relations: [capital]}
  - {id: lo2, kind: feed, location: "https://lo2.example/f", trust: low, relations: [capital]}
  - id: limited
    kind: feed
    location: "https://l.example/f"
    trust: high
    relations: [capital]
    rate_limit: {max_claims: 2, per: 1h}
"""
SYNONYMS = [["Paris", "Paris, France", "City of Paris"], ["Lyon", "Lyon, France"]]


class World:
    def __init__(self, clock, policy=None, encoder=None):
        self.clock = clock
        self.policy = policy or make_policy(SOURCES)
        self.ledger = Ledger.in_memory(clock=clock)
        self.matcher = ObjectMatcher(encoder or SynonymEncoder(SYNONYMS), self.policy.verification.similarity_threshold)
        self.verifier = Verifier(self.policy, self.ledger, self.matcher, clock=clock)
        self.n = 0

    def claim(self, source, obj, subject="France", relation="capital", days_ago=0.0, flags=()):
        self.n += 1
        c = Claim(subject, relation, obj, source, f"https://{source}.example/e{self.n}",
                  self.clock() - timedelta(days=days_ago), ref=f"e{self.n}", flags=flags)  # fmt: skip
        self.ledger.record_claims([c], policy_version=self.policy.version_tag, channel="feed")
        return c

    def run(self):
        return self.verifier.run()

    def apply_and_commit(self, fact_id):
        fact = self.ledger.fact(fact_id)
        request = build_edit_request(fact, self.policy.relation(fact.relation)).to_dict()
        edit = self.ledger.record_edit_applied(fact_id, request=request, backend="fake", backend_config={"k": 1},
                                               policy_version=self.policy.version_tag)  # fmt: skip
        return self.ledger.commit_edit(edit.id, probes={"rel": 1.0, "gen": 1.0, "loc": 1.0})


@pytest.fixture
def world(clock):
    return World(clock)


def test_quorum_of_independent_sources_with_semantic_match(world):
    world.claim("a", "Paris")
    report = world.run()
    assert report.new_facts == () and report.waiting == 1
    world.claim("b", "Paris, France")  # another group, same answer in other words
    report = world.run()
    (fid,) = report.new_facts
    fact = world.ledger.fact(fid)
    assert (fact.subject, fact.relation, fact.status) == ("France", "capital", "ready")
    assert fact.object in ("Paris", "Paris, France") and len(fact.claim_ids) == 2
    assert [c.status for c in world.ledger.claims()] == ["accepted", "accepted"]
    assert world.ledger.ready_facts()[0].id == fid


def test_exact_normalisation_before_the_encoder(clock):
    encoder = SynonymEncoder()
    world = World(clock, encoder=encoder)
    world.claim("a", "The  Hague.")
    world.claim("b", "the hague")
    (fid,) = world.run().new_facts
    assert world.ledger.fact(fid).object in ("The Hague.", "the hague")


def test_sources_in_one_group_count_once(world):
    world.claim("b", "Paris")
    world.claim("b2", "Paris")
    assert world.run().new_facts == ()
    world.claim("a", "Paris")
    assert len(world.run().new_facts) == 1


def test_a_single_high_trust_source_suffices_when_the_policy_says_so(world, clock):
    world.claim("hi", "Paris")
    assert len(world.run().new_facts) == 1
    text_policy = make_policy(SOURCES)
    no_single = text_policy.model_copy(
        update={"verification": text_policy.verification.model_copy(update={"single_source_trust": None})}
    )
    w2 = World(clock, no_single)
    w2.claim("hi", "Paris")
    assert w2.run().new_facts == ()


def test_a_single_low_trust_source_never_becomes_an_edit(clock):
    policy = make_policy(SOURCES)
    lax = policy.model_copy(update={"verification": policy.verification.model_copy(update={"quorum": 1})})
    world = World(clock, lax)
    for _ in range(3):
        world.claim("lo", "Lyon")
    report = world.run()
    assert report.new_facts == () and report.waiting == 3
    world.claim("a", "Lyon")  # quorum 1 met by a medium source
    assert len(world.run().new_facts) == 1


def test_two_independent_low_trust_sources_can_meet_quorum(world):
    world.claim("lo", "Paris")
    world.claim("lo2", "Paris")
    assert len(world.run().new_facts) == 1


def test_malformed_feed_claims_lose_a_trust_level(world):
    world.claim("hi", "Paris", flags=("malformed",))  # high -> medium: no longer enough alone
    assert world.run().new_facts == ()


def test_admission_rules(world):
    world.claim("b2", "Someone", relation="head_of_state")  # relation not allowed for b2
    world.claim("gone", "Paris")  # source not in the policy
    report = world.run()
    assert report.rejected == 2 and report.admitted == 0
    reasons = sorted(c.status_reason for c in world.ledger.claims())
    assert reasons == ["source 'gone' is not in the policy", "source b2 may not assert 'head_of_state'"]


def test_rate_limit_per_source(world, clock):
    for city in ("Paris", "Lyon", "Nice"):
        world.claim("limited", city, subject=city + "land")
    report = world.run()
    assert report.rate_limited == 1 and len(report.new_facts) == 2
    assert [c.status_reason for c in world.ledger.claims(status="rejected")] == ["rate_limited"]
    world.claim("limited", "Brest", subject="Brestland")
    assert world.run().rate_limited == 1  # still inside the hour
    clock.advance(hours=2)
    world.claim("limited", "Brest", subject="Brestland2")
    assert world.run().rate_limited == 0


def test_duplicates_are_dropped_by_hash(world):
    c = world.claim("a", "Paris")
    again = world.ledger.record_claims([c, c], policy_version="x", channel="feed")
    assert again.new_ids == () and again.duplicates == 1
    assert len(world.ledger.claims()) == 1


def test_numbers_never_match_semantically(clock):
    world = World(clock, encoder=NgramEncoder())
    world.claim("a", "1989", relation="capital")
    world.claim("b", "1990", relation="capital")
    assert world.run().new_facts == ()


def test_conflict_supersedes_a_committed_edit(world, clock):
    world.claim("a", "Lyon", days_ago=30)
    world.claim("b", "Lyon", days_ago=29)
    (old_id,) = world.run().new_facts
    old_edit = world.apply_and_commit(old_id)
    # Newer sources agree on a different object.
    world.claim("a", "Paris", days_ago=1)
    world.claim("hi", "City of Paris", days_ago=1)
    report = world.run()
    (new_id,) = report.new_facts
    new = world.ledger.fact(new_id)
    assert new.supersedes_fact_id == old_id and new.supersedes_edit_id == old_edit.id
    assert world.ledger.fact(old_id).status == "committed"  # still in the model until the loop acts
    # The maintenance loop: revert the old edit, record it, apply and commit the new one.
    revert = world.ledger.supersede_edit(old_edit.id, by_fact_id=new_id, probes_after={"rel": 0.0})
    assert revert.superseded_by_fact_id == new_id and "superseded by fact" in revert.reason
    edit = world.ledger.record_edit_applied(new_id, request=build_edit_request(new, world.policy.relation(new.relation)).to_dict(), backend="fake",
                                            backend_config={}, policy_version=world.policy.version_tag)  # fmt: skip
    assert edit.supersedes_edit_id == old_edit.id
    world.ledger.commit_edit(edit.id, probes={"rel": 1.0})
    assert world.ledger.fact(old_id).status == "superseded"
    assert world.ledger.edit(old_edit.id).status == "reverted"
    assert [e.id for e in world.ledger.committed_edits()] == [edit.id]
    assert world.ledger.verify_chain().ok


def test_older_conflicting_claims_are_stale(world):
    world.claim("a", "Paris", days_ago=1)
    world.claim("b", "Paris", days_ago=1)
    (fid,) = world.run().new_facts
    world.claim("a", "Lyon", days_ago=10)
    world.claim("hi", "Lyon", days_ago=10)
    report = world.run()
    assert report.new_facts == () and report.stale == 2
    assert world.ledger.fact(fid).status == "ready"


def test_an_unedited_fact_is_superseded_at_once(world):
    world.claim("a", "Lyon", days_ago=5)
    world.claim("b", "Lyon", days_ago=5)
    (old_id,) = world.run().new_facts
    world.claim("hi", "Paris", days_ago=1)
    report = world.run()
    (new_id,) = report.new_facts
    assert report.superseded == (old_id,)
    assert world.ledger.fact(old_id).status == "superseded"
    assert world.ledger.fact(new_id).supersedes_fact_id is None  # nothing in the model to revert


def test_corroborating_claims_attach_to_the_existing_fact(world):
    world.claim("a", "Paris")
    world.claim("b", "Paris")
    (fid,) = world.run().new_facts
    world.claim("hi", "Paris, France")
    report = world.run()
    assert report.new_facts == () and report.corroborating == 1
    assert [c.fact_id for c in world.ledger.claims(fact_id=fid)] == [fid, fid, fid]


def test_outvoted_minority_is_rejected(world):
    world.claim("a", "Paris")
    world.claim("b", "Paris")
    world.claim("lo", "Lyon")
    world.run()
    (lyon,) = [c for c in world.ledger.claims() if c.object == "Lyon"]
    assert lyon.status == "rejected" and lyon.status_reason.startswith("outvoted by fact")


def test_sensitive_relations_wait_for_approval(world):
    world.claim("a", "Alice", subject="Freedonia", relation="head_of_state")
    world.claim("hi", "Alice", subject="Freedonia", relation="head_of_state")
    report = world.run()
    (fid,) = report.quarantined
    assert world.ledger.ready_facts() == []
    with pytest.raises(LedgerError):
        world.ledger.record_edit_applied(fid, request={}, backend="fake", backend_config={}, policy_version="v")
    fact = world.ledger.approve(fid, actor="alice@example", reason="checked the gazette")
    assert fact.status == "ready" and world.ledger.ready_facts()[0].id == fid
    (event,) = [e for e in world.ledger.events(entity="fact", entity_id=fid) if e.kind == "fact.approved"]
    assert event.actor == "alice@example" and event.reason == "checked the gazette"
    with pytest.raises(LedgerError, match="only quarantined or blocked"):
        world.ledger.approve(fid, actor="bob")


def test_rejected_quarantined_fact_never_becomes_an_edit(world):
    world.claim("a", "Mallory", subject="Freedonia", relation="head_of_state")
    world.claim("b", "Mallory", subject="Freedonia", relation="head_of_state")
    (fid,) = world.run().quarantined
    assert world.ledger.reject(fid, actor="carol", reason="not true").status == "rejected"
    assert world.ledger.ready_facts() == []
    with pytest.raises(LedgerError):
        world.ledger.approve(fid, actor="carol")


def test_full_run_re_examines_pending_claims_after_a_policy_change(world, clock):
    world.claim("a", "Paris")
    assert world.run().waiting == 1
    policy = world.policy
    world.verifier.policy = policy.model_copy(
        update={"verification": policy.verification.model_copy(update={"single_source_trust": "medium"})}
    )
    assert world.run().new_facts == ()  # nothing new arrived
    assert len(world.verifier.run(full=True).new_facts) == 1


def test_pending_claims_expire_and_cannot_complete_a_later_quorum(world, clock):
    world.claim("a", "Paris")
    assert world.run().waiting == 1
    clock.advance(hours=24 * 89)
    assert world.run().expired == 0  # 89 days: still waiting
    clock.advance(hours=24 * 2)
    world.claim("b", "Paris")  # would have made a quorum with the 91-day-old claim
    report = world.run()
    assert report.expired == 1 and report.new_facts == () and report.waiting == 1
    (old,) = world.ledger.claims(status="rejected")
    assert old.status_reason.startswith("expired") and old.source_id == "a"


def test_pending_claims_wait_for_ever_when_the_policy_says_so(clock):
    policy = make_policy(SOURCES)
    forever = policy.model_copy(update={"verification": policy.verification.model_copy(update={"pending_max_age_days": None})})
    world = World(clock, forever)
    world.claim("a", "Paris")
    clock.advance(hours=24 * 1000)
    world.claim("b", "Paris")
    report = world.run()
    assert report.expired == 0 and len(report.new_facts) == 1
