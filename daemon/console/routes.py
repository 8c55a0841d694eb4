"""The console's pages and forms (server-rendered Jinja2, no script).

    GET  /ui                       overview: readiness, the served edit state, counts, charts
    GET  /ui/pending               quarantined facts (approve/reject), blocked facts, claims short of quorum
    GET  /ui/edits                 the edit ledger, filtered by status, source, relation
    GET  /ui/edits/{id}            one edit: request, provenance, probes, base vs edited answers
    GET  /ui/reverts               the revert log: the failing probes and the answer now
    GET  /ui/chain                 the hash chain, verified on load, and the newest events
    GET  /ui/login, POST /ui/login, POST /ui/logout
    POST /ui/facts/{id}/approve|reject, POST /ui/edits/{id}/revert     (session + CSRF)

Reads follow `api.protect_reads` (a console session or the bearer token counts). Writes
need a session opened with the API token and the form's CSRF token, and go through the
same operations as the CLI and the API (`Ledger.approve`/`reject`, `Service.reverter()`),
recorded with the session's actor (`console` or `console:<name>`). Text from feeds is
only ever rendered through Jinja2's autoescape, and the Content-Security-Policy allows
no script at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, PackageLoader, StrictUndefined

from kmd.daemon.auth import ANONYMOUS_CALLER, TOKEN_CALLER, token_ok
from kmd.daemon.console.answers import AnswerCache, ModelBusy, Pair
from kmd.daemon.console.charts import activity, locality_chart, per_day_chart
from kmd.daemon.console.sessions import (COOKIE, COOKIE_PATH, LOGIN_COOKIE, NAME_RE, LoginThrottle, Session, Sessions,
                                        tokens_equal)
from kmd.daemon.edit_request import editor_key
from kmd.daemon.ledger import LedgerError
from kmd.daemon.openai_api import edit_state, served_model_id
from kmd.daemon.surface import NotServingError, ReplicaError
from kmd.editors.answers import hits

if TYPE_CHECKING:
    from kmd.daemon.ledger import ClaimRecord, EditRecord, FactRecord
    from kmd.daemon.surface import Service

EDIT_STATUSES = ("applied", "committed", "reverted")
SCAN_EDITS = 1000  # the ledger page filters the newest edits this many deep
MAX_ROWS = 500
ANSWERED_REVERTS = 20  # the revert log generates answers for the newest reverts only
MAX_PROMPTS_PER_EDIT = 9  # the prompt and up to 8 paraphrases

SECURITY_HEADERS = {
    # No script may run on these pages, whatever a feed manages to put into them.
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}  # fmt: skip


# ----- template helpers --------------------------------------------------------------------------


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    value = value if value.tzinfo else value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _fig(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def _href(url: str | None) -> str | None:
    """A link target only for http(s) URLs: a feed's `javascript:` link stays plain text."""
    if not url:
        return None
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        return None
    return url if scheme in ("http", "https") else None


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("kmd.daemon.console", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)  # fmt: skip
    env.filters.update(when=_when, fig=_fig, href=_href)
    return env


def _local_next(value: str | None) -> str:
    """Where to go after logging in: a console path only (no open redirect)."""
    if value and value.startswith(COOKIE_PATH) and not value.startswith("//") and "\\" not in value:
        return value
    return COOKIE_PATH


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303, headers=SECURITY_HEADERS)


MAX_FORM_BYTES = 16 * 1024
FORM_LIMITS = {"token": 4096, "name": 64, "csrf": 256, "next": 2000, "reason": 500}


async def _form(request: Request) -> dict[str, str]:
    """The console's forms: URL-encoded (what a plain HTML form sends), small, known fields.

    Parsed here rather than with FastAPI's `Form()`, which would add python-multipart, a
    parser for file uploads the console never takes.
    """
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return dict.fromkeys(FORM_LIMITS, "")  # not a form: no fields, so no CSRF token (403)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(413, f"a console form is at most {MAX_FORM_BYTES} bytes")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=20)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HTTPException(400, f"unreadable form: {exc}") from exc
    out = {}
    for name, limit in FORM_LIMITS.items():
        value = fields.get(name, [""])[0]
        if len(value) > limit:
            raise HTTPException(422, f"form field {name!r} is over {limit} characters")
        out[name] = value
    return out


Fields = Annotated[dict[str, str], Depends(_form)]


# ----- views of ledger rows ----------------------------------------------------------------------


@dataclass(frozen=True)
class EditView:
    edit: EditRecord
    fact: FactRecord | None
    figures: dict[str, Any]  # the probes recorded at commit, or those that caused the revert

    @property
    def relation(self) -> str:
        return self.fact.relation if self.fact else "?"


