"""The download stage: one URL to one complete file on disk under a temporary name.

``fetch()`` streams a body to ``<tmp_dir>/<stem>.part`` through a shared
``httpx.Client`` and returns a ``Fetched`` record. A URL that cannot be fetched
raises ``FetchError`` (a per-URL failure, turned into a record by the caller); a local
write fault raises ``OutputError`` (the run stops). Either way no ``.part`` file is
left behind.

Redirects (followed by hand, each hop checked), retries with jittered backoff,
``Retry-After``, size caps on raw and decoded bytes, the per-attempt deadline and the
minimum-speed check (over ``--timeout`` seconds) all live here, so every scheduler
gets the same behaviour. What is judged mid-body (a body that is not an image is
refused after its first bytes, a stall is retried once, a cut body continues with a
range request) follows the rules of ``transfer.py``. This module never starts a
thread or a process: callers run ``fetch()`` from as many threads as they like,
sharing one client (``make_client``) and one ``HostLimiter``.

``fetch_async()`` is the same download for asyncio (``make_async_client``,
``AsyncHostLimiter``, the body written with aiofiles). Both drive one sans-IO core,
``_Attempts`` (retries, backoff, deadline, result) with ``_Hops`` (redirect checks) and
``_BodyReader`` (size caps, decoding, hashing, truncation); only the I/O differs.

``fetch(..., defer_retries=True)`` does not sleep between attempts: it raises
``RetryLater`` (the wait, the attempts made, an ``AttemptState``) so that a scheduler
can serve other URLs meanwhile, then calls ``fetch(..., attempts_done=n, state=s)``
when the wait is over; the retry budget, the stalls, the partial body to continue and
the final reason are the same as with the sleep.

``--deadline`` bounds each attempt from connecting to the last byte: the clients are
built with a network backend (``_DeadlineBackend``) that cuts every connect, read and
write to the time the current request has left, since httpx's own timeouts bound only
single reads. Credential headers given by the user go only to the listed URL's origin
(``_Attempts.request``). Every exception a request raises is translated in one place
(``_translate``, which lists each one's fate), so no server can stop a run.

Every connection, first hop, redirect hop and retry alike, is looked up once and made
to the very address looked up (``resolve.pin_backend``, over the deadline backend);
with ``HttpSettings.block_private`` that address is judged first, so the check is the
connection (no DNS-rebinding gap). A name that does not resolve is retried at most
once (``resolve.UNRESOLVED_ATTEMPTS``).
"""

from __future__ import annotations

import contextvars
import email.utils
import functools
import hashlib
import logging
import os
import random
import re
import ssl
import stat
import threading
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import httpcore
import httpx
import idna

from downloader.connection_pool import linear_assignment
from downloader.errors import FetchError, OutputError
from downloader.politeness import Pace, RequestRate, refused_use
from downloader.raw_body import direct_reads, whole
from downloader.records import Fetched, Identity, Job
from downloader.resolve import (
    UNRESOLVED_ATTEMPTS,
    ProxiedCheck,
    Resolve,
    Unresolvable,
    blocked_address_kind,
    pin_backend,
)
from downloader.settings import HttpSettings, without_password
from downloader.spares import SpareFiles
from downloader.transfer import (
    SNIFF_BYTES,
    STALL_RETRIES,
    AttemptState,
    Continuation,
    Sniff,
    partial_for,
)

if TYPE_CHECKING:  # asyncio and aiofiles are imported where --mode async runs
    import asyncio

    from aiofiles.threadpool.binary import AsyncBufferedIOBase

__all__ = [
    "CHUNK",
    "AsyncHostLimiter",
    "HostLimiter",
    "Resolve",
    "RetryLater",
    "StopFlag",
    "blocked_address_kind",
    "fetch",
    "fetch_async",
    "host_key",
    "make_async_client",
    "make_client",
    "network_environ",
    "use_network_environ",
]

CHUNK = 256 * 1024
"""Most bytes one decompression step may produce, so a gzip bomb is cut off in pieces
of this size instead of inflating a 64 KiB read to tens of megabytes at once (S12)."""

HOST_KEY_CACHE = 4096
"""URLs whose ``host_key`` and parsed form are kept: more than the jobs a run holds
at once (its threads and the feed's look-ahead), so each job's URL is parsed once."""

_SLOT_WAIT_SLICE = 0.25
"""Seconds one wait for a host slot lasts before the cancel flag is checked again."""

_Bytes = bytes | bytearray | memoryview
"""A piece of body: httpx's reads are ``bytes``, ``raw_body``'s a buffer's view."""
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_RATE_LIMIT_STATUSES = frozenset({429, 503})
_PARTIAL_CONTENT, _RANGE_NOT_SATISFIABLE = 206, 416
_TRANSIENT_CLIENT_STATUSES = frozenset({408, 429})
_ALLOWED_SCHEMES = frozenset({"http", "https"})
_TIMEOUT_KINDS: dict[type[httpx.TimeoutException], str] = {
    httpx.ConnectTimeout: "connect",
    httpx.ReadTimeout: "read",
    httpx.WriteTimeout: "write",
    httpx.PoolTimeout: "pool",
}
_CREDENTIAL_HEADERS = ("authorization", "proxy-authorization", "cookie")
"""Request headers that carry credentials: a ``--header`` giving one is sent only to
the origin (scheme, host, port) of the URL in the list, never to another origin a
redirect leads to, as curl and browsers do."""
_log = logging.getLogger("downloader")
# O_EXCL|O_NOFOLLOW: never write through a file or link someone else put there.
_PART_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
# A partial body is continued in the file this download made, never through a link.
_PARTIAL_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW
# A spare is written over from its start (``spares``), never through a link.
_SPARE_FLAGS = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK


def _client_options(http: HttpSettings, threads: int) -> dict[str, Any]:
    """The options both client kinds share: headers, limits, timeouts, no redirects."""
    headers = httpx.Headers(
        {
            "User-Agent": http.user_agent,
            # Images are already compressed; identity also sidesteps gzip bombs (S12).
            "Accept-Encoding": "identity",
            "Accept": "image/*,*/*;q=0.8",
        }
    )
    headers.update(list(http.headers))
    return {
        "headers": headers,
        "limits": httpx.Limits(
            max_connections=threads, max_keepalive_connections=threads
        ),
        # Threads may outnumber free connections, so waiting for one may take long.
        "timeout": httpx.Timeout(http.timeout, pool=http.deadline),
        # Redirects are followed by hand so that every hop is checked.
        "follow_redirects": False,
        # Verifying: the CA bundle is loaded at the first TLS handshake, not here.
        "verify": _TrustOnFirstUse() if http.verify else False,
        # --proxy wins; without it httpx reads HTTPS_PROXY, NO_PROXY, ...
        "proxy": http.proxy,
        "trust_env": True,
        # No cookie jar: a cookie one server sets must not follow this run to other
        # URLs (another port is another origin, but not another cookie domain).
        # A --header 'Cookie: …' is still sent, to the listed URL's origin only.
        "cookies": CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
    }


_TLS_ENVIRON = ("SSL_CERT_FILE", "SSL_CERT_DIR", "SSLKEYLOGFILE")


def _read_by_a_client(name: str) -> bool:
    """Tell whether a client reads variable ``name`` (trust, proxies: ``trust_env``)."""
    return name in _TLS_ENVIRON or name.lower().endswith("_proxy")


def network_environ() -> dict[str, str]:
    """The variables a client reads, as this process has them now (for a worker)."""
    return {
        name: value for name, value in os.environ.items() if _read_by_a_client(name)
    }


