"""Fetching untrusted URLs safely: SSRF checks, redirect cap, size and time limits.

`SafeFetcher.fetch` is the only way kmd reads a URL. For every hop (the first request and
each redirect) it:

1. accepts only http and https URLs;
2. resolves the host itself and refuses if *any* resolved address is private, loopback,
   link-local, reserved, multicast, unspecified or otherwise not globally routable, unless
   the address is inside a network the source's policy explicitly allows;
3. connects to the checked address (the URL's host is replaced by the IP; the Host header
   and TLS SNI/certificate check keep the original name), so a second DNS answer cannot
   swap in another address between check and connect (no DNS-rebinding TOCTOU);
4. follows redirects by hand, at most `max_redirects`, re-running all checks per hop;
5. streams the body and stops past `max_bytes` (after content decoding, so a compressed
   bomb stops too) or past `total_timeout`; connect/read timeouts bound each wait.

Keep-alive is off: connections are keyed by IP once pinned, and a kept-alive TLS connection
opened for one host name must never carry a request for another.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urljoin

import httpx
from loguru import logger

from kmd.sources.config import FetchLimits, NetworkPolicy

__all__ = [
    "FetchError",
    "FetchResult",
    "Fetcher",
    "ForbiddenAddress",
    "HttpStatusError",
    "Resolver",
    "SafeFetcher",
    "TooLarge",
    "address_allowed",
    "system_resolver",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]  # (host, port) -> IP address strings

_REDIRECTS = {301, 302, 303, 307, 308}


class FetchError(Exception):
    """A fetch that produced nothing usable; the message says why."""


class ForbiddenAddress(FetchError):
    """The URL resolves to an address the policy does not allow."""


class TooLarge(FetchError):
    """The body is larger than the policy's cap."""


class HttpStatusError(FetchError):
    """The server answered with a status other than 200, 304 or a redirect.

    `retry_after` is the server's Retry-After in seconds (delta form only), for callers that
    back off on 429 and 503 (kmd.sources.wikidata)."""

    def __init__(self, message: str, status: int, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    try:
        seconds = float(value) if value is not None else None
    except ValueError:  # the HTTP-date form: callers fall back to their own backoff
        return None
    return seconds if seconds is not None and 0 <= seconds < float("inf") else None


@dataclass(frozen=True)
class FetchResult:
    url: str  # the final URL after redirects
    status: int  # 200 (body read) or 304 (not modified, body empty)
    body: bytes
    etag: str | None
    last_modified: str | None

    @property
    def not_modified(self) -> bool:
        return self.status == 304


class Fetcher(Protocol):
    """Anything that fetches a URL under limits; `SafeFetcher` is the real one."""

    def fetch(
        self,
        url: str,
        *,
        limits: FetchLimits,
        network: NetworkPolicy,
        etag: str | None = None,
        last_modified: str | None = None,
    ) -> FetchResult: ...


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))  # unique, resolver order


def address_allowed(address: IPAddress, network: NetworkPolicy) -> bool:
    """True if the address is globally routable or inside a network the policy allows."""
    candidates = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        candidates.append(address.ipv4_mapped)  # ::ffff:127.0.0.1 is loopback too
    for addr in candidates:
        if any(addr.version == net.version and addr in net for net in network.allow_networks):
            return True
    return not any(
        a.is_private
        or a.is_loopback
        or a.is_link_local
        or a.is_reserved
        or a.is_multicast
        or a.is_unspecified
        or not a.is_global
        for a in candidates
    )


