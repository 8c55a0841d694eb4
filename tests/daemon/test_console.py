"""The review console in process (FastAPI's TestClient) on the tiny model: pages, escaping,
login and session cookie, CSRF, protect_reads, and approve -> edit -> answers -> revert.
The same in a real browser against a daemon process: tests/browser/test_console_browser.py."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime

import pytest
from fastapi.testclient import TestClient

import kmd.editors.scoring as scoring
from kmd.daemon.api import create_app
from kmd.daemon.console.charts import Activity, locality_chart, per_day_chart

from .ecosystem import TOKEN

PAGES = ["/ui", "/ui/pending", "/ui/edits", "/ui/edits/1", "/ui/reverts", "/ui/chain", "/ui/login"]
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture(scope="module")
def app(eco):
    return create_app(eco)


def fresh(app) -> TestClient:
    return TestClient(app, follow_redirects=False)


def log_in(client: TestClient, name: str = "alice", next_: str = "/ui/pending") -> str:
    """Log in through the form; returns the session's CSRF token (read from a page, as a browser does)."""
    nonce = CSRF.search(client.get("/ui/login").text).group(1)
    response = client.post("/ui/login", data={"token": TOKEN, "name": name, "csrf": nonce, "next": next_})
    assert response.status_code == 303 and response.headers["location"] == next_
    return CSRF.search(client.get("/ui/pending").text).group(1)


def fact_id(eco, subject: str) -> int:
    return next(f.id for f in eco.ledger.facts() if f.subject == subject)


def test_every_page_renders_and_feed_text_is_escaped(app, eco):
    client = fresh(app)
    for page in PAGES:
        response = client.get(page)
        assert response.status_code == 200, (page, response.text[:500])
        csp = response.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp  # no script may run at all
        assert response.headers["x-frame-options"] == "DENY" and "<script" not in response.text.lower()
    pending = client.get("/ui/pending").text
    # the hostile feed entry is shown, as text
    assert "&lt;script&gt;document.title=&#34;pwned&#34;;window.kmdPwned=1&lt;/script&gt;Orin" in pending
    assert "Zorbland" in pending and "Log in</a> to decide" in pending and "/approve" not in pending
    overview = client.get("/ui").text
    assert "<svg" in overview and "1 committed, 1 reverted" in overview
    assert client.get("/ui/edits/999").status_code == 404


def test_the_edit_page_shows_the_same_subject_answers_the_probe_recorded(app, eco):
    edit = next(e for e in eco.ledger.edits() if e.status == "committed")
    recorded = edit.probes["same_subject"]
    assert {f["prompt"] for f in recorded} == {"the CEO of France is", "the song of France is"}
    page = fresh(app).get(f"/ui/edits/{edit.id}").text
    assert 'id="same-subject"' in page and "the CEO of France is" in page
    assert all(f["before"] in page and f["after"] in page for f in recorded if f["before"] and f["after"])
    assert "hijacked" not in page.split('id="same-subject"')[1].split("</table>")[0].replace("not hijacked", "")


def test_login_sets_a_strict_httponly_cookie_and_keeps_the_token_out_of_urls(app, eco):
    client = fresh(app)
    nonce = CSRF.search(client.get("/ui/login").text).group(1)
    wrong = client.post("/ui/login", data={"token": "guess", "csrf": nonce})
    assert wrong.status_code == 401 and "not the API token" in wrong.text and "kmd_session" not in wrong.headers.get("set-cookie", "")
    unicode = client.post("/ui/login", data={"token": "tökén", "csrf": nonce})
    assert unicode.status_code == 401
    no_nonce = fresh(app).post("/ui/login", data={"token": TOKEN, "csrf": nonce})  # no login cookie: a forged form
    assert no_nonce.status_code == 403
    bad_name = client.post("/ui/login", data={"token": TOKEN, "csrf": nonce, "name": "<b>x</b>"})
    assert bad_name.status_code == 400
    ok = client.post("/ui/login", data={"token": TOKEN, "csrf": nonce, "next": "https://evil.example/"})
    cookie = ok.headers["set-cookie"]
    assert ok.status_code == 303 and ok.headers["location"] == "/ui"  # no open redirect
    assert "kmd_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert TOKEN not in ok.headers["location"] and TOKEN not in cookie
    page = client.get("/ui").text
    assert "Log out" in page and "console" in page and TOKEN not in page
    # logging out needs the CSRF token too; after it the cookie is worthless
    assert client.post("/ui/logout", data={"csrf": "nope"}).status_code == 403
    csrf = CSRF.search(page).group(1)
    assert client.post("/ui/logout", data={"csrf": csrf}).status_code == 303
    client.cookies.set("kmd_session", cookie.split("kmd_session=")[1].split(";")[0], path="/ui")
    assert "Log out" not in client.get("/ui").text


