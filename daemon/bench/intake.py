"""Intake benchmark: FEEDS x ENTRIES Atom feeds served on 127.0.0.1, ingested and verified.

    python -m kmd.daemon.bench.intake [--feeds 100] [--entries 100] [--workers 8] [--encoder minilm]
    kmd intake bench ...                      (the same)

Feeds come in pairs that state the same facts: the first in plain form ("Novar City"), the
second in another surface form for half of them ("Novar City, Aldoria": needs the encoder)
and an exact-normalisation variant for the rest ("novar city."). So every fact meets a
quorum of two independent sources, and verification exercises both matching paths. The
bench policy's similarity threshold is 0.8: MiniLM scores these made-up names with a country
appended at 0.82-0.90 against the bare name.

Measured:
  ingestion     poll every feed once through the real intake (SSRF-checked fetch over HTTP,
                feedparser, claim extraction, ledger insert with hash-chained events)
  revalidation  the same polls again: every feed answers 304 Not Modified
  verification  `Verifier.run()` over all claims with the chosen encoder (model load excluded)
  verify-chain  the ledger's full tamper check afterwards
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from loguru import logger

__all__ = ["main", "run_bench"]

_SYLLABLES = ["no", "var", "al", "do", "ri", "ka", "mel", "tor", "sa", "ven", "lu", "bre", "gan", "te", "os", "mir"]


def _name(i: int, parts: int = 3) -> str:
    out = ""
    for _ in range(parts):
        out += _SYLLABLES[i % len(_SYLLABLES)]
        i //= len(_SYLLABLES)
    return out.capitalize()


def _feed_xml(feed: int, entries: int) -> bytes:
    pair, variant = divmod(feed, 2)
    items = []
    for j in range(entries):
        n = pair * entries + j
        country, city = f"{_name(n)}ia {n}", f"{_name(n * 7 + 3)} City"
        obj = city
        if variant == 1:
            obj = f"{city}, {_name(n)}ia" if j % 2 == 0 else f"{city.lower()}."
        items.append(
            f"<entry><id>urn:bench:{feed}:{j}</id><title>{country} capital</title>"
            f"<updated>2024-12-01T00:00:00Z</updated><link href=\"https://bench.invalid/{feed}/{j}\"/>"
            f"<kf:subject>{country}</kf:subject><kf:relation>capital</kf:relation><kf:object>{obj}</kf:object>"
            "</entry>"
        )
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n<feed xmlns="http://www.w3.org/2005/Atom" xmlns:kf="urn:kmd:fact:1">'
        f"<title>bench {feed}</title><id>urn:bench:{feed}</id><updated>2024-12-01T00:00:00Z</updated>"
        + "".join(items) + "</feed>"
    ).encode()  # fmt: skip


def _serve(bodies: dict[str, bytes]) -> tuple[ThreadingHTTPServer, int]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            body = bodies.get(self.path)
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            etag = f'"{hash(body) & 0xFFFFFFFF:x}"'
            if self.headers.get("If-None-Match") == etag:
                self.send_response(304)
                self.send_header("ETag", etag)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/atom+xml")
            self.send_header("ETag", etag)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, server.server_address[1]


def _policy_text(feeds: int, port: int) -> str:
    sources = "".join(
        f"""  - id: feed{i:03d}
    kind: feed
    location: http://127.0.0.1:{port}/feed/{i}
    trust: medium
    relations: [capital]
    poll_interval: 1s
    rate_limit: {{max_claims: 1000000, per: 1h}}
    network: {{allow_networks: ["127.0.0.0/8"]}}
    independent_of: ["*"]   # 100 publishers simulated on one loopback host
"""
        for i in range(feeds)
    )
    return f"""version: bench-1
backend: fake
relations:
  capital:
    prompt: "The capital of {{subject}} is"
    paraphrases: ["{{subject}}'s capital city is"]
verification:
  quorum: 2
  single_source_trust: null
  similarity_threshold: 0.8
