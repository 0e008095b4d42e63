"""Name resolution and the connection it leads to: one lookup, one check, one connect.

Every TCP connection the download clients open goes through ``pin_backend``'s network
backend (``_PinnedBackend``, ``_AsyncPinnedBackend``), installed over fetch's deadline
backend (so each address tried is connected to within the deadline)::

    httpcore asks: connect to (host, port)
      └─ lookup, once: HttpSettings.resolver, else the system's getaddrinfo
           └─ with --block-private: judge every address (HttpSettings.block_policy,
              else blocked_address_kind); one refused address refuses the host
                └─ connect to the addresses judged, in order, by number

So the address checked is the address connected to: a DNS server that answers one way
for a check and another for the connection (DNS rebinding) has no second lookup to
answer. Only the socket's address changes: httpcore takes the Host header and the TLS
server name (SNI, certificate check) from the request's URL, so a pinned request is the
same request. A kept-alive connection is reused only for its own host and port, which
it was checked for. A name that does not resolve raises ``Unresolvable`` (retried at
most once, ``UNRESOLVED_ATTEMPTS``).

Through a proxy (``--proxy``, or the environment's ``HTTPS_PROXY``…) the proxy looks
the URL's host up and connects to it, so no pinning is possible: the connection to the
proxy itself is never judged (it is the user's own choice, often on a private network),
and with ``--block-private`` ``ProxiedCheck`` looks the URL's host up here before each
request and refuses internal addresses, a best effort that a proxy's own resolver can
contradict.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any

import httpcore
import httpx

from downloader.errors import FetchError
from downloader.settings import HttpSettings

__all__ = [
    "UNRESOLVED_ATTEMPTS",
    "BlockPolicy",
    "ProxiedCheck",
    "Resolve",
    "Unresolvable",
    "blocked_address_kind",
    "pin_backend",
]

UNRESOLVED_ATTEMPTS = 2
"""Attempts a URL whose host does not resolve gets, whatever ``--retries`` says: a
resolver's passing hiccup deserves one more try, but a name that is gone (or a machine
that is offline) stays so for the seconds a backoff waits, and four tries per URL made
an offline run of 33 URLs take 26 s."""

Resolve = Callable[[str, int], list[str]]
"""Host and port → every address a connection to them could use (as text)."""

BlockPolicy = Callable[[str], str | None]
"""An address (as text) → why ``--block-private`` refuses it, or None to allow it."""

_PROXY_POOLS = (
    httpcore.HTTPProxy,
    httpcore.AsyncHTTPProxy,
    httpcore.SOCKSProxy,
    httpcore.AsyncSOCKSProxy,
)

_BLOCKED_V4 = tuple(
    (ipaddress.IPv4Network(network), kind)
    for network, kind in (
        # Most specific first: the first match names the kind.
        ("169.254.169.254/32", "cloud metadata"),
        ("0.0.0.0/8", "unspecified"),
        ("127.0.0.0/8", "loopback"),
        ("10.0.0.0/8", "private"),
        ("172.16.0.0/12", "private"),
        ("192.168.0.0/16", "private"),
        ("100.64.0.0/10", "carrier-grade NAT"),
        ("169.254.0.0/16", "link-local"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("198.18.0.0/15", "benchmarking"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
    )
)
_BLOCKED_V6 = tuple(
    (ipaddress.IPv6Network(network), kind)
    for network, kind in (
        ("fd00:ec2::254/128", "cloud metadata"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "IPv4-compatible"),
        ("fc00::/7", "private"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    )
)
# NAT64 (RFC 6052): the last 32 bits are the IPv4 address a gateway connects to.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def blocked_address_kind(
    address: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> str | None:
    """Return why ``--block-private`` refuses ``address`` (e.g. "loopback"), or None.

    Refused: loopback, private (RFC 1918, ULA ``fc00::/7``), link-local, carrier-grade
    NAT (``100.64.0.0/10``), unspecified, multicast, reserved, and cloud metadata
    addresses (``169.254.169.254``, ``fd00:ec2::254``); an IPv4 address inside IPv6
    (``::ffff:127.0.0.1``, NAT64, 6to4) is judged by its IPv4 part.

    Raises:
        ValueError: ``address`` is not an IP address.
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return blocked_address_kind(embedded)
        return next((kind for net, kind in _BLOCKED_V6 if ip in net), None)
    return next((kind for net, kind in _BLOCKED_V4 if ip in net), None)


class Unresolvable(Exception):
    """The host of a connection has no address (fetch makes it ``cannot resolve``).

    Not an ``OSError``: httpcore would take that for a connect error of its own.
    """

    def __init__(self, host: str, detail: object) -> None:
        super().__init__(f"cannot resolve {host}: {detail}")
        self.host = host


def _system_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _literal(host: str) -> str | None:
    """``host`` as an address if it is one (no lookup to make), else None."""
    text = host.strip("[]")
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return None
    return text


def _unresolvable(host: str, exc: Exception) -> Unresolvable:
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
    return Unresolvable(host, detail)