def _figures(edit: EditRecord, reverts: list | None = None) -> dict[str, Any]:
    if edit.probes:
        return edit.probes
    for revert in reverts or []:
        if revert.probes_before:
            return revert.probes_before
    return {}


def _claims_of(ledger: Any, fact: FactRecord) -> list[ClaimRecord]:
    claims = ledger.claims(fact_id=fact.id)
    if claims:
        return claims
    out = []
    for claim_id in fact.claim_ids:
        try:
            out.append(ledger.claim(claim_id))
        except LedgerError:
            pass
    return out


# ----- the router --------------------------------------------------------------------------------


def console_router(daemon: Service) -> APIRouter:
    router = APIRouter(prefix=COOKIE_PATH, include_in_schema=False)
    templates = Jinja2Templates(env=_environment())
    sessions = Sessions()
    throttle = LoginThrottle()
    answers = AnswerCache(daemon)

    def session_of(request: Request) -> Session | None:
        return sessions.find(request.cookies.get(COOKIE), daemon.api_token)

    def login_url(request: Request) -> str:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return f"{COOKIE_PATH}/login?next={quote(target, safe='')}"

    def viewer(request: Request) -> Session | None:
        """Who reads: a session or nobody; with `protect_reads`, nobody is sent to log in."""
        session = session_of(request)
        if daemon.settings.api.protect_reads and session is None and not token_ok(request):
            raise HTTPException(303, "log in to read the console", headers={"Location": login_url(request)})
        return session

    def caller_of(request: Request, session: Session | None) -> str:
        """Whose generation budget the page's answers spend (a session was opened with the token)."""
        return TOKEN_CALLER if session is not None or token_ok(request) else ANONYMOUS_CALLER

    def writer_session(request: Request, csrf: str) -> Session:
        session = session_of(request)
        if session is None:
            raise HTTPException(303, "log in to make changes", headers={"Location": login_url(request)})
        if not tokens_equal(csrf, session.csrf):
            raise HTTPException(403, "the form's CSRF token is missing or wrong: reload the page and try again")
        return session

    def render(request: Request, name: str, session: Session | None, *, status: int = 200, **context: Any) -> Response:
        ready, reason = daemon.readiness()
        base = {"session": session, "flash": session.take_flash() if session else [], "page": name.removesuffix(".html"),
                "ready": ready, "ready_reason": reason, "role": daemon.settings.cluster.role,
                "can_write": daemon.settings.cluster.role == "writer" and bool(daemon.api_token)}  # fmt: skip
        return templates.TemplateResponse(request, name, base | context, status_code=status, headers=SECURITY_HEADERS)

    # ----- static and login ------------------------------------------------------------------
    def not_found(request: Request, session: Session | None, kind: str, number: int) -> Response:
        """404 for an id the ledger does not have (one beyond its integers included)."""
        return render(request, "error.html", session, status=404, title=f"No such {kind}",
                      message=f"The ledger has no {kind} {number}.")  # fmt: skip

    @router.get("/static/console.css")
    def css() -> Response:
        text = (resources.files("kmd.daemon.console") / "static" / "console.css").read_text()
        return Response(text, media_type="text/css", headers={"Cache-Control": "max-age=3600"})

    @router.get("/login")
    def login_form(request: Request, next: str | None = None) -> Response:  # noqa: A002 - the query name
        import secrets

        nonce = secrets.token_urlsafe(24)
        response = render(request, "login.html", session_of(request), login_csrf=nonce, next=_local_next(next),
                          error=None, token_configured=bool(daemon.api_token))  # fmt: skip
        response.set_cookie(LOGIN_COOKIE, nonce, max_age=3600, path=COOKIE_PATH, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")  # fmt: skip
        return response

    @router.post("/login")
    def login(request: Request, form: Fields) -> Response:
        token, name, csrf, target = form["token"], form["name"], form["csrf"], _local_next(form["next"])

        def again(error: str, status: int) -> Response:
            return render(request, "login.html", None, status=status, login_csrf=request.cookies.get(LOGIN_COOKIE, ""),
                          next=target, error=error, token_configured=bool(daemon.api_token))  # fmt: skip

        address = request.client.host if request.client else "unknown"
        wait = throttle.retry_after(address)
        if wait is not None:  # too many wrong tokens lately: no more guesses for a while
            refused = again(f"Too many failed logins: try again in {wait} s.", 429)
            refused.headers["Retry-After"] = str(wait)
            return refused
        if not tokens_equal(csrf, request.cookies.get(LOGIN_COOKIE, "")):
            return again("The login form expired: please try again.", 403)
        if not daemon.api_token:
            return again("Writes are disabled: no API token is configured for this daemon.", 403)
        if not tokens_equal(token.strip(), daemon.api_token):
            throttle.failed(address)
            return again("That is not the API token.", 401)
        throttle.succeeded(address)
        name = name.strip()
        if name and not NAME_RE.match(name):
            return again("A name is 1-40 letters, digits or . _ @ -", 400)
        session = sessions.open(daemon.api_token, name or None)
        session.say("ok", f"Logged in; your changes are recorded as {session.actor}.")
        response = _redirect(target)
        response.set_cookie(COOKIE, session.id, path=COOKIE_PATH, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", max_age=int(sessions.ttl))  # fmt: skip
        response.delete_cookie(LOGIN_COOKIE, path=COOKIE_PATH)
        return response

    @router.post("/logout")
    def logout(request: Request, form: Fields) -> Response:
        session = writer_session(request, form["csrf"])
        sessions.close(session.id)
        response = _redirect(COOKIE_PATH)
        response.delete_cookie(COOKIE, path=COOKIE_PATH)
        return response

    # ----- pages -----------------------------------------------------------------------------
    @router.get("")
    @router.get("/")
    def overview(request: Request) -> Response:
        session = viewer(request)
        data = activity(daemon.ledger, min_loc=daemon.policy.probes.min_loc)
        return render(request, "overview.html", session, model=served_model_id(daemon), state=edit_state(daemon),
                      counts=daemon.ledger.counts(), per_day=per_day_chart(data), locality=locality_chart(data),
                      activity=data)  # fmt: skip

    @router.get("/pending")
    def pending(request: Request) -> Response:
        session = viewer(request)
        ledger = daemon.ledger
        quarantined = [(f, _claims_of(ledger, f)) for f in ledger.facts(status="quarantined", limit=MAX_ROWS)]
        blocked = [(f, _claims_of(ledger, f)) for f in ledger.facts(status="blocked", limit=MAX_ROWS)]
        groups: dict[tuple[str, str], list[ClaimRecord]] = {}
        for claim in ledger.claims(status="pending", limit=MAX_ROWS, newest_first=True):
            groups.setdefault((claim.subject, claim.relation), []).append(claim)
        return render(request, "pending.html", session, quarantined=quarantined, blocked=blocked, waiting=groups,
                      quorum=daemon.policy.verification.quorum)  # fmt: skip

    @router.get("/edits")
    def edits(request: Request, status: str = "", source: str = "", relation: str = "", limit: int = 100) -> Response:
        session = viewer(request)
        ledger = daemon.ledger
        status = status if status in EDIT_STATUSES else ""
        limit = max(1, min(limit, MAX_ROWS))
        facts: dict[int, FactRecord | None] = {}

        def fact(fact_id: int) -> FactRecord | None:
            if fact_id not in facts:
                try:
                    facts[fact_id] = ledger.fact(fact_id)
                except LedgerError:
                    facts[fact_id] = None
            return facts[fact_id]

        rows: list[EditView] = []
        for edit in ledger.edits(status=status or None, limit=SCAN_EDITS, newest_first=True):
            if source and source not in edit.sources:
                continue
            f = fact(edit.fact_id)
            if relation and (f is None or f.relation != relation):
                continue
            rows.append(EditView(edit, f, _figures(edit, ledger.reverts(edit_id=edit.id) if not edit.probes else None)))
            if len(rows) >= limit:
                break
        sources = sorted({s.id for s in daemon.policy.sources} | ({source} if source else set()))
        relations = sorted(set(daemon.policy.relations) | ({relation} if relation else set()))
        return render(request, "edits.html", session, rows=rows, statuses=EDIT_STATUSES, sources=sources,
                      relations=relations, chosen={"status": status, "source": source, "relation": relation},
                      limit=limit, scanned=SCAN_EDITS)  # fmt: skip

    @router.get("/edits/{edit_id}")
    def edit_page(request: Request, edit_id: int) -> Response:
        session = viewer(request)
        ledger = daemon.ledger
        try:
            edit = ledger.edit(edit_id)
        except LedgerError:
            return not_found(request, session, "edit", edit_id)
        try:
            fact = ledger.fact(edit.fact_id)
        except LedgerError:
            fact = None
        reverts = ledger.reverts(edit_id=edit_id)
        target = edit.edit_request.target
        prompts = [edit.edit_request.prompt, *edit.edit_request.rephrases]
        prompts = [p for p in prompts if p][:MAX_PROMPTS_PER_EDIT]
        pairs: list[Pair] = []
        busy = None
        try:
            pairs = answers.pairs(prompts, caller_of(request, session))
        except ModelBusy as exc:
            busy = str(exc)
        active = editor_key(edit_id) in daemon.active_edit_ids()
        return render(request, "edit.html", session, edit=edit, fact=fact, claims=_claims_of(ledger, fact) if fact else [],
                      reverts=reverts, events=ledger.events(entity="edit", entity_id=edit_id), figures=_figures(edit, reverts),
                      pairs=[(p, hits(p.base_line, target), hits(p.edited_line, target)) for p in pairs], busy=busy,
                      target=target, active=active)  # fmt: skip

    @router.get("/reverts")
    def reverts(request: Request, limit: int = 100) -> Response:
        session = viewer(request)
        ledger = daemon.ledger
        rows = []
        for revert in ledger.reverts(limit=max(1, min(limit, MAX_ROWS))):
            try:
                edit = ledger.edit(revert.edit_id)
            except LedgerError:
                edit = None
            before = revert.probes_before or {}
            failing = list(before.get("failures") or []) or [revert.reason]
            rows.append({"revert": revert, "edit": edit, "failing": failing, "before": before,
                         "after": revert.probes_after or {}})  # fmt: skip
        # The answer the served model gives now to each reverted edit's prompt (newest ones).
        prompts = [r["edit"].edit_request.prompt for r in rows[:ANSWERED_REVERTS] if r["edit"]]
        busy = None
        served: dict[str, Pair] = {}
        try:
            served = {p.prompt: p for p in answers.pairs(list(dict.fromkeys(p for p in prompts if p)), caller_of(request, session))}
        except ModelBusy as exc:
            busy = str(exc)
        for r in rows:
            pair = served.get(r["edit"].edit_request.prompt) if r["edit"] else None
            r["answer"] = pair.edited_line if pair else None
            r["hit"] = bool(pair) and hits(pair.edited_line, r["edit"].edit_request.target)
        return render(request, "reverts.html", session, rows=rows, busy=busy, answered=ANSWERED_REVERTS)

    @router.get("/chain")
    def chain(request: Request) -> Response:
        session = viewer(request)
        report = daemon.ledger.verify_chain()
        newest = list(reversed(daemon.ledger.events()[-50:]))
        return render(request, "chain.html", session, report=report, events=newest)

    # ----- writes ----------------------------------------------------------------------------
    def decide(request: Request, fact_id: int, csrf: str, reason: str, approve: bool) -> Response:
        session = writer_session(request, csrf)
        target = f"{COOKIE_PATH}/pending"
        if daemon.settings.cluster.role != "writer":
            session.say("error", "This is a serving replica: approve and reject in the writer's console.")
            return _redirect(target)
        try:
            daemon.ledger.fact(fact_id)
        except LedgerError:
            return not_found(request, session, "fact", fact_id)
        reason = reason.strip() or ("approved in the console" if approve else "rejected in the console")
        try:
            if approve:
                fact = daemon.ledger.approve(fact_id, actor=session.actor, reason=reason)
                session.say("ok", f"Fact {fact.id} ({fact.subject} / {fact.relation} -> {fact.object}) approved: "
                                  "the next edit cycle applies it.")  # fmt: skip
            else:
                fact = daemon.ledger.reject(fact_id, actor=session.actor, reason=reason)
                session.say("ok", f"Fact {fact.id} ({fact.subject} / {fact.relation} -> {fact.object}) rejected.")
        except LedgerError as exc:
            session.say("error", str(exc))
        return _redirect(target)

    @router.post("/facts/{fact_id}/approve")
    def approve(request: Request, fact_id: int, form: Fields) -> Response:
        return decide(request, fact_id, form["csrf"], form["reason"], approve=True)

    @router.post("/facts/{fact_id}/reject")
    def reject(request: Request, fact_id: int, form: Fields) -> Response:
        return decide(request, fact_id, form["csrf"], form["reason"], approve=False)

    @router.post("/edits/{edit_id}/revert")
    def revert(request: Request, edit_id: int, form: Fields) -> Response:
        session = writer_session(request, form["csrf"])
        reason = form["reason"]
        target = f"{COOKIE_PATH}/edits/{edit_id}"
        try:
            reverter = daemon.reverter()
        except ReplicaError:
            session.say("error", "This is a serving replica: revert edits in the writer's console.")
        except NotServingError:
            session.say("error", "The daemon is still starting: the model and state are not loaded yet.")
        else:
            try:
                daemon.ledger.edit(edit_id)
            except LedgerError:
                return not_found(request, session, "edit", edit_id)
            try:
                result = reverter.revert(edit_id, reason=reason.strip() or "reverted in the console", actor=session.actor)
                session.say("ok", f"Edit {edit_id} reverted; locality {_fig(result['before'].get('loc'), 4)} -> "
                                  f"{_fig(result['after'].get('loc'), 4)}.")  # fmt: skip
            except KeyError as exc:
                session.say("error", str(exc.args[0]))
        return _redirect(target)

    return router