def use_network_environ(environ: dict[str, str]) -> None:
    """Make the variables a client reads in this process exactly ``environ``.

    A worker process is forked from the forkserver, whose environment is the one it
    started with: a forkserver that was running before the run (a Python caller's)
    would give the workers a CA bundle or a proxy the caller has since changed or
    withdrawn. The parent's, sent with the worker's arguments, is put in its place
    before the worker makes its client.
    """
    for name in [name for name in os.environ if _read_by_a_client(name)]:
        if name not in environ:
            del os.environ[name]
    os.environ.update(environ)


class _TrustOnFirstUse(ssl.SSLContext):
    """httpx's verifying TLS context (``verify=True``), made at the first handshake.

    Making it loads a CA bundle: ~55 ms of CPU in every process that makes a client
    (the main process, and each ``processes`` worker before its first request), for
    nothing in a run of ``http://`` URLs. This one only records the ALPN protocols
    httpcore sets on it before each handshake; its wraps go to the real context, made
    then by httpx's own ``create_ssl_context`` (certifi's bundle, or
    ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``), so verification is httpx's, unchanged. It
    loads nothing itself: used as it is, it would verify against no CA and fail every
    handshake, never pass one.
    """

    def __new__(cls) -> _TrustOnFirstUse:
        return super().__new__(cls, ssl.PROTOCOL_TLS_CLIENT)

    def __init__(self) -> None:
        self._made: ssl.SSLContext | None = None
        self._alpn: list[str] | None = None
        self._made_lock = threading.Lock()

    def set_alpn_protocols(self, alpn_protocols: Iterable[str]) -> None:
        """Note the protocols for the real context (httpcore sets them per connect)."""
        self._alpn = list(alpn_protocols)
        super().set_alpn_protocols(self._alpn)

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        """The real context's ``wrap_socket``."""
        return self.real().wrap_socket(*args, **kwargs)

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        """The real context's ``wrap_bio`` (TLS inside a proxy's TLS, asyncio)."""
        return self.real().wrap_bio(*args, **kwargs)

    def real(self) -> ssl.SSLContext:
        """The context httpx would have made, made once, with the ALPN noted.

        Raises:
            FetchError: the CA bundle named by ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``
                cannot be loaded (final: every attempt would meet it again).
        """
        with self._made_lock:
            if self._made is None:
                try:
                    self._made = httpx.create_ssl_context(verify=True, trust_env=True)
                except (OSError, ssl.SSLError) as exc:
                    named = [
                        f"{name}={os.environ[name]}"
                        for name in ("SSL_CERT_FILE", "SSL_CERT_DIR")
                        if os.environ.get(name)
                    ]
                    where = f" ({', '.join(named)})" if named else ""
                    reason = f"cannot load the CA bundle{where}: {exc}"
                    raise FetchError(reason) from exc
            if self._alpn is not None:
                self._made.set_alpn_protocols(self._alpn)
            return self._made


def make_client(http: HttpSettings, threads: int) -> httpx.Client:
    """Build the one client a run shares between all its download threads."""
    client = httpx.Client(**_client_options(http, threads))
    _keep_no_cookies(client)
    for pool in _pools(client):
        pool._network_backend = pin_backend(
            pool, http, _DeadlineBackend(pool._network_backend)
        )
        linear_assignment(pool)
    return client


def make_async_client(http: HttpSettings, tasks: int) -> httpx.AsyncClient:
    """Build the one async client an event loop shares between its download tasks."""
    client = httpx.AsyncClient(**_client_options(http, tasks))
    _keep_no_cookies(client)
    for pool in _pools(client):
        pool._network_backend = pin_backend(
            pool, http, _AsyncDeadlineBackend(pool._network_backend)
        )
        linear_assignment(pool)
    return client


class _NoCookies(httpx.Cookies):
    """The client's cookies: none, ever (see ``_client_options``). A response's
    Set-Cookie is not even read: httpx wraps every response and its request in
    urllib objects for the jar to parse it, ~9% of a tiny image's download CPU."""

    def extract_cookies(self, response: httpx.Response) -> None:
        """Keep nothing from ``response``."""


def _keep_no_cookies(client: httpx.Client | httpx.AsyncClient) -> None:
    """Give ``client`` a ``_NoCookies`` over its empty jar (its policy kept too).

    httpx has no public way to replace a client's ``Cookies`` object (its setter
    copies the cookies into a new plain one): if that changes, this fails when the
    client is made (and in every test), never silently.
    """
    client._cookies = _NoCookies(client.cookies.jar)
    if not isinstance(client.cookies, _NoCookies):
        raise RuntimeError(f"httpx {httpx.__version__}: cannot turn cookies off")


_deadline_at: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "downloader_deadline_at", default=None
)
"""``time.monotonic()`` past which no network operation of the current request may
run. A context variable is private to each thread and to each asyncio task, so every
download sees only its own deadline through the client it shares with the others."""


def _pools(client: httpx.Client | httpx.AsyncClient) -> list[Any]:
    """The httpcore connection pools behind ``client`` (its own and its proxies').

    httpx offers no public way to give a pool its network backend, so this reaches
    into ``_transport._pool``, stable from httpx 0.23 to 0.28. If that ever changes,
    this fails when the client is made (and in every test), never silently.
    """
    transports = [client._transport, *client._mounts.values()]
    pools = [getattr(t, "_pool", None) for t in transports if t is not None]
    if not pools or any(not hasattr(p, "_network_backend") for p in pools):
        raise RuntimeError(
            f"httpx {httpx.__version__}: cannot install the --deadline backend"
        )
    return pools


