"""The safe fetcher against a real HTTP server on loopback."""

from __future__ import annotations

import gzip
import ipaddress

import pytest

from intake.helpers import Route, atom
from kmd.sources.config import FetchLimits, NetworkPolicy
from kmd.sources.net import FetchError, ForbiddenAddress, SafeFetcher, TooLarge, address_allowed

LOOPBACK = NetworkPolicy(allow_networks=(ipaddress.ip_network("127.0.0.0/8"),))
LIMITS = FetchLimits(connect_timeout=2, read_timeout=2, total_timeout=5, max_bytes=10_000, max_redirects=2)


@pytest.fixture
def fetcher():
    with SafeFetcher() as f:
        yield f


def test_plain_fetch_and_conditional_get(server, fetcher):
    body = atom([{"subject": "France", "relation": "capital", "object": "Paris"}])
    server.routes["/feed"] = Route(body, etag='"v1"', last_modified="Wed, 01 Jan 2025 00:00:00 GMT")
    first = fetcher.fetch(server.url("/feed"), limits=LIMITS, network=LOOPBACK)
    assert first.status == 200 and first.body == body
    assert first.etag == '"v1"' and first.last_modified == "Wed, 01 Jan 2025 00:00:00 GMT"
    second = fetcher.fetch(server.url("/feed"), limits=LIMITS, network=LOOPBACK, etag=first.etag,
                           last_modified=first.last_modified)  # fmt: skip
    assert second.not_modified and second.body == b""
    headers = server.requests[-1][1]
    assert headers["if-none-match"] == '"v1"' and headers["if-modified-since"].startswith("Wed, 01 Jan 2025")


def test_loopback_is_refused_unless_the_policy_allows_it(server, fetcher):
    server.routes["/feed"] = Route(b"x")
    with pytest.raises(ForbiddenAddress, match="not a public address"):
        fetcher.fetch(server.url("/feed"), limits=LIMITS, network=NetworkPolicy())
    only_other = NetworkPolicy(allow_networks=(ipaddress.ip_network("10.0.0.0/8"),))
    with pytest.raises(ForbiddenAddress):
        fetcher.fetch(server.url("/feed"), limits=LIMITS, network=only_other)
    assert server.hits("/feed") == 0  # refused before connecting


@pytest.mark.parametrize(
    "target",
    ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", "http://[::1]:1/", "http://0.0.0.0/",
     "http://167772161/", "http://[::ffff:192.168.0.1]/"],
)  # fmt: skip
def test_redirect_to_a_forbidden_address_is_refused(server, fetcher, target):
    server.routes["/feed"] = Route(status=302, headers={"Location": target})
    with pytest.raises(ForbiddenAddress):
        fetcher.fetch(server.url("/feed"), limits=LIMITS, network=LOOPBACK)
    assert server.hits("/feed") == 1


def test_redirects_are_followed_within_the_cap(server, fetcher):
    server.routes["/a"] = Route(status=301, headers={"Location": "/b"})
    server.routes["/b"] = Route(status=307, headers={"Location": server.url("/c")})
    server.routes["/c"] = Route(b"done")
    result = fetcher.fetch(server.url("/a"), limits=LIMITS, network=LOOPBACK)
    assert result.body == b"done" and result.url.endswith("/c")
    server.routes["/c"] = Route(status=302, headers={"Location": "/d"})
    server.routes["/d"] = Route(b"too far")
    with pytest.raises(FetchError, match="more than 2 redirects"):
        fetcher.fetch(server.url("/a"), limits=LIMITS, network=LOOPBACK)
    assert server.hits("/d") == 0


def test_redirect_to_another_scheme_is_refused(server, fetcher):
    server.routes["/feed"] = Route(status=302, headers={"Location": "file:///etc/passwd"})
    with pytest.raises(FetchError, match="only http and https"):
        fetcher.fetch(server.url("/feed"), limits=LIMITS, network=LOOPBACK)


def test_oversized_bodies_are_cut_off(server, fetcher):
    server.routes["/declared"] = Route(b"x" * 20_000)  # Content-Length over the cap
    with pytest.raises(TooLarge, match="Content-Length"):
        fetcher.fetch(server.url("/declared"), limits=LIMITS, network=LOOPBACK)
    server.routes["/chunked"] = Route(b"y" * 4_096, chunks=1_000)  # 4 MB, no Content-Length
    with pytest.raises(TooLarge, match="read stopped"):
        fetcher.fetch(server.url("/chunked"), limits=LIMITS, network=LOOPBACK)
    bomb = gzip.compress(b"\0" * 5_000_000)  # ~5 kB on the wire, 5 MB decoded
    server.routes["/bomb"] = Route(bomb, headers={"Content-Encoding": "gzip"})
    with pytest.raises(TooLarge):
        fetcher.fetch(server.url("/bomb"), limits=LIMITS, network=LOOPBACK)