def test_writes_need_a_session_and_its_csrf_token(app, eco):
    quarantined = fact_id(eco, "Zorbland")
    anonymous = fresh(app).post(f"/ui/facts/{quarantined}/approve", data={"csrf": "x"})
    assert anonymous.status_code == 303 and anonymous.headers["location"].startswith("/ui/login?next=")
    client = fresh(app)
    log_in(client)
    assert client.post(f"/ui/facts/{quarantined}/approve").status_code == 403
    assert client.post(f"/ui/facts/{quarantined}/approve", data={"csrf": "forged"}).status_code == 403
    assert client.post("/ui/edits/1/revert", data={"csrf": "forged"}).status_code == 403
    assert client.post(f"/ui/facts/{quarantined}/approve", json={"csrf": "x"}).status_code == 403  # not a form
    huge = client.post(f"/ui/facts/{quarantined}/approve", data={"csrf": "x", "reason": "y" * 20_000})
    assert huge.status_code == 413
    assert eco.ledger.fact(quarantined).status == "quarantined"


def test_protect_reads_sends_readers_to_log_in(app, eco):
    saved = eco.settings
    eco.settings = saved.model_copy(update={"api": saved.api.model_copy(update={"protect_reads": True})})
    try:
        client = fresh(app)
        denied = client.get("/ui/edits?status=committed")
        assert denied.status_code == 303 and denied.headers["location"] == "/ui/login?next=%2Fui%2Fedits%3Fstatus%3Dcommitted"
        assert client.get("/ui/login").status_code == 200 and client.get("/ui/static/console.css").status_code == 200
        assert client.get("/ui/edits", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        log_in(client)
        assert client.get("/ui/edits").status_code == 200
    finally:
        eco.settings = saved


def test_approve_becomes_an_edit_whose_answers_show_and_a_revert_is_logged(app, eco, monkeypatch):
    generated: list[str] = []
    real = scoring.generate_text
    monkeypatch.setattr(scoring, "generate_text", lambda host, editor, prompts, n: generated.extend(prompts) or real(host, editor, prompts, n))
    client = fresh(app)
    csrf = log_in(client)
    zorbland, quexia = fact_id(eco, "Zorbland"), fact_id(eco, "Quexia")
    approved = client.post(f"/ui/facts/{zorbland}/approve", data={"csrf": csrf, "reason": "checked the filing"})
    assert approved.status_code == 303 and approved.headers["location"] == "/ui/pending"
    assert "approved: the next edit cycle applies it" in client.get("/ui/pending").text
    assert eco.ledger.fact(zorbland).status == "ready"
    event = eco.ledger.events(entity="fact", entity_id=zorbland)[-1]
    assert (event.kind, event.actor, event.reason) == ("fact.approved", "console:alice", "checked the filing")
    client.post(f"/ui/facts/{quexia}/reject", data={"csrf": csrf})
    assert eco.ledger.fact(quexia).status == "rejected"
    again = client.post(f"/ui/facts/{quexia}/approve", data={"csrf": csrf})  # the ledger refuses: shown, not a 500
    assert again.status_code == 303 and "only quarantined or blocked facts are approved" in client.get("/ui/pending").text

    summary = eco.cycle()  # the maintenance loop picks the approved fact up
    assert len(summary.committed) == 1
    edit_id = summary.committed[0]
    listing = client.get("/ui/edits?status=committed&relation=ceo").text
    assert f'id="edit-{edit_id}"' in listing and "Nadia Velmont" in listing and "France" not in listing
    assert "Nadia Velmont" not in client.get("/ui/edits?relation=capital").text

    page = client.get(f"/ui/edits/{edit_id}").text
    row = re.search(r'<td>the CEO of Zorbland is</td>\s*<td class="answer base ([^"]*)">([^<]*)</td>\s*'
                    r'<td class="answer edited ([^"]*)">([^<]*)</td>', page)
    assert row, page
    base_hit, base, edited_hit, edited = row.groups()
    assert edited.startswith("Nadia Velmont") and edited_hit.strip() == "hit"
    assert not base.startswith("Nadia") and base_hit.strip() == ""
    assert "applied to the served model" in page and 'id="revert-form"' in page
    count = len(generated)
    client.get(f"/ui/edits/{edit_id}")
    assert len(generated) == count  # the second load is served from the cache

    reverted = client.post(f"/ui/edits/{edit_id}/revert", data={"csrf": csrf, "reason": "wrong CEO"})
    assert reverted.status_code == 303 and reverted.headers["location"] == f"/ui/edits/{edit_id}"
    assert eco.ledger.edit(edit_id).status == "reverted"
    page = client.get(f"/ui/edits/{edit_id}").text
    assert f"Edit {edit_id} reverted" in page and "not applied to the served model" in page
    assert len(generated) > count  # the edits changed: answers generated again
    assert not re.search(r'class="answer edited hit">Nadia', page)

    log = client.get("/ui/reverts").text
    mine = re.search(rf'<tr id="revert-\d+">.*?e{edit_id}</a>.*?</tr>', log, re.S).group(0)
    assert "console:alice" in mine and "wrong CEO" in mine
    assert "locality degraded: loc" in log and "the song of Eve is" in log  # the probes' own revert
    assert "Intact" in client.get("/ui/chain").text


def test_charts_are_svg_drawn_on_the_server():
    days = [date(2026, 11, d) for d in range(1, 8)]
    data = Activity(days, [0, 2, 0, 5, 1, 0, 3], [0, 0, 1, 0, 0, 0, 2],
                    [(datetime(2026, 11, d, 12, tzinfo=UTC), 1.0 - d / 100) for d in range(1, 8)], 0.98)  # fmt: skip
    bars = str(per_day_chart(data))
    assert bars.startswith("<svg") and "11 committed, 3 reverted" in bars
    assert bars.count("<rect") == 2 + sum(1 for v in data.committed + data.reverted if v)  # legend + nonzero bars
    assert "2026-11-04: 5 committed" in bars
    line = str(locality_chart(data))
    assert line.count("<circle") == 7 and "stroke-dasharray" in line and "latest 0.9300" in line
    empty = str(locality_chart(Activity(days, [0] * 7, [0] * 7, [], None)))
    assert "no locality measured yet" in empty


def test_ids_beyond_the_databases_integers_are_not_found(app, eco):
    """Issue 27: ids of 2^64 and 10^23 gave 500s (OverflowError) on the page and the forms."""
    client = fresh(app)
    csrf = log_in(client)
    for number in (2**64, 10**23, 2**63):
        assert client.get(f"/ui/edits/{number}").status_code == 404
        for path in (f"/ui/facts/{number}/approve", f"/ui/facts/{number}/reject", f"/ui/edits/{number}/revert"):
            answer = client.post(path, data={"csrf": csrf, "reason": "x"})
            assert answer.status_code == 404, (path, answer.status_code)
            assert f"The ledger has no {'edit' if 'edits' in path else 'fact'} {number}." in answer.text