def _capped(timeout: float | None, error: type[Exception]) -> float | None:
    """``timeout`` cut to what is left of the current request's deadline.

    httpx's timeouts bound each read, not the request: a server that sends its status
    line and headers a byte at a time never trips them. Capping every connect, read
    and write by the time left makes ``--deadline`` bound the whole request, from
    connecting to the last byte, whatever the server sends or withholds.
    """
    at = _deadline_at.get()
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        # A zero timeout would make the socket non-blocking, not time out.
        raise error("past --deadline")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A network stream whose every operation ends by the request's deadline."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    @property
    def raw_stream(self) -> httpcore.NetworkStream:
        """The wrapped stream (``raw_body`` reads a body from its socket)."""
        return self._stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """Read, for at most what is left of the deadline (``_sliced``)."""
        read = functools.partial(self._stream.read, max_bytes)
        return _sliced(read, timeout, httpcore.ReadTimeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        """Write, for at most what is left of the deadline."""
        self._stream.write(buffer, _capped(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        """Close the underlying stream."""
        self._stream.close()

    def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        """Start TLS within the deadline; the TLS stream is capped as well."""
        timeout = _capped(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(
            self._stream.start_tls(ssl_context, server_hostname, timeout)
        )

    def get_extra_info(self, info: str) -> Any:
        """Pass through (the socket, TLS details)."""
        return self._stream.get_extra_info(info)


_T = TypeVar("_T")

STOP_CHECK_S = 0.5
"""Seconds a read waits at a time before the download's stop flag is looked at."""

_stop_flag: contextvars.ContextVar[StopFlag | None] = contextvars.ContextVar(
    "downloader_stop_flag", default=None
)
"""The stop flag of the current request (``_Attempts.network_deadline``): private to
each thread and each asyncio task, as ``_deadline_at`` is."""


def _sliced(
    read: Callable[[float | None], _T], timeout: float | None, error: type[Exception]
) -> _T:
    """``read(timeout)``, capped by the deadline, waiting ``STOP_CHECK_S`` at a time.

    A read blocks its thread in the socket for up to ``--timeout``; Ctrl-C sets the
    stop flag, which a blocked thread cannot see, so a run whose server went quiet
    would wait out the timeout before it could stop. Between slices the flag is
    looked at: set, the download ends ``interrupted``. ``read`` raises ``error``
    when a slice passes with nothing (nothing consumed: it is made again).

    Raises:
        FetchError: "interrupted", the stop flag was set while it waited.
    """
    stop = _stop_flag.get()
    ends = None if timeout is None else time.monotonic() + timeout
    while True:
        limit, last = _next_slice(ends, stop, error)
        if last:
            return read(limit)
        try:
            return read(limit)
        except error:
            _check_stop(stop)


async def _sliced_async(
    read: Callable[[float | None], Awaitable[_T]],
    timeout: float | None,
    error: type[Exception],
) -> _T:
    """``_sliced`` for the event loop's reads."""
    stop = _stop_flag.get()
    ends = None if timeout is None else time.monotonic() + timeout
    while True:
        limit, last = _next_slice(ends, stop, error)
        if last:
            return await read(limit)
        try:
            return await read(limit)
        except error:
            _check_stop(stop)


def _next_slice(
    ends: float | None, stop: StopFlag | None, error: type[Exception]
) -> tuple[float | None, bool]:
    """The next slice's timeout (capped by the deadline) and whether it is the last:
    without a stop flag, or with no more than ``STOP_CHECK_S`` left."""
    left = None if ends is None else ends - time.monotonic()
    if left is not None and left <= 0:
        raise error("timed out")  # the last slice ran past the timeout
    limit = _capped(left, error)
    if stop is None or (limit is not None and limit <= STOP_CHECK_S):
        return limit, True
    return STOP_CHECK_S, False


def _check_stop(stop: StopFlag | None) -> None:
    if stop is not None and stop.is_set():
        raise FetchError("interrupted") from None


def _receive(read: Callable[[float | None], int], timeout: float | None) -> int:
    """A direct body read (``raw_body.direct_reads``), sliced as ``_sliced``."""
    return _sliced(read, timeout, httpx.ReadTimeout)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's network backend with every stream capped by ``_deadline_at``."""

    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        """Connect within the deadline."""
        timeout = _capped(timeout, httpcore.ConnectTimeout)
        stream = self._backend.connect_tcp(
            host, port, timeout, local_address, socket_options
        )
        return _DeadlineStream(stream)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.NetworkStream:
        """Connect within the deadline."""
        timeout = _capped(timeout, httpcore.ConnectTimeout)
        stream = self._backend.connect_unix_socket(path, timeout, socket_options)
        return _DeadlineStream(stream)

    def sleep(self, seconds: float) -> None:
        """Sleep as the wrapped backend does."""
        self._backend.sleep(seconds)


class _AsyncDeadlineStream(httpcore.AsyncNetworkStream):
    """``_DeadlineStream`` for asyncio."""

    def __init__(self, stream: httpcore.AsyncNetworkStream) -> None:
        self._stream = stream

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """Read, for at most what is left of the deadline (``_sliced``)."""
        read = functools.partial(self._stream.read, max_bytes)
        return await _sliced_async(read, timeout, httpcore.ReadTimeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        """Write, for at most what is left of the deadline."""
        await self._stream.write(buffer, _capped(timeout, httpcore.WriteTimeout))

    async def aclose(self) -> None:
        """Close the underlying stream."""
        await self._stream.aclose()

    async def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Start TLS within the deadline; the TLS stream is capped as well."""
        timeout = _capped(timeout, httpcore.ConnectTimeout)
        stream = await self._stream.start_tls(ssl_context, server_hostname, timeout)
        return _AsyncDeadlineStream(stream)

    def get_extra_info(self, info: str) -> Any:
        """Pass through (the socket, TLS details)."""
        return self._stream.get_extra_info(info)


class _AsyncDeadlineBackend(httpcore.AsyncNetworkBackend):
    """``_DeadlineBackend`` for asyncio."""

    def __init__(self, backend: httpcore.AsyncNetworkBackend) -> None:
        self._backend = backend

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        """Connect within the deadline."""
        timeout = _capped(timeout, httpcore.ConnectTimeout)
        stream = await self._backend.connect_tcp(
            host, port, timeout, local_address, socket_options
        )
        return _AsyncDeadlineStream(stream)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.AsyncNetworkStream:
        """Connect within the deadline."""
        timeout = _capped(timeout, httpcore.ConnectTimeout)
        stream = await self._backend.connect_unix_socket(path, timeout, socket_options)
        return _AsyncDeadlineStream(stream)

    async def sleep(self, seconds: float) -> None:
        """Sleep as the wrapped backend does."""
        await self._backend.sleep(seconds)


class StopFlag(Protocol):
    """What a download asks to know whether it should stop (threading or asyncio)."""

    def is_set(self) -> bool:
        """Return True once the run has been asked to stop."""
        ...


class _HostBackoff:
    """The per-host "not before" times that rate-limited hosts asked for, and the
    request rate per host (``--rate-per-host``, this process's share)."""

    def __init__(self, per_host: int, rate: Pace | float | None = None) -> None:
        if per_host <= 0:
            raise ValueError("per_host must be greater than 0")
        self._per_host = per_host
        self._lock = threading.Lock()
        self._not_before: dict[str, float] = {}
        self.rate = RequestRate(rate)

    def slow_down(self, host: str, delay: float) -> None:
        """Make every download wait ``delay`` seconds before its next request there."""
        if delay <= 0:
            return
        until = time.monotonic() + delay
        with self._lock:
            self._not_before[host] = max(until, self._not_before.get(host, until))

    def _remaining(self, host: str) -> float:
        with self._lock:
            return self._not_before.get(host, 0.0) - time.monotonic()


class HostLimiter(_HostBackoff):
    """Cap concurrent requests per host:port; hold back hosts that asked us to wait."""

    def __init__(self, per_host: int, rate: Pace | float | None = None) -> None:
        super().__init__(per_host, rate)
        self._slots: dict[str, threading.BoundedSemaphore] = {}

    @contextmanager
    def slot(self, host: str, cancel: threading.Event) -> Iterator[None]:
        """Hold one of ``host``'s slots, after any wait the host asked for.

        Raises:
            FetchError: "interrupted" once ``cancel`` is set while waiting.
        """
        semaphore = self._semaphore(host)
        while not semaphore.acquire(timeout=_SLOT_WAIT_SLICE):
            if cancel.is_set():
                raise FetchError("interrupted")
        try:
            self._wait_until_allowed(host, cancel)
            # The turn is taken on waking, never ahead (``politeness``).
            while (turn := self.rate.take(host)) > 0:
                if cancel.wait(turn):
                    raise FetchError("interrupted")
            yield
        finally:
            semaphore.release()

    def _semaphore(self, host: str) -> threading.BoundedSemaphore:
        with self._lock:
            semaphore = self._slots.get(host)
            if semaphore is None:
                semaphore = threading.BoundedSemaphore(self._per_host)
                self._slots[host] = semaphore
            return semaphore

    def _wait_until_allowed(self, host: str, cancel: threading.Event) -> None:
        while True:
            remaining = self._remaining(host)
            if cancel.is_set():
                raise FetchError("interrupted")
            if remaining <= 0:
                return
            cancel.wait(remaining)


class AsyncHostLimiter(_HostBackoff):
    """``HostLimiter`` for one event loop: asyncio semaphores, stop by an Event."""

    def __init__(self, per_host: int, rate: Pace | float | None = None) -> None:
        super().__init__(per_host, rate)
        self._slots: dict[str, asyncio.Semaphore] = {}

    @asynccontextmanager
    async def slot(self, host: str, stop: asyncio.Event) -> AsyncIterator[None]:
        """Hold one of ``host``'s slots, after any wait the host asked for.

        Raises:
            FetchError: "interrupted" once ``stop`` is set while waiting.
        """
        import asyncio  # asyncio: only --mode async runs this (start-up time)

        semaphore = self._slots.setdefault(host, asyncio.Semaphore(self._per_host))
        await _acquire_unless_stopped(semaphore, stop)
        try:
            while (remaining := self._remaining(host)) > 0 or stop.is_set():
                if await _stopped_within(stop, remaining):
                    raise FetchError("interrupted")
            while (turn := self.rate.take(host)) > 0:
                if await _stopped_within(stop, turn):
                    raise FetchError("interrupted")
            yield
        finally:
            semaphore.release()


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds``; return True (at once) if ``stop`` is or gets set."""
    import asyncio  # asyncio: only --mode async runs this (start-up time)

    if stop.is_set():
        return True
    with suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max(0.0, seconds))
    return stop.is_set()


async def _acquire_unless_stopped(semaphore: asyncio.Semaphore, stop: StopFlag) -> None:
    import asyncio  # asyncio: only --mode async runs this (start-up time)

    while True:
        with suppress(TimeoutError):
            await asyncio.wait_for(semaphore.acquire(), _SLOT_WAIT_SLICE)
            return
        if stop.is_set():
            raise FetchError("interrupted")


class RetryLater(FetchError):
    """Not a failure: try ``fetch`` again in ``delay`` seconds (``defer_retries``).

    ``attempts`` is the number made so far: pass it back as ``attempts_done``, and
    ``state`` as ``state`` (its partial body stays on disk until then, or until the
    run removes its scratch folder).
    """

    def __init__(
        self,
        reason: str,
        *,
        delay: float,
        attempts: int,
        state: AttemptState | None = None,
    ) -> None:
        super().__init__(f"retry later: {reason}", attempts=attempts)
        self.delay = delay
        self.state = state or AttemptState()


def fetch(
    job: Job,
    client: httpx.Client,
    http: HttpSettings,
    tmp_dir: Path,
    *,
    cancel: threading.Event,
    hosts: HostLimiter,
    on_bytes: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    defer_retries: bool = False,
    attempts_done: int = 0,
    state: AttemptState | None = None,
    hash_body: bool = True,
    spares: SpareFiles | None = None,
) -> Fetched:
    """Download ``job.url`` to ``tmp_dir/<stem>.part``, retrying transient failures.

    With ``defer_retries`` a wait before the next attempt is raised as ``RetryLater``
    instead of slept; ``attempts_done`` and ``state`` (both from that ``RetryLater``)
    continue the retry budget of the calls before. Without ``hash_body`` the record's
    ``sha256`` is None (whoever reads the file next hashes it). With ``spares`` the
    body is written over a spare file when one is ready (``spares``).

    Raises:
        RetryLater: only with ``defer_retries``; nothing is left on disk but the
            partial body its ``state`` continues (the run's scratch folder goes at
            the end of the run, with it).
        FetchError: the URL failed (``reason`` says why); nothing is left on disk.
        OutputError: the ``.part`` file could not be written; the run should stop.
    """
    guard = ProxiedCheck(http)
    attempts = _Attempts(job, http, tmp_dir, cancel, hosts, on_bytes, clock, guard)
    attempts.count = attempts_done
    attempts.hash_body = hash_body
    attempts.carry(state or AttemptState())
    download = _Download(
        attempts, client, hosts, cancel, defer_retries=defer_retries, spares=spares
    )
    with attempts.cleanup():
        return download.run()


async def fetch_async(
    job: Job,
    client: httpx.AsyncClient,
    http: HttpSettings,
    tmp_dir: Path,
    *,
    stop: asyncio.Event,
    hosts: AsyncHostLimiter,
    on_bytes: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Fetched:
    """``fetch`` for asyncio: the same rules, the body written with aiofiles.

    Raises:
        FetchError: the URL failed (``reason`` says why); nothing is left on disk.
        OutputError: the ``.part`` file could not be written; the run should stop.
    """
    guard = ProxiedCheck(http)
    attempts = _Attempts(job, http, tmp_dir, stop, hosts, on_bytes, clock, guard)
    download = _AsyncDownload(attempts, client, hosts, stop)
    with attempts.cleanup():
        return await download.run()


class _Transient(FetchError):
    """A failure worth another attempt; ``retry_after`` is the server's own wait.

    ``stall``: the server sent nothing for ``--timeout`` seconds, or its body crawled
    below the minimum speed that long; a download gets ``STALL_RETRIES`` more
    attempts after one.
    """

    def __init__(
        self,
        reason: str,
        *,
        host: str,
        http_status: int | None = None,
        retry_after: float | None = None,
        stall: bool = False,
        most_attempts: int | None = None,
    ) -> None:
        super().__init__(reason, http_status=http_status)
        self.host = host
        self.retry_after = retry_after
        self.stall = stall
        self.most_attempts = most_attempts
        """Attempts this kind of failure deserves at most, below ``--retries``."""


@dataclass(frozen=True, slots=True)
class _Body:
    """A complete body on disk, as one attempt saw it."""

    final_url: str
    nbytes: int
    sha256: str | None
    identity: Identity | None = None
    """Its file's device and inode as written (``Fetched.identity``)."""


class _Received:
    """Raw bytes of the body so far (a continued body's earlier ones included), for
    the truncation message."""

    __slots__ = ("expected", "raw")

    def __init__(self) -> None:
        self.raw = 0
        self.expected: int | None = None


class _Attempts:
    """The sans-IO state of one download, shared by the sync and async drivers.

    It decides everything that does not need the network: when to stop, how long to
    wait before the next attempt, when the deadline is past, what the result is.
    """

    def __init__(
        self,
        job: Job,
        http: HttpSettings,
        tmp_dir: Path,
        stop: StopFlag,
        hosts: _HostBackoff,
        on_bytes: Callable[[int], None] | None,
        clock: Callable[[], float],
        guard: ProxiedCheck,
    ) -> None:
        self.job, self.http, self.stop, self.hosts = job, http, stop, hosts
        self.guard = guard
        self.path = tmp_dir / f"{job.stem}.part"
        self.on_bytes, self.clock = on_bytes, clock
        self.started = clock()
        self.count = 0
        self.deadline: float | None = None
        self._deadline_at: float | None = None
        self.origin: tuple[str, str, int] | None = None
        self.stalls = 0
        self.continuation = Continuation(self.path)
        self.hash_body = True

    def carry(self, state: AttemptState) -> None:
        """Continue from what earlier calls left (``RetryLater.state``)."""
        self.stalls, self.continuation.partial = state.stalls, state.partial

    def state(self) -> AttemptState:
        """What the next call needs to continue this download."""
        return AttemptState(self.stalls, self.continuation.partial)

    @contextmanager
    def cleanup(self) -> Iterator[None]:
        """Leave no ``.part`` behind unless the download succeeds or continues later
        (a ``RetryLater`` with a partial body); count attempts."""
        keep = False
        try:
            yield
            keep = True
        except RetryLater:
            keep = self.continuation.partial is not None
            raise
        except FetchError as exc:
            exc.attempts = self.count
            exc.final_url = _without_userinfo(exc.final_url)
            raise
        finally:
            if not keep:
                _remove(self.path)

    def begin(self) -> _Hops:
        """Start the next attempt at the original URL."""
        if self.stop.is_set():
            raise FetchError("interrupted")
        self.count += 1
        self.deadline = self._deadline_at = None
        hops = _Hops(self.job.url, self.http.max_redirects)
        self.origin = _origin(hops.url)
        return hops

    def retry_delay(self, exc: _Transient) -> float:
        """Return the wait before the next attempt, or raise if this was the last.

        A partial body that the next attempt may continue stays on disk.
        """
        if self.continuation.partial is None:
            _remove(self.path)
        if exc.stall:
            self.stalls += 1
        last = self.http.retries + 1
        if exc.most_attempts is not None:
            last = min(last, exc.most_attempts)
        if self.count >= last or self.stalls > STALL_RETRIES:
            reason = exc.reason
            if self.count > 1:
                reason = f"{reason} after {self.count} attempts"
            raise FetchError(
                reason, http_status=exc.http_status, final_url=exc.final_url
            ) from exc
        if exc.retry_after is not None:
            delay = exc.retry_after
        else:
            ceiling = self.http.backoff * 2 ** (self.count - 1)
            # Full jitter keeps threads that failed together from retrying together.
            delay = random.uniform(0.5, 1.0) * min(self.http.max_backoff, ceiling)
        if exc.http_status in _RATE_LIMIT_STATUSES:
            self.hosts.slow_down(exc.host, delay)
        return delay

    def check_running(self, host: str) -> None:
        """Raise if stopped or past the deadline (which starts with the first slot)."""
        if self.deadline is None:
            # Time spent queueing for a slot is not the server's fault.
            self.deadline = self.clock() + self.http.deadline
            self._deadline_at = time.monotonic() + self.http.deadline
        if self.stop.is_set():
            raise FetchError("interrupted")
        if self.clock() > self.deadline:
            raise _Transient(f"past the {self.http.deadline:g}s deadline", host=host)

    @contextmanager
    def network_deadline(self) -> Iterator[None]:
        """Cap every network operation in this block by the attempt's deadline; its
        reads look at the attempt's stop flag as they wait (``_sliced``)."""
        token = _deadline_at.set(self._deadline_at)
        stop_token = _stop_flag.set(self.stop)
        try:
            yield
        finally:
            _stop_flag.reset(stop_token)
            _deadline_at.reset(token)

    def past_deadline(self) -> bool:
        """True once this attempt's deadline has passed (in real time)."""
        at = self._deadline_at
        return at is not None and time.monotonic() >= at

    def request(
        self, client: httpx.Client | httpx.AsyncClient, url: httpx.URL
    ) -> httpx.Request:
        """The GET for one hop: a hop to another origin than the listed URL's goes
        without the credential headers the user gave (``_CREDENTIAL_HEADERS``)."""
        request = client.build_request("GET", url)
        if _origin(url) != self.origin:
            for name in _CREDENTIAL_HEADERS:
                request.headers.pop(name, None)
        request.headers.update(self.continuation.range_headers(str(url)))
        return request

    def check_status(self, response: httpx.Response, host: str) -> str | None:
        """``_check_status``, and the answers to a range request: a 206 is the rest
        of the body; a 416 drops the partial body for a whole new attempt."""
        if self.continuation.asked_from > 0:
            if response.status_code == _PARTIAL_CONTENT:
                return None
            if response.status_code == _RANGE_NOT_SATISFIABLE:
                self.continuation.drop()
                reason = "HTTP 416 to a range request"
                raise _Transient(reason, host=host, http_status=416)
        return _check_status(response, host, self.http.max_backoff)

    def body_reader(self, response: httpx.Response, received: _Received) -> _BodyReader:
        """Check a 200 (or 206) response's headers and return the reader for its body.

        A 206 that does not continue the partial body where it ends is retried as a
        whole download (``Continuation.body_start``).
        """
        refused_use(response.headers, self.http)
        try:
            offset, total = self.continuation.body_start(response)
        except ValueError as exc:
            raise _Transient(str(exc), host=host_key(response.url)) from exc
        return _BodyReader(self, response, received, offset, total)

    def fetched(self, body: _Body) -> Fetched:
        """The record of the successful attempt."""
        return Fetched(
            job=self.job,
            path=self.path,
            nbytes=body.nbytes,
            sha256=body.sha256,
            final_url=_without_userinfo(body.final_url),
            http_status=200,
            attempts=self.count,
            elapsed=self.clock() - self.started,
            insecure=not self.http.verify,
            identity=body.identity,
        )


class _Hops:
    """The redirect chain of one attempt: the current URL and the ones seen."""

    def __init__(self, url: str, max_redirects: int) -> None:
        self.url = _parse_url(url)
        self._seen = {str(self.url)}
        self._left = max_redirects
        self._max = max_redirects

    def follow(self, location: str) -> None:
        """Move to the redirect target ``location``, refusing unsafe or looping hops."""
        if self._left == 0:
            raise FetchError(
                f"too many redirects (more than {self._max})", final_url=str(self.url)
            )
        self.url = _redirect_target(self.url, location, self._seen)
        self._left -= 1


class _BodyReader:
    """Turn raw reads of one 200 response into checked, decoded pieces to write.

    A 206 continues a partial body from ``offset`` (its bytes are already in the
    file; the caller seeds ``digest`` with them); ``total`` is its Content-Range size.
    """

    def __init__(
        self,
        attempts: _Attempts,
        response: httpx.Response,
        received: _Received,
        offset: int = 0,
        total: int | None = None,
    ) -> None:
        self._attempts = attempts
        self._host = host_key(response.url)
        self._max_bytes = max_bytes = attempts.http.max_bytes
        self._received = received
        length = _content_length(response)
        expected = total if length is None else offset + length
        received.raw, received.expected = offset, expected
        if expected is not None and expected > max_bytes:
            limit = f"larger than --max-bytes ({max_bytes} bytes)"
            raise FetchError(f"{limit}: Content-Length {expected}")
        if expected == 0:
            raise FetchError("empty body")
        self._decoder = _decoder_for(response.headers.get("Content-Encoding", ""))
        self._speed = _SpeedCheck(attempts.http, attempts.clock, self._host, offset)
        content_type = response.headers.get("Content-Type")
        self._sniff = Sniff(content_type, decided=offset > 0)
        self._partial = None if offset else partial_for(response)
        self.digest = hashlib.sha256() if attempts.hash_body else None
        self.nbytes = self.offset = offset

    def feed(self, data: _Bytes) -> Iterator[_Bytes]:
        """Yield the decoded pieces of one raw read, then check deadline and speed."""
        self._received.raw += len(data)
        if self._received.raw > self._max_bytes:
            raise FetchError(f"larger than --max-bytes ({self._max_bytes} bytes)")
        yield from self._counted(self._decoder.feed(data))
        self._attempts.check_running(self._host)
        self._speed.update(self._received.raw)

    def finish(self) -> Iterator[_Bytes]:
        """Yield what the decoder still holds; judge a body too short to judge yet."""
        yield from self._counted(self._decoder.finish())
        self._judge(self._sniff.finish())

    def body(self, url: str) -> _Body:
        """Check that the body is complete and not empty; return its description."""
        expected, raw = self._received.expected, self._received.raw
        if expected is not None and raw < expected:
            raise _Transient(
                f"connection closed early ({raw} of {expected} bytes)", host=self._host
            )
        if self.nbytes == 0:
            raise FetchError("empty body")
        sha256 = None if self.digest is None else self.digest.hexdigest()
        return _Body(url, self.nbytes, sha256)

    def _judge(self, refusal: str | None) -> None:
        """Refuse a body that is not an image (never retried); once it is let
        through, a cut may be continued (``partial_for``)."""
        if refusal is not None:
            raise FetchError(refusal)
        if self._sniff.decided and not self.offset:
            self._attempts.continuation.partial = self._partial

    def _counted(self, pieces: Iterator[_Bytes]) -> Iterator[_Bytes]:
        for piece in pieces:
            if not self._sniff.decided:
                self._judge(self._sniff.feed(bytes(piece[:SNIFF_BYTES])))
            if self.nbytes + len(piece) > self._max_bytes:
                raise FetchError(f"larger than --max-bytes ({self._max_bytes} bytes)")
            if self.digest is not None:
                self.digest.update(piece)
            self.nbytes += len(piece)
            yield piece
            if self._attempts.on_bytes is not None:
                self._attempts.on_bytes(len(piece))


@contextmanager
def _translated(url: httpx.URL, host: str, attempts: _Attempts) -> Iterator[_Received]:
    """Translate what one request raises into ``FetchError`` (the one place)."""
    received = _Received()
    try:
        yield received
    except (FetchError, OutputError) as exc:
        if isinstance(exc, FetchError):
            exc.final_url = exc.final_url or str(url)
        raise
    except Exception as exc:
        # Whatever one URL's request raises fails that URL, never the run: a hostile
        # server must not be able to stop a run, and every rerun with it.
        error = _translate(exc, host, attempts, received)
        error.final_url = str(url)
        raise error from exc


class _Download:
    """Drive ``_Attempts`` with a blocking ``httpx.Client`` and ``os.write``."""

    def __init__(
        self,
        attempts: _Attempts,
        client: httpx.Client,
        hosts: HostLimiter,
        cancel: threading.Event,
        *,
        defer_retries: bool = False,
        spares: SpareFiles | None = None,
    ) -> None:
        self.attempts, self.client, self.hosts, self.cancel = (
            attempts,
            client,
            hosts,
            cancel,
        )
        self.defer_retries = defer_retries
        self.spares = spares

    def run(self) -> Fetched:
        """Make attempts until one succeeds, a failure is final, or retries run out."""
        while True:
            hops = self.attempts.begin()
            try:
                outcome = self._request(hops.url)
                while isinstance(outcome, str):
                    hops.follow(outcome)
                    outcome = self._request(hops.url)
            except _Transient as exc:
                delay = self.attempts.retry_delay(exc)
                if self.defer_retries and delay > 0:
                    count, state = self.attempts.count, self.attempts.state()
                    raise RetryLater(
                        exc.reason, delay=delay, attempts=count, state=state
                    ) from exc
                if self.cancel.wait(delay):
                    raise FetchError("interrupted") from exc
            else:
                return self.attempts.fetched(outcome)

    def _request(self, url: httpx.URL) -> _Body | str:
        """Send one GET; return the saved body, or the ``Location`` of a redirect."""
        host = host_key(url)
        with _translated(url, host, self.attempts) as received:
            self.attempts.guard.check(self.client, url)
            with self.hosts.slot(host, self.cancel):
                return self._send(url, host, received)

    def _send(self, url: httpx.URL, host: str, received: _Received) -> _Body | str:
        """Send the GET once a host slot is held."""
        self.attempts.check_running(host)
        request = self.attempts.request(self.client, url)
        with self.attempts.network_deadline():
            response = self.client.send(request, stream=True)
            try:
                location = self.attempts.check_status(response, host)
                if location is not None:
                    return location
                return self._save(response, str(url), received)
            finally:
                response.close()

    def _save(self, response: httpx.Response, url: str, received: _Received) -> _Body:
        reader = self.attempts.body_reader(response, received)
        if reader.offset and reader.digest is not None:
            reader.digest = _digest_of(self.attempts.path, reader.offset)
        append = reader.offset > 0
        with _PartFile(self.attempts.path, append=append, spares=self.spares) as part:
            timeout = self.attempts.http.timeout
            receive = functools.partial(_receive, timeout=timeout)
            for direct in direct_reads(response, receive):
                part.write_all(reader.feed(direct))
            # What direct_reads did not take (all of a body it cannot read). No
            # chunk_size: httpx would buffer reads up to it, so a slow drip would
            # never reach the deadline check. httpcore already reads 64 KiB at a time.
            if not whole(response):
                for data in response.iter_raw():
                    part.write_all(reader.feed(data))
            part.write_all(reader.finish())
            body = reader.body(url)
        return replace(body, identity=part.identity)


class _AsyncDownload:
    """Drive ``_Attempts`` with an ``httpx.AsyncClient`` and aiofiles."""

    def __init__(
        self,
        attempts: _Attempts,
        client: httpx.AsyncClient,
        hosts: AsyncHostLimiter,
        stop: asyncio.Event,
    ) -> None:
        self.attempts, self.client, self.hosts, self.stop = (
            attempts,
            client,
            hosts,
            stop,
        )

    async def run(self) -> Fetched:
        """Make attempts until one succeeds, a failure is final, or retries run out."""
        while True:
            hops = self.attempts.begin()
            try:
                outcome = await self._request(hops.url)
                while isinstance(outcome, str):
                    hops.follow(outcome)
                    outcome = await self._request(hops.url)
            except _Transient as exc:
                if await _stopped_within(self.stop, self.attempts.retry_delay(exc)):
                    raise FetchError("interrupted") from exc
            else:
                return self.attempts.fetched(outcome)

    async def _request(self, url: httpx.URL) -> _Body | str:
        """Send one GET; return the saved body, or the ``Location`` of a redirect."""
        host = host_key(url)
        with _translated(url, host, self.attempts) as received:
            await self.attempts.guard.check_async(self.client, url)
            async with self.hosts.slot(host, self.stop):
                self.attempts.check_running(host)
                request = self.attempts.request(self.client, url)
                with self.attempts.network_deadline():
                    response = await self.client.send(request, stream=True)
                    try:
                        location = self.attempts.check_status(response, host)
                        if location is not None:
                            return location
                        return await self._save(response, str(url), received)
                    finally:
                        await response.aclose()

    async def _save(
        self, response: httpx.Response, url: str, received: _Received
    ) -> _Body:
        import asyncio  # asyncio and aiofiles: only --mode async runs this (start-up)

        import aiofiles

        reader = self.attempts.body_reader(response, received)
        path, offset = self.attempts.path, reader.offset
        opener = _open_partial if offset else _open_part
        if offset:
            reader.digest = await asyncio.to_thread(_digest_of, path, offset)
        try:
            part = await aiofiles.open(path, "ab" if offset else "wb", opener=opener)
        except OSError as exc:
            raise _output_error(self.attempts.path, exc) from exc
        try:
            async for data in response.aiter_raw():
                for piece in reader.feed(data):
                    await part.write(piece)
            for piece in reader.finish():
                await part.write(piece)
        except OSError as exc:
            raise _output_error(self.attempts.path, exc) from exc
        finally:
            await _close_part(part, self.attempts.path)
        return reader.body(url)


def _open_part(path: str, flags: int) -> int:
    """The opener of ``.part`` files: a fresh file we create, never a link."""
    flags = _PART_FLAGS | (flags & os.O_CLOEXEC)
    try:
        return os.open(path, flags, 0o600)
    except FileExistsError:
        # A stale file (or link) from an earlier attempt or run: ours to replace.
        with suppress(FileNotFoundError):
            os.unlink(path)
        return os.open(path, flags, 0o600)


def _open_partial(path: str, flags: int) -> int:
    """The opener of a ``.part`` file being continued: appended to, never a link."""
    return os.open(path, _PARTIAL_FLAGS | (flags & os.O_CLOEXEC))


def _digest_of(path: Path, size: int) -> hashlib._Hash:
    """The SHA-256 state of the first ``size`` bytes of a partial body (all of it).

    Read back from the file rather than kept from the cut attempt, so that what is
    hashed is exactly what is on disk, however the attempt ended.

    Raises:
        OutputError: the file cannot be read, or holds fewer bytes than ``size``.
    """
    digest, left = hashlib.sha256(), size
    try:
        with open(path, "rb", opener=_open_read) as file:
            while left > 0 and (block := file.read(min(left, CHUNK))):
                digest.update(block)
                left -= len(block)
    except OSError as exc:
        raise _output_error(path, exc) from exc
    if left:
        raise OutputError(f"cannot continue {path}: {left} bytes missing")
    return digest


def _open_read(path: str, flags: int) -> int:
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | (flags & os.O_CLOEXEC))


async def _close_part(part: AsyncBufferedIOBase, path: Path) -> None:
    try:
        await part.close()
    except OSError as exc:
        # A delayed write error (NFS, quota) shows up here.
        _remove(path)
        raise _output_error(path, exc) from exc


class _SpeedCheck:
    """Fail a body whose average rate over each window falls below the minimum.

    The window is ``--timeout``: a body slower than ``min_speed`` for that long is a
    stall, as is one that sends nothing for that long (the read timeout).
    """

    def __init__(
        self, http: HttpSettings, clock: Callable[[], float], host: str, start: int
    ) -> None:
        self._window, self._min_speed = http.timeout, http.min_speed
        self._clock, self._host = clock, host
        self._mark_time, self._mark_bytes = clock(), start

    def update(self, total: int) -> None:
        """Record ``total`` bytes received so far; raise if the last window was slow."""
        now = self._clock()
        elapsed = now - self._mark_time
        if elapsed < self._window:
            return
        rate = (total - self._mark_bytes) / elapsed
        if rate < self._min_speed:
            reason = f"too slow: {rate:.0f} B/s for {self._window:g}s"
            raise _Transient(reason, host=self._host, stall=True)
        self._mark_time, self._mark_bytes = now, total


class _PartFile:
    """The ``.part`` being written with ``os.write``; local faults → OutputError.

    A new file; with ``append`` the partial body this download is continuing; or,
    given ``spares`` with one ready, a spare renamed to ``path`` and written over
    from its start (``spares``): closed, it is cut to what was written, so nothing
    of the file it was is left past the body. A failed transfer leaves the file to
    ``_Attempts``, which keeps it only to continue.
    """

    def __init__(
        self, path: Path, *, append: bool = False, spares: SpareFiles | None = None
    ) -> None:
        self.path = path
        self._append = append
        self._spares = spares
        self._fd = -1
        self._over = False
        """Writing over a spare: cut to ``_written`` when closed."""
        self._written = 0
        self.identity: Identity | None = None
        """With ``spares``: the file's device and inode as it was closed, the only
        file a worker may make a spare of (``Fetched.identity``)."""

    def __enter__(self) -> _PartFile:
        if self._spares is not None and not self._append:
            self._fd = _spare_renamed(self._spares, str(self.path))
            self._over = self._fd >= 0
        if self._fd < 0:
            opener = _open_partial if self._append else _open_part
            try:
                self._fd = opener(str(self.path), os.O_WRONLY)
            except OSError as exc:
                raise _output_error(self.path, exc) from exc
        return self

    def write_all(self, pieces: Iterator[_Bytes]) -> None:
        """Append every piece (all of each: ``os.write`` may write less than asked)."""
        try:
            for piece in pieces:
                view = memoryview(piece)
                while view:
                    written = os.write(self._fd, view)
                    self._written += written
                    view = view[written:]
        except OSError as exc:
            raise _output_error(self.path, exc) from exc

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            try:
                if self._over:
                    os.ftruncate(self._fd, self._written)
                if self._spares is not None and exc_type is None:
                    status = os.fstat(self._fd)
                    self.identity = status.st_dev, status.st_ino
            finally:
                os.close(self._fd)
        except OSError as close_exc:
            # A delayed write error (NFS, quota) shows up here; report it if first.
            _remove(self.path)
            if exc_type is None:
                raise _output_error(self.path, close_exc) from close_exc


def _spare_renamed(spares: SpareFiles, path: str) -> int:
    """A ready spare, opened to be written over and renamed to ``path`` (replacing a
    stale file there, as ``_open_part`` does); -1 if there is none to take.

    A spare is taken only if the open file is the one the worker linked (a regular
    file of its device and inode): whatever else is found under its name (gone, a
    link, a FIFO, another file) is passed over and left alone. Opened never through
    a link, and without blocking (a FIFO without a reader fails, it does not wait).
    """
    while (spare := spares.take()) is not None:
        name, identity = spare
        try:
            fd = os.open(name, _SPARE_FLAGS)
        except OSError:
            continue
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode) or (
                (status.st_dev, status.st_ino) != identity
            ):
                os.close(fd)
                continue
            os.rename(name, path)
        except OSError:
            os.close(fd)
            return -1
        return fd
    return -1


class _Identity:
    """Pass bytes through: the body was sent as asked, without a content coding."""

    def feed(self, data: _Bytes) -> Iterator[_Bytes]:
        """Return ``data`` as the one decoded piece."""
        yield data

    def finish(self) -> Iterator[bytes]:
        """Return nothing: an identity body has no trailer."""
        yield from ()


class _Inflater:
    """Decode gzip/deflate in pieces of at most ``CHUNK`` bytes, so caps bite early."""

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        # 47 = 32 + 15: accept a gzip or zlib header, with the largest window.
        self._inflate = zlib.decompressobj(wbits=47)
        self._started = False

    def feed(self, data: _Bytes) -> Iterator[bytes]:
        """Decode ``data``, yielding pieces of at most ``CHUNK`` bytes."""
        while True:
            piece = self._decompress(data)
            data = self._inflate.unconsumed_tail
            if piece:
                yield piece
            if not data and len(piece) < CHUNK:
                return

    def finish(self) -> Iterator[bytes]:
        """Drain what is left and check that the stream ended properly."""
        yield from self.feed(b"")
        if not self._inflate.eof:
            raise FetchError(f"bad {self._encoding} data: stream ends early")

    def _decompress(self, data: _Bytes) -> bytes:
        try:
            piece = self._inflate.decompress(data, CHUNK)
        except zlib.error as exc:
            if self._started or self._encoding != "deflate":
                raise FetchError(f"bad {self._encoding} data: {exc}") from exc
            # Some servers send "deflate" without the zlib header (raw deflate).
            self._inflate = zlib.decompressobj(wbits=-15)
            self._started = True
            return self._decompress(data)
        self._started = True
        return piece


def _decoder_for(content_encoding: str) -> _Identity | _Inflater:
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return _Identity()
    if encoding in ("gzip", "x-gzip", "deflate"):
        return _Inflater(encoding)
    raise FetchError(f"unsupported Content-Encoding {content_encoding.strip()!r}")


def _check_status(
    response: httpx.Response, host: str, max_backoff: float
) -> str | None:
    """Return None for a 200, the target of a redirect, or raise for anything else."""
    code = response.status_code
    if code == 200:
        return None
    if code in _REDIRECT_STATUSES and "Location" in response.headers:
        locations = response.headers.get_list("Location")
        if len(locations) > 1:
            # Joined they make a URL neither target meant ("/a, /b"); curl refuses too.
            raise FetchError(f"ambiguous redirect: {len(locations)} Location headers")
        return locations[0]
    if code in _TRANSIENT_CLIENT_STATUSES or 500 <= code <= 599:
        retry_after = None
        if code in _RATE_LIMIT_STATUSES:
            retry_after = _retry_after(response.headers.get("Retry-After"), max_backoff)
        raise _Transient(
            f"HTTP {code}", host=host, http_status=code, retry_after=retry_after
        )
    if code >= 400:
        raise FetchError(f"HTTP {code}", http_status=code)
    raise FetchError(f"unexpected HTTP status {code}", http_status=code)


def _retry_after(value: str | None, cap: float) -> float | None:
    """Seconds asked for by a ``Retry-After`` header, capped; None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return min(cap, max(0.0, seconds))


def _redirect_target(current: httpx.URL, location: str, seen: set[str]) -> httpx.URL:
    """Resolve ``location`` against ``current`` and refuse unsafe or looping hops."""
    try:
        target = current.join(location)
    except httpx.InvalidURL as exc:
        raise FetchError(f"bad redirect: {exc}", final_url=str(current)) from exc
    if target.scheme not in _ALLOWED_SCHEMES:
        raise FetchError(
            f"redirect to unsupported scheme {target.scheme!r}", final_url=str(current)
        )
    if not target.host:
        raise FetchError("bad redirect: no host", final_url=str(current))
    if target.port is not None and not 0 < target.port < 65536:
        # httpx accepts any number here, and the OS would wrap it to another port.
        raise FetchError(
            f"bad redirect: port {target.port} out of range", final_url=str(current)
        )
    if str(target) in seen:
        raise FetchError("redirect loop", final_url=str(current))
    seen.add(str(target))
    return target


def _parse_url(url: str) -> httpx.URL:
    parsed = _listed_url(url)
    if parsed is not None:
        return parsed
    try:
        return httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise FetchError(f"invalid URL: {exc}") from exc


@functools.lru_cache(maxsize=HOST_KEY_CACHE)
def _listed_url(url: str) -> httpx.URL | None:
    """A URL as listed, parsed once while it is in use (its host key for the feed,
    then its first hop): httpx's parser costs ~50 µs a URL. None if invalid."""
    try:
        return httpx.URL(url)
    except httpx.InvalidURL:
        return None


def host_key(url: str | httpx.URL) -> str:
    """Return "host:port", the unit that per-host limits apply to (the one key).

    The port is always a number (80, 443 by default), an IPv6 host in brackets, an
    international name in its ASCII (IDNA) form, as it is connected to, so that
    ``BÜCHER.example`` and ``xn--bcher-kva.example`` are one host. A string httpx
    cannot parse is its own key: it fails at its first request anyway.
    """
    if isinstance(url, str):
        return _host_key_of_text(url)
    port = url.port or (443 if url.scheme == "https" else 80)
    name = url.raw_host.decode("ascii")
    host = f"[{name}]" if ":" in name else name
    return f"{host}:{port}"


@functools.lru_cache(maxsize=HOST_KEY_CACHE)
def _host_key_of_text(url: str) -> str:
    """``host_key`` of a URL as listed: the feed asks for it three times or more per
    job."""
    parsed = _listed_url(url)
    return url if parsed is None else host_key(parsed)


def _without_userinfo(url: str | None) -> str | None:
    """``url`` without a ``user:password@`` part: records never keep credentials."""
    if url is None or "@" not in url:
        return url
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return url
    if not parsed.userinfo:
        return url
    return str(parsed.copy_with(username=None, password=None))


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    """Scheme, host and port: what must stay the same for credentials to follow."""
    return url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80)


def _content_length(response: httpx.Response) -> int | None:
    try:
        return int(response.headers["Content-Length"])
    except (KeyError, ValueError):
        return None


_DISCONNECTED = ("server disconnected", "peer closed connection")
"""How h11 and httpcore begin a ``RemoteProtocolError`` for a connection that ended
early (a reused keep-alive connection the server had closed, a cut body): worth
another attempt, unlike a reply that is not valid HTTP."""
_REDIRECT_BUILD_ERRORS = ("invalid url in location header", "malformed location")
"""How httpx begins the error for a ``Location`` it cannot turn into a request."""


def _translate(
    exc: Exception, host: str, attempts: _Attempts, received: _Received
) -> FetchError:
    """Turn what one request raised into the FetchError a person reads.

    Every exception a request can raise ends here, with its fate:

    - timeouts (connect, read, write, the pool, ``--deadline``), connection errors,
      resets, a connection closed before or during the reply: ``_Transient`` (a read
      timeout is a stall);
    - a host that does not resolve (``resolve.Unresolvable``): ``_Transient``, but
      tried at most ``UNRESOLVED_ATTEMPTS`` times;
    - a reply that is not valid HTTP (an illegal status line, conflicting
      Content-Length, a bad chunk): final, ``bad HTTP response: …``;
    - a ``Location`` httpx cannot represent (``httpx.InvalidURL``, raised while it
      builds the next request even with redirects off): final, ``bad redirect: …``;
    - an unsupported protocol, an invalid request, httpx's stream and cookie errors,
      and anything else: final, with the exception's type (``unexpected …``); it is
      logged with its traceback at debug level, since it may be a bug of ours.

    Once the run is stopping, any of them is ``interrupted``.
    """
    http = attempts.http
    message = _message(exc)
    if isinstance(exc, httpx.TimeoutException):
        if attempts.past_deadline():
            return _Transient(f"past the {http.deadline:g}s deadline", host=host)
        kind = _TIMEOUT_KINDS.get(type(exc), "network")
        seconds = http.deadline if kind == "pool" else http.timeout
        reason = f"{kind} timeout ({seconds:g}s)"
        return _Transient(reason, host=host, stall=kind == "read")
    if attempts.stop.is_set():
        return FetchError("interrupted")
    lowered = message.lower()
    if isinstance(exc, httpx.InvalidURL) or lowered.startswith(_REDIRECT_BUILD_ERRORS):
        return FetchError(f"bad redirect: {message}")
    if isinstance(exc, idna.IDNAError):
        # httpx decodes the Location's host as it builds the next request (redirects
        # off too); listed URLs with such a host were refused by sources.check_url.
        return FetchError(f"bad redirect: host is not a valid name ({message})")
    if isinstance(exc, httpx.RemoteProtocolError):
        expected = received.expected
        if expected is not None and 0 < received.raw < expected:
            message = f"connection closed early ({received.raw} of {expected} bytes)"
            return _Transient(message, host=host)
        if lowered.startswith(_DISCONNECTED):
            return _Transient(message, host=host)
        return FetchError(f"bad HTTP response: {_readable_protocol_error(message)}")
    if isinstance(exc, Unresolvable):
        return _Transient(
            f"cannot connect: {message}", host=host, most_attempts=UNRESOLVED_ATTEMPTS
        )
    if isinstance(exc, httpx.ConnectError):
        # Through --proxy, the connection that failed is the proxy's: say so, or
        # "Connection refused" reads as the image server's.
        if http.proxy is not None:
            proxy = without_password(http.proxy)
            return _Transient(f"cannot connect to proxy {proxy}: {message}", host=host)
        return _Transient(f"cannot connect: {message}", host=host)
    if isinstance(exc, httpx.NetworkError | httpx.ProxyError):
        return _Transient(f"connection error: {message}", host=host)
    if isinstance(exc, httpx.HTTPError):
        return FetchError(message)
    _log.debug("unexpected error for %s", attempts.job.url, exc_info=exc)
    return FetchError(f"unexpected {type(exc).__name__}: {message}")


def _message(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or of its cause's when it has none.

    asyncio's transports raise httpx errors with an empty message whose cause says
    what happened (``[Errno 104] Connection reset by peer``): the same words then, in
    every mode.
    """
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            break
        if str(seen).strip():
            return _plain(str(seen).strip().splitlines()[0])
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__


_SSL_SOURCE = re.compile(r"\s*\(_ssl\.c:\d+\)$")
_ERRNO = re.compile(r"^\[Errno -?\d+\] ")


def _plain(message: str) -> str:
    """A library's sentence as part of a reason: no final full stop (the reason may
    go on: ``… after 3 attempts``), no ``(_ssl.c:1006)`` source line, no ``[Errno
    111]`` before ``Connection refused``."""
    return _ERRNO.sub("", _SSL_SOURCE.sub("", message)).rstrip(".") or message


def _readable_protocol_error(message: str) -> str:
    """h11's message without the Python repr of the bytes it choked on.

    ``illegal status line: bytearray(b'NOT HTTP')`` → ``illegal status line: NOT HTTP``.
    """
    head, sep, rest = message.partition(": bytearray(b")
    if not sep:
        return message
    seen = rest.removesuffix(")")[1:-1] if len(rest) > 2 else rest
    return f"{head}: {seen[:60]}"


def _output_error(path: Path, exc: OSError) -> OutputError:
    return OutputError(f"cannot write {path}: {exc.strerror or exc}")


def _remove(path: Path) -> None:
    """Delete our own temporary file if it is there; a failure here changes nothing."""
    with suppress(OSError):
        path.unlink(missing_ok=True)
