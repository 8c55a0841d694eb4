"""The typed edit flow: fact -> EditRequest (ledger id given once) -> ProbeReport verdicts."""

from __future__ import annotations

import json

from kmd.daemon.edit_request import build_edit_request, editor_key, ledger_id, with_edit_id
from kmd.daemon.ledger import EditRecord
from kmd.daemon.policy import RelationTemplate
from kmd.daemon.probes import ProbeFailure, ProbeReport
from kmd.editors.protocol import EditRequest
from kmd.sources.claims import Claim, utcnow

TEMPLATE = RelationTemplate(prompt="The capital of {subject} is", paraphrases=("{subject}'s capital city is",))


def test_a_fact_becomes_one_typed_request_and_gets_its_ledger_id_once():
    fact = Claim("France", "capital", "Paris", "wire", "https://x.invalid/1", observed_at=utcnow())
    request = build_edit_request(fact, TEMPLATE)
    assert request == EditRequest(prompt="The capital of France is", target="Paris", subject="France",
                                  rephrases=("France's capital city is",))  # fmt: skip
    assert request.edit_id is None  # the ledger assigns it
    applied = with_edit_id(request, 12)
    assert applied.edit_id == "12" and applied.prompt == request.prompt
    assert EditRequest.from_dict(request.to_dict()) == request  # what the ledger records comes back the same


def test_an_edit_record_reads_its_stored_request_typed_and_ids_convert_in_one_place():
    fact = Claim("France", "capital", "Paris", "wire", "https://x.invalid/1", observed_at=utcnow())
    request = build_edit_request(fact, TEMPLATE)
    record = EditRecord(12, 3, utcnow(), "fake", {}, request.to_dict(), "v", (), (), None, "applied", "", None)
    assert record.edit_request == request and record.edit_request is record.edit_request  # parsed once
    assert record.request == request.to_dict()  # the stored dict, as the API shows it
    assert with_edit_id(record.edit_request, record.id).edit_id == editor_key(record.id) == "12"
    assert ledger_id(editor_key(record.id)) == record.id


def _report(*failures: ProbeFailure) -> ProbeReport:
    return ProbeReport(rel=1.0, gen=0.5, loc=0.9, earlier_rel=None, earlier_checked=0, failures=failures)


def test_probe_report_verdicts_are_typed():
    passed = _report()
    assert passed.passed and passed.took and not passed.harmful and passed.failing_prompt is None and passed.reason == ""

    missed = _report(ProbeFailure("gen", "paraphrases not answered: gen 0.500 < 0.9", "France's capital city is"))
    assert not missed.passed and not missed.took and not missed.harmful
    assert missed.failing_prompt == "France's capital city is"

    harmful = _report(ProbeFailure("locality", "locality degraded: loc 0.9000 < 0.98", "the dog and the cat"),
                      ProbeFailure("earlier", "earlier edits lost: rel 0.500 < 0.9 over 2"))  # fmt: skip
    assert harmful.took and harmful.harmful and harmful.failing_prompt == "the dog and the cat"
    assert harmful.reason == "locality degraded: loc 0.9000 < 0.98; earlier edits lost: rel 0.500 < 0.9 over 2"


def test_probe_figures_carry_the_verdict_through_the_ledger():
    """What the ledger records (as JSON) tells a reader the verdict without the report:
    whether the edit took, and why it failed, in the revert's words."""
    report = _report(ProbeFailure("served", "answers wrong: ...", "p"),
                     ProbeFailure("locality", "locality degraded: loc 0.9000 < 0.98", "q"))  # fmt: skip
    stored = json.loads(json.dumps(report.figures()))
    assert stored["took"] is report.took is False
    assert "; ".join(stored["failures"]) == report.reason
    assert (stored["rel"], stored["gen"], stored["loc"]) == (report.rel, report.gen, report.loc)
    assert _report().figures()["took"] is True and _report().figures()["failures"] == []