def test_slow_server_times_out(server, fetcher):
    server.routes["/slow"] = Route(b"late", delay=1.5)
    limits = LIMITS.model_copy(update={"read_timeout": 0.3})
    with pytest.raises(FetchError, match="timed out"):
        fetcher.fetch(server.url("/slow"), limits=limits, network=LOOPBACK)


def test_http_errors_and_bad_urls(server, fetcher):
    server.routes["/err"] = Route(b"oops", status=500)
    with pytest.raises(FetchError, match="HTTP 500"):
        fetcher.fetch(server.url("/err"), limits=LIMITS, network=LOOPBACK)
    with pytest.raises(FetchError, match="HTTP 404"):
        fetcher.fetch(server.url("/missing"), limits=LIMITS, network=LOOPBACK)
    with pytest.raises(FetchError, match="only http and https"):
        fetcher.fetch("ftp://example.org/feed", limits=LIMITS, network=LOOPBACK)


def test_connection_is_pinned_to_the_checked_address(server):
    """The name is resolved once, by us; the request goes to that address with the real Host."""
    calls = []

    def resolver(host, port):
        calls.append(host)
        return ["127.0.0.1"]

    server.routes["/feed"] = Route(b"pinned")
    with SafeFetcher(resolver=resolver) as f:
        result = f.fetch(f"http://feeds.test:{server.port}/feed", limits=LIMITS, network=LOOPBACK)
    assert result.body == b"pinned" and calls == ["feeds.test"]
    assert server.requests[-1][1]["host"] == f"feeds.test:{server.port}"


def test_any_forbidden_resolved_address_refuses_the_host(server):
    # DNS rebinding: one public and one private answer must not pass.
    with SafeFetcher(resolver=lambda h, p: ["93.184.216.34", "127.0.0.1"]) as f:
        with pytest.raises(ForbiddenAddress):
            f.fetch("http://rebind.test/feed", limits=LIMITS, network=NetworkPolicy())


@pytest.mark.parametrize(
    ("address", "allowed"),
    [("8.8.8.8", True), ("2606:4700:4700::1111", True), ("10.1.2.3", False), ("172.16.0.1", False),
     ("192.168.1.1", False), ("127.0.0.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
     ("0.0.0.0", False), ("224.0.0.1", False), ("255.255.255.255", False), ("::1", False), ("fe80::1", False),
     ("fc00::1", False), ("::ffff:127.0.0.1", False), ("::", False)],
)  # fmt: skip
def test_address_classification(address, allowed):
    assert address_allowed(ipaddress.ip_address(address), NetworkPolicy()) is allowed


def test_policy_exception_covers_mapped_addresses():
    assert address_allowed(ipaddress.ip_address("::ffff:127.0.0.1"), LOOPBACK)
    assert not address_allowed(ipaddress.ip_address("::1"), LOOPBACK)


def _tls_server(tmp_path, name: str):
    """An HTTPS server on loopback with a certificate for `name`, and a context trusting it."""
    import datetime as dt
    import http.server
    import ssl
    import threading

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = f"hello from {self.headers['Host']}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    httpd.socket = server_ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    client_ctx = ssl.create_default_context(cadata=cert_pem.decode())
    return httpd, client_ctx


def test_https_is_pinned_to_the_checked_address_and_keeps_the_name(tmp_path):
    httpd, ctx = _tls_server(tmp_path, "feeds.test")
    port = httpd.server_address[1]
    try:
        with SafeFetcher(resolver=lambda h, p: ["127.0.0.1"], verify=ctx) as f:
            result = f.fetch(f"https://feeds.test:{port}/feed", limits=LIMITS, network=LOOPBACK)
            assert result.body == f"hello from feeds.test:{port}".encode()
        # The certificate is still checked against the name, not the pinned address.
        with SafeFetcher(resolver=lambda h, p: ["127.0.0.1"], verify=ctx) as f:
            with pytest.raises(FetchError, match="(?i)certificate|hostname"):
                f.fetch(f"https://other.test:{port}/feed", limits=LIMITS, network=LOOPBACK)
    finally:
        httpd.shutdown()
        httpd.server_close()