sources:
{sources}"""


def _cpu() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores available"


class _Timed:
    """Wraps an encoder to count the texts it encodes and the time it takes."""

    def __init__(self, inner):  # noqa: ANN001 - any TextEncoder
        self.inner, self.texts, self.seconds = inner, 0, 0.0

    def encode(self, texts):  # noqa: ANN001, ANN201
        start = time.perf_counter()
        try:
            return self.inner.encode(texts)
        finally:
            self.texts += len(texts)
            self.seconds += time.perf_counter() - start


def run_bench(*, feeds: int = 100, entries: int = 100, workers: int = 8, encoder: str = "minilm",
              db: str | None = None, command: str | None = None) -> dict[str, float]:  # fmt: skip
    from kmd.daemon.ledger import Ledger
    from kmd.daemon.matching import MiniLMEncoder, NgramEncoder, ObjectMatcher
    from kmd.daemon.policy import parse_policy
    from kmd.daemon.verify import Verifier
    from kmd.daemon.intake import intake_for

    bodies = {f"/feed/{i}": _feed_xml(i, entries) for i in range(feeds)}
    server, port = _serve(bodies)
    policy = parse_policy(_policy_text(feeds, port), name="bench-policy.yaml")
    tmp = tempfile.TemporaryDirectory(prefix="kmd-bench-")
    url = db or f"sqlite:///{tmp.name}/ledger.db"
    ledger = Ledger(url)
    figures: dict[str, float] = {}
    try:
        with intake_for(policy, ledger) as intake:
            t0 = time.perf_counter()
            reports = intake.poll_many(list(intake.sources), max_workers=workers)
            figures["ingest_s"] = time.perf_counter() - t0
            figures["claims"] = sum(r.new_claims for r in reports)
            figures["refused"] = sum(r.refused for r in reports)
            t0 = time.perf_counter()
            again = intake.poll_many(list(intake.sources), max_workers=workers)
            figures["revalidate_s"] = time.perf_counter() - t0
            figures["not_modified"] = sum(r.not_modified for r in again)

        enc = _Timed(MiniLMEncoder(device="cpu") if encoder == "minilm" else NgramEncoder())
        t0 = time.perf_counter()
        enc.encode(["warm up"])  # loads the model; not part of verification throughput
        figures["encoder_load_s"] = time.perf_counter() - t0
        enc.texts, enc.seconds = 0, 0.0
        matcher = ObjectMatcher(enc, policy.verification.similarity_threshold)
        t0 = time.perf_counter()
        report = Verifier(policy, ledger, matcher).run()
        figures["verify_s"] = time.perf_counter() - t0
        figures["facts"] = len(report.new_facts)
        figures["encoded"], figures["encode_s"] = enc.texts, enc.seconds
        figures["waiting"] = report.waiting
        t0 = time.perf_counter()
        chain = ledger.verify_chain()
        figures["chain_s"] = time.perf_counter() - t0
        figures["chain_events"] = chain.events
        figures["chain_ok"] = float(chain.ok)
    finally:
        ledger.close()
        server.shutdown()
        server.server_close()
        tmp.cleanup()

    total_entries = feeds * entries
    total_bytes = sum(len(b) for b in bodies.values())
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    lines = [
        f"machine: {_cpu()}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end; Python {platform.python_version()}; {platform.system()} {platform.release()}",
        f"command: {command or 'run_bench()'}  (feeds={feeds}, entries={entries}, "
        f"workers={workers}, encoder={encoder}, db={'given' if db else 'temporary SQLite file'})",
        f"ingestion: {feeds} feeds x {entries} entries ({total_bytes / 1e6:.1f} MB) -> {int(figures['claims'])} claims "
        f"in {figures['ingest_s']:.2f} s = {total_entries / figures['ingest_s']:.0f} entries/s, "
        f"{feeds / figures['ingest_s']:.1f} feeds/s ({int(figures['refused'])} refused)",
        f"revalidation: {int(figures['not_modified'])}/{feeds} feeds 304 Not Modified in {figures['revalidate_s']:.2f} s",
        f"verification: {int(figures['claims'])} claims -> {int(figures['facts'])} facts in {figures['verify_s']:.2f} s "
        f"= {figures['claims'] / figures['verify_s']:.0f} claims verified/s (encoder load {figures['encoder_load_s']:.1f} s "
        f"excluded; {int(figures['waiting'])} still waiting); of which encoding {int(figures['encoded'])} distinct "
        f"objects took {figures['encode_s']:.2f} s",
        f"verify-chain: {int(figures['chain_events'])} events checked in {figures['chain_s']:.2f} s "
        f"({'ok' if figures['chain_ok'] else 'FAILED'})",
    ]  # fmt: skip
    for line in lines:
        print(line)  # the benchmark's report is its output
    return figures


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kmd.daemon.bench.intake", description=__doc__.split("\n\n")[0])
    parser.add_argument("--feeds", type=int, default=100)
    parser.add_argument("--entries", type=int, default=100)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--encoder", choices=["minilm", "ngram"], default="minilm")
    parser.add_argument("--db", default=None)
    args = parser.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    command = " ".join(["python -m kmd.daemon.bench.intake", *(argv if argv is not None else sys.argv[1:])])
    run_bench(feeds=args.feeds, entries=args.entries, workers=args.workers, encoder=args.encoder, db=args.db,
              command=command)  # fmt: skip


if __name__ == "__main__":
    main()
