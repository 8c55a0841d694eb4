"""Helpers for the intake tests: a loopback HTTP server, a fake clock and encoder, policies, feeds."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl

import numpy as np
from kmd.daemon.policy import Policy, parse_policy
from kmd.sources.claims import normalize_text


@dataclass
class Route:
    """What the server answers on one path."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    etag: str | None = None  # answer 304 when If-None-Match matches
    last_modified: str | None = None
    chunks: int = 1  # send the body this many times, chunked (no Content-Length)
    delay: float = 0.0  # seconds before the body


class LoopbackServer:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        # path without the query -> what to answer for its query parameters (an API)
        self.apis: dict[str, Callable[[dict[str, str]], Route]] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []  # (path, headers)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                server.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                route = server.routes.get(self.path)
                base, _, query = self.path.partition("?")
                if route is None and base in server.apis:
                    route = server.apis[base](dict(parse_qsl(query, keep_blank_values=True)))
                if route is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if route.etag and self.headers.get("If-None-Match") == route.etag:
                    self.send_response(304)
                    self.send_header("ETag", route.etag)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(route.status)
                for k, v in route.headers.items():
                    self.send_header(k, v)
                if route.etag:
                    self.send_header("ETag", route.etag)
                if route.last_modified:
                    self.send_header("Last-Modified", route.last_modified)
                try:
                    if route.chunks > 1:
                        self.send_header("Transfer-Encoding", "chunked")
                        self.end_headers()
                        for _ in range(route.chunks):
                            self.wfile.write(f"{len(route.body):x}\r\n".encode() + route.body + b"\r\n")
                        self.wfile.write(b"0\r\n\r\n")
                    else:
                        self.send_header("Content-Length", str(len(route.body)))
                        self.end_headers()
                        if route.delay:
                            import time

                            time.sleep(route.delay)
                        self.wfile.write(route.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading: that is what the caps are for

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def hits(self, path: str) -> int:
        return sum(1 for p, _ in self.requests if p == path)




class Clock:
    """A settable clock for the ledger, intake and verifier."""

    def __init__(self, start: datetime | None = None):
        self.now = start or datetime(2025, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)




class SynonymEncoder:
    """A fake `TextEncoder`: texts in one synonym group embed identically, others orthogonally."""

    def __init__(self, groups: list[list[str]] = ()):  # type: ignore[assignment]
        self.index = {normalize_text(t): i for i, group in enumerate(groups) for t in group}
        self.calls = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), 256), dtype=np.float32)
        for row, text in enumerate(texts):
            slot = self.index.get(normalize_text(text), 64 + hash(normalize_text(text)) % 192)
            out[row, slot] = 1.0
        return out


BASE_POLICY = """\
version: test-1
backend: fake
relations:
  capital:
    prompt: "The capital of {subject} is"
    paraphrases: ["{subject}'s capital city is"]
  head_of_state:
    prompt: "The head of state of {subject} is"
  ceo:
    prompt: "The chief executive of {subject} is"
verification:
  quorum: 2
  single_source_trust: high
  similarity_threshold: 0.85
  sensitive_relations: [head_of_state]
"""


def make_policy(sources_yaml: str, extra: str = "") -> Policy:
    """A policy with the test relations and the given `sources:` list (YAML, indented 2)."""
    return parse_policy(BASE_POLICY + extra + "sources:\n" + sources_yaml, name="test-policy.yaml")




def atom(entries: list[dict[str, str]], *, prefix: str = "kf") -> bytes:
    """An Atom feed whose entries state facts in the kmd fact namespace."""
    items = []
    for i, e in enumerate(entries):
        fact = "".join(
            f"<{prefix}:{k}>{_esc(e[k])}</{prefix}:{k}>" for k in ("subject", "relation", "object", "observed") if k in e
        )
        items.append(
            f"<entry><id>{_esc(e.get('id', f'urn:e{i}'))}</id><title>{_esc(e.get('title', f'entry {i}'))}</title>"
            f"<updated>{e.get('updated', '2024-12-01T00:00:00Z')}</updated>"
            f"<link href=\"https://example.org/e{i}\"/>{fact}</entry>"
        )
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<feed xmlns="http://www.w3.org/2005/Atom" xmlns:{prefix}="urn:kmd:fact:1">'
        "<title>test</title><id>urn:feed</id><updated>2024-12-01T00:00:00Z</updated>" + "".join(items) + "</feed>"
    ).encode()


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