class _Lookup:
    """One lookup and its judgement; shared by the sync and async backends."""

    def __init__(self, http: HttpSettings, *, judged: bool) -> None:
        self.resolver = http.resolver
        self.judged = judged and http.block_private
        self.policy: BlockPolicy = http.block_policy or blocked_address_kind

    def resolve(self, host: str, port: int) -> list[str]:
        """Every address of ``host``, judged; raise if none or one is refused."""
        literal = _literal(host)
        if literal is not None:
            return self.judge(host, [literal])
        try:
            addresses = (self.resolver or _system_resolve)(host, port)
        except (OSError, UnicodeError) as exc:
            raise _unresolvable(host, exc) from exc
        return self.judge(host, addresses)

    async def resolve_async(self, host: str, port: int) -> list[str]:
        """``resolve`` for asyncio: the lookup runs off the event loop."""
        import asyncio  # only --mode async runs this (start-up time)

        literal = _literal(host)
        if literal is not None:
            return self.judge(host, [literal])
        try:
            if self.resolver is not None:
                addresses = await asyncio.to_thread(self.resolver, host, port)
            else:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM
                )
                addresses = [str(info[4][0]) for info in infos]
        except (OSError, UnicodeError) as exc:
            raise _unresolvable(host, exc) from exc
        return self.judge(host, addresses)

    def judge(self, host: str, addresses: list[str]) -> list[str]:
        """Return ``addresses`` if every one may be used; else raise ``FetchError``."""
        if not addresses:
            raise Unresolvable(host, "no address")
        if self.judged:
            for address in addresses:
                kind = self.policy(address)
                if kind is not None:
                    raise FetchError(
                        f"blocked address {address} ({kind}, --block-private)"
                    )
        return addresses


class _PinnedBackend(httpcore.NetworkBackend):
    """Look the host up once (judged) and connect to those very addresses."""

    def __init__(self, backend: httpcore.NetworkBackend, lookup: _Lookup) -> None:
        self._backend, self._lookup = backend, lookup

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        """Connect to the first of ``host``'s judged addresses that answers."""
        addresses = self._lookup.resolve(host, port)
        for address in addresses[:-1]:
            try:
                return self._backend.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout):
                continue  # as socket.create_connection does: try the next one
        return self._backend.connect_tcp(
            addresses[-1], port, timeout, local_address, socket_options
        )

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.NetworkStream:
        """Pass through (no name to resolve)."""
        return self._backend.connect_unix_socket(path, timeout, socket_options)

    def sleep(self, seconds: float) -> None:
        """Sleep as the wrapped backend does."""
        self._backend.sleep(seconds)


class _AsyncPinnedBackend(httpcore.AsyncNetworkBackend):
    """``_PinnedBackend`` for asyncio."""

    def __init__(self, backend: httpcore.AsyncNetworkBackend, lookup: _Lookup) -> None:
        self._backend, self._lookup = backend, lookup

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        """Connect to the first of ``host``'s judged addresses that answers."""
        addresses = await self._lookup.resolve_async(host, port)
        for address in addresses[:-1]:
            try:
                return await self._backend.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout):
                continue  # as socket.create_connection does: try the next one
        return await self._backend.connect_tcp(
            addresses[-1], port, timeout, local_address, socket_options
        )

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.AsyncNetworkStream:
        """Pass through (no name to resolve)."""
        return await self._backend.connect_unix_socket(path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        """Sleep as the wrapped backend does."""
        await self._backend.sleep(seconds)


def pin_backend(pool: Any, http: HttpSettings, backend: Any) -> Any:
    """The backend for ``pool``: ``backend`` (which connects to an address), behind
    one judged lookup per connection.

    A proxy's pool connects to the proxy: looked up the same way, never judged.
    """
    lookup = _Lookup(http, judged=not isinstance(pool, _PROXY_POOLS))
    if isinstance(backend, httpcore.AsyncNetworkBackend):
        return _AsyncPinnedBackend(backend, lookup)
    return _PinnedBackend(backend, lookup)


def _proxied(client: httpx.Client | httpx.AsyncClient, url: httpx.URL) -> bool:
    """Whether ``client`` sends a request for ``url`` through a proxy."""
    transport = client._transport_for_url(url)
    return isinstance(getattr(transport, "_pool", None), _PROXY_POOLS)


class ProxiedCheck:
    """``--block-private`` for requests a proxy connects: look up and judge here.

    Direct connections are judged where they connect (``pin_backend``); this covers
    only URLs the client sends through a proxy, before each request.
    """

    def __init__(self, http: HttpSettings) -> None:
        self._lookup = _Lookup(http, judged=True)

    def check(self, client: httpx.Client, url: httpx.URL) -> None:
        """Raise ``FetchError`` if ``url`` goes through a proxy to a refused host."""
        if self._lookup.judged and _proxied(client, url):
            self._lookup.resolve(*_lookup_target(url))

    async def check_async(self, client: httpx.AsyncClient, url: httpx.URL) -> None:
        """``check`` for asyncio."""
        if self._lookup.judged and _proxied(client, url):
            await self._lookup.resolve_async(*_lookup_target(url))


def _lookup_target(url: httpx.URL) -> tuple[str, int]:
    """The host (IDNA-encoded, as httpx connects to it) and port of ``url``."""
    port = url.port or (443 if url.scheme == "https" else 80)
    return url.raw_host.decode("ascii"), port