class SafeFetcher:
    """The httpx-based `Fetcher`. One instance can be shared by threads."""

    def __init__(
        self,
        resolver: Resolver = system_resolver,
        *,
        verify: ssl.SSLContext | bool = True,  # a context trusting a private CA, for intranet feeds
        transport: httpx.BaseTransport | None = None,
    ):
        self._resolve = resolver
        self._client = httpx.Client(
            follow_redirects=False,  # redirects are followed by hand, each hop re-checked
            limits=httpx.Limits(max_keepalive_connections=0),
            verify=verify,
            transport=transport,
            trust_env=False,  # no proxies or netrc from the environment: we pin addresses
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> SafeFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fetch(
        self,
        url: str,
        *,
        limits: FetchLimits,
        network: NetworkPolicy,
        etag: str | None = None,
        last_modified: str | None = None,
    ) -> FetchResult:
        deadline = time.monotonic() + limits.total_timeout
        timeout = httpx.Timeout(
            connect=limits.connect_timeout, read=limits.read_timeout, write=limits.read_timeout, pool=limits.connect_timeout
        )
        headers = {"User-Agent": limits.user_agent, "Accept-Encoding": "gzip, deflate"}
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        current = url
        for hop in range(limits.max_redirects + 1):
            if time.monotonic() > deadline:
                raise FetchError(f"{current}: took longer than {limits.total_timeout:g}s")
            target, host_header, sni = self._checked_target(current, network)
            request = self._client.build_request(
                "GET",
                target,
                headers={**headers, "Host": host_header},
                timeout=timeout,
                # TLS keeps the real name for SNI and certificate checks while the
                # TCP connection goes to the address we checked.
                extensions={"sni_hostname": sni} if sni else None,
            )
            try:
                response = self._client.send(request, stream=True)
            except httpx.TimeoutException as exc:
                raise FetchError(f"{current}: timed out ({type(exc).__name__})") from None
            except httpx.HTTPError as exc:
                raise FetchError(f"{current}: {type(exc).__name__}: {exc}") from None
            try:
                if response.status_code in _REDIRECTS:
                    location = response.headers.get("Location")
                    if not location:
                        raise FetchError(f"{current}: redirect without Location")
                    nxt = urljoin(current, location)
                    logger.debug("redirect {} -> {} (hop {})", current, nxt, hop + 1)
                    current = nxt
                    continue
                if response.status_code == 304:
                    return FetchResult(current, 304, b"", etag, last_modified)
                if response.status_code != 200:
                    raise HttpStatusError(f"{current}: HTTP {response.status_code}", response.status_code,
                                          _retry_after(response.headers.get("Retry-After")))
                body = self._read_capped(response, limits, deadline, current)
                return FetchResult(
                    current,
                    200,
                    body,
                    response.headers.get("ETag"),
                    response.headers.get("Last-Modified"),
                )
            finally:
                response.close()
        raise FetchError(f"{url}: more than {limits.max_redirects} redirects")

    def _checked_target(self, url: str, network: NetworkPolicy) -> tuple[str, str, str | None]:
        """Resolve and check one hop; returns (URL pinned to the checked IP, Host header, SNI)."""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise FetchError(f"{url!r}: invalid URL: {exc}") from None
        if parsed.scheme not in ("http", "https"):
            raise FetchError(f"{url}: only http and https URLs are fetched")
        host = parsed.raw_host.decode("ascii")  # IDNA-encoded; IPv6 without brackets
        if not host:
            raise FetchError(f"{url}: no host")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            resolved = self._resolve(host, port)
        except OSError as exc:
            raise FetchError(f"{url}: cannot resolve {host}: {exc}") from None
        if not resolved:
            raise FetchError(f"{url}: {host} has no address")
        addresses: list[IPAddress] = []
        for text in resolved:
            addr = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 scope id
            if not address_allowed(addr, network):
                raise ForbiddenAddress(
                    f"{url}: {host} resolves to {addr}, which is not a public address and not allowed by the policy"
                )
            addresses.append(addr)
        pinned = parsed.copy_with(host=str(addresses[0]))
        host_header = host if parsed.port is None else f"{host}:{parsed.port}"
        if ":" in host and parsed.port is None:  # an IPv6 literal keeps its brackets
            host_header = f"[{host}]"
        elif ":" in host:
            host_header = f"[{host}]:{parsed.port}"
        return str(pinned), host_header, host if parsed.scheme == "https" else None

    @staticmethod
    def _read_capped(response: httpx.Response, limits: FetchLimits, deadline: float, url: str) -> bytes:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limits.max_bytes:
            raise TooLarge(f"{url}: Content-Length {declared} exceeds the {limits.max_bytes}-byte cap")
        chunks: list[bytes] = []
        total = 0
        try:
            for chunk in response.iter_bytes():
                total += len(chunk)
                if total > limits.max_bytes:
                    raise TooLarge(f"{url}: body exceeds the {limits.max_bytes}-byte cap; read stopped")
                if time.monotonic() > deadline:
                    raise FetchError(f"{url}: took longer than {limits.total_timeout:g}s; read stopped")
                chunks.append(chunk)
        except httpx.TimeoutException:
            raise FetchError(f"{url}: read timed out") from None
        except httpx.HTTPError as exc:
            raise FetchError(f"{url}: {type(exc).__name__}: {exc}") from None
        return b"".join(chunks)
