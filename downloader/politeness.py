"""Being a polite client: a request rate per host, and servers that say "not for AI".

``RequestRate`` spaces the requests to one host:port (``--rate-per-host``) evenly:
each request reserves the next free moment of its host, ``1 / rate`` seconds after
the one before, and waits for it. The download limiters (``fetch.HostLimiter``,
``fetch.AsyncHostLimiter``) ask it once per request, first hop, redirect hop and
retry alike, while they hold the host's connection slot. Each process has its own
limiters, so ``process_rate`` gives each process that downloads its share of the
run's rate: the limit holds for the whole run in every mode.

``refused_use`` reads ``X-Robots-Tag`` as the reference tool img2dataset does
(``is_disallowed``): a header ``noai`` or ``noimageai``, given for every agent or for
our user agent's product token (``downloader: noai``), means the server asks that the
image not be used for AI datasets; a directive for another agent
(``otherbot: noai``) is not addressed to us.
"""

from __future__ import annotations

import threading
import time

import httpx

from downloader.errors import FetchError
from downloader.settings import HttpSettings

__all__ = ["NOAI_DIRECTIVES", "RequestRate", "process_rate", "refused_use"]

NOAI_DIRECTIVES = frozenset({"noai", "noimageai"})
"""``X-Robots-Tag`` directives that ask not to use a resource for AI (DeviantArt's,
adopted by img2dataset's default ``disallowed_header_directives``)."""


def process_rate(http: HttpSettings, processes: int) -> float | None:
    """The requests per second per host one of ``processes`` downloading processes
    may make, so that together they keep to ``http.rate_per_host``."""
    if http.rate_per_host is None:
        return None
    return http.rate_per_host / processes


class RequestRate:
    """The next moment each host may get a request; thread-safe, asyncio-safe."""

    def __init__(self, rate: float | None) -> None:
        self._interval = 0.0 if rate is None else 1.0 / rate
        self._lock = threading.Lock()
        self._next: dict[str, float] = {}

    def reserve(self, host: str) -> float:
        """Take ``host``'s next turn; return the seconds to wait before using it."""
        if self._interval == 0.0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            turn = max(now, self._next.get(host, now))
            self._next[host] = turn + self._interval
        return turn - now


def _agent_token(user_agent: str) -> str:
    """The product token of a User-Agent (``downloader`` of ``downloader/0.1.0 …``)."""
    return user_agent.split("/", 1)[0].split(None, 1)[0].strip().lower()


def refused_use(headers: httpx.Headers, http: HttpSettings) -> None:
    """Raise ``FetchError`` if the response asks not to be used for AI (and we care).

    Final (never retried): the server said what it wants; no byte of the body is read.
    """
    if not http.honour_noai:
        return
    token = _agent_token(http.user_agent) if http.user_agent.strip() else ""
    for value in headers.get_list("X-Robots-Tag"):
        agent, colon, directives = value.partition(":")
        if not colon:
            agent, directives = "", value
        agent = agent.strip().lower()
        if agent and agent != token:
            continue
        said = {part.strip().lower() for part in directives.split(",")}
        asked = sorted(said & NOAI_DIRECTIVES)
        if asked:
            raise FetchError(
                "the server asked not to be used this way "
                f"(X-Robots-Tag: {', '.join(asked)}; --ignore-noai downloads anyway)"
            )
