"""Being a polite client: a request rate per host, and servers that say "not for AI".

``RequestRate`` spaces the requests to one host:port (``--rate-per-host``) evenly,
for the whole run. The download limiters (``fetch.HostLimiter``,
``fetch.AsyncHostLimiter``) ask it once per request, first hop, redirect hop and
retry alike, while they hold the host's connection slot, and ``take`` a turn only
when it is due, *after* waking: a turn reserved ahead and then slept for would go
whenever the sleeper wakes, and a late thread or a busy event loop wakes several
sleepers at once (requests 6 ms apart at ``4/s`` were seen). Taking the turn on
waking measures the gap from the request before, as it really went.

Each process has its own limiters, so where several processes download
(``processes``, ``pipeline`` with ``--download-procs`` above 1) each gets a ``Pace``:
its share of the rate (``process_pace``), *and* its own phase. Process ``i`` of
``P`` may send only in a short window (``WINDOW`` of the run's interval ``d``) at
``i * d`` after each multiple of ``P * d`` of the monotonic clock, which all processes
of one machine share: their windows interleave, and two requests from different
processes are at least ``(1 - WINDOW) * d`` apart. Without phases each process
started its schedule at its own zero, and ``P`` requests came together every
``P * d``. A request that misses its window waits for the next one: load can make
the gaps longer, never shorter.

``refused_use`` reads ``X-Robots-Tag`` as the reference tool img2dataset does
(``is_disallowed``): a header ``noai`` or ``noimageai``, given for every agent or for
our user agent's product token (``downloader: noai``), means the server asks that the
image not be used for AI datasets; a directive for another agent
(``otherbot: noai``) is not addressed to us.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import httpx

from downloader.errors import FetchError
from downloader.settings import HttpSettings

__all__ = [
    "NOAI_DIRECTIVES",
    "WINDOW",
    "Pace",
    "RequestRate",
    "process_pace",
    "process_rate",
    "refused_use",
]

NOAI_DIRECTIVES = frozenset({"noai", "noimageai"})
"""``X-Robots-Tag`` directives that ask not to use a resource for AI (DeviantArt's,
adopted by img2dataset's default ``disallowed_header_directives``)."""


WINDOW = 0.1
"""The part of the run's interval in which one of several downloading processes may
send: the closest two of their requests can come is ``1 - WINDOW`` of it."""


@dataclass(frozen=True, slots=True)
class Pace:
    """One process's part of ``--rate-per-host``: the run's interval between two
    requests to a host, and which of the ``processes`` sharing it this one is."""

    interval: float
    processes: int = 1
    index: int = 0

    def off_window(self, now: float) -> float:
        """Seconds from ``now`` until this process's next window (0: inside one)."""
        if self.processes == 1:
            return 0.0
        cycle = self.interval * self.processes
        into = math.fmod(now - self.index * self.interval, cycle) % cycle
        return 0.0 if into < WINDOW * self.interval else cycle - into


def process_pace(http: HttpSettings, processes: int, index: int) -> Pace | None:
    """The pace of the ``index``-th (any number; taken modulo) of ``processes``
    downloading processes, so that together they keep to ``http.rate_per_host``."""
    if http.rate_per_host is None:
        return None
    return Pace(1.0 / http.rate_per_host, processes, index % processes)


def process_rate(http: HttpSettings, processes: int) -> float | None:
    """The requests per second per host one of ``processes`` downloading processes
    may make, so that together they keep to ``http.rate_per_host``. Without a phase
    their requests may come together: ``process_pace`` for several processes."""
    if http.rate_per_host is None:
        return None
    return http.rate_per_host / processes


class RequestRate:
    """The next moment each host may get a request; thread-safe, asyncio-safe.

    ``pace``: a ``Pace``, or a rate in requests per second for one process alone.
    """

    def __init__(self, pace: Pace | float | None) -> None:
        if pace is not None and not isinstance(pace, Pace):
            pace = Pace(1.0 / pace)
        self._pace = pace
        self._interval = 0.0 if pace is None else pace.interval * pace.processes
        self._lock = threading.Lock()
        self._next: dict[str, float] = {}

    def take(self, host: str) -> float:
        """Take ``host``'s turn if it is due now and return 0; else take nothing and
        return the seconds to wait before asking again (the caller loops)."""
        if self._pace is None:
            return 0.0
        now = time.monotonic()
        with self._lock:
            wait = self._next.get(host, now) - now
            wait = wait if wait > 0 else self._pace.off_window(now)
            if wait <= 0:
                self._next[host] = now + self._interval
        return max(wait, 0.0)

    def reserve(self, host: str) -> float:
        """Take ``host``'s next turn ahead; return the seconds to wait before using
        it. A late waker goes late and close to the next one: prefer ``take``."""
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
