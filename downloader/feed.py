"""The pipeline's feed: which job a download takes next, and when.

It owns the planned items, the jobs set aside while their host is at its limit, the
jobs waiting for their next attempt (a ``RetryHeap``, by due time) and the job each
download lane holds; one lock guards it all. Download threads take from it with
``next_item`` (which waits for a due retry when nothing else is left); the pipeline's
coordinator takes from it with ``take`` to feed download processes, whose own threads
keep a ``RetryHeap`` of the same kind.

- Per-host deferral: a job whose host already has its limit of requests in progress
  is set aside (at most ``lookahead`` of them) so that threads serve other hosts
  instead of queueing behind one; a list sorted by host would otherwise starve every
  other host. Past the lookahead, the oldest is taken anyway (wait in line).
- Due retries come before new jobs.
- Abandonment: once the coordinator gives up on the jobs still held (``abandon``),
  a lane that finishes later learns it from ``release`` and posts nothing: those jobs
  were recorded already.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator

from downloader.fetch import host_key
from downloader.records import Job, Outcome
from downloader.steps import Retry

__all__ = ["Feed", "RetryHeap"]


class RetryHeap:
    """Jobs waiting for their next attempt, earliest due first (callers lock it)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Retry]] = []
        self._order = itertools.count()  # ties: first come, first served

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, retry: Retry) -> None:
        """Add ``retry`` to wait until its due time."""
        heapq.heappush(self._heap, (retry.due, next(self._order), retry))

    def pop_due(self) -> Retry | None:
        """Remove and return the earliest retry if it is due, else None."""
        if self._heap and self._heap[0][0] <= time.monotonic():
            return heapq.heappop(self._heap)[2]
        return None

    def until_next(self) -> float | None:
        """Seconds until the earliest retry is due (0 if it is); None if empty."""
        if not self._heap:
            return None
        return max(0.0, self._heap[0][0] - time.monotonic())

    def jobs(self) -> list[Job]:
        """The waiting jobs, earliest due first."""
        return [retry.job for _, _, retry in sorted(self._heap)]

    def drain(self) -> list[Job]:
        """Remove and return every waiting job, earliest due first."""
        jobs, self._heap = self.jobs(), []
        return jobs


class Feed:
    """The planned items, host deferral, waiting retries and held jobs of one run."""

    def __init__(
        self, items: Iterable[Job | Outcome], *, host_limit: int, lookahead: int
    ) -> None:
        self._items: Iterator[Job | Outcome] = iter(items)
        self._host_limit = host_limit
        self._lookahead = lookahead
        self._lock = threading.Lock()
        self._due = threading.Condition(self._lock)
        """Notified when a retry is put aside, and on stop."""
        self._deferred: deque[Job] = deque()
        self._load: Counter[str] = Counter()
        self._waiting = RetryHeap()
        self._held: dict[str, Job] = {}
        self._stopped = False
        self._abandoned = False
        self._exhausted = False

    @property
    def exhausted(self) -> bool:
        """True once the list is used up and nothing is set aside or waiting."""
        with self._lock:
            return self._exhausted and not self._deferred and not self._waiting

    # ---------------------------------------------------------- download threads

    def next_item(self, lane: str) -> Job | Retry | Outcome | None:
        """Take a due retry, the next record, or the next job whose host is free.

        With the list used up and only retries not yet due, wait for the earliest
        (or a stop); None once the list and the retries are both done, or stopped.
        """
        with self._due:
            while not self._stopped:
                item = self._take_due() or self._take()
                if isinstance(item, Job | Retry):
                    self._held[lane] = item.job if isinstance(item, Retry) else item
                if item is not None or not self._waiting:
                    return item
                self._due.wait(self._waiting.until_next())
            return None

    def put_aside(self, lane: str, retry: Retry) -> None:
        """``lane``'s job waits for its retry; the lane moves on to other work."""
        with self._due:
            if self._abandoned:
                return  # the coordinator gave up on it and recorded it
            self._held.pop(lane, None)
            self._waiting.push(retry)
            self._due.notify_all()

    def release(self, lane: str) -> Job | None:
        """``lane`` is done with its job: return it, or None if it was abandoned."""
        with self._lock:
            if self._abandoned:
                return None
            return self._held.pop(lane, None)

    # ---------------------------------------------------------- the coordinator

    def take(self) -> Job | Outcome | None:
        """Take the next record or job without waiting (for download processes)."""
        with self._lock:
            return self._take()

    def requeue(self, job: Job) -> None:
        """Run ``job`` again before any other (its download process died)."""
        with self._lock:
            self._deferred.appendleft(job)

    def done(self, job: Job) -> None:
        """``job``'s request is over: its host has a free slot again."""
        with self._lock:
            host = host_key(job.url)
            self._load[host] -= 1
            if self._load[host] <= 0:
                del self._load[host]

    def stop(self) -> None:
        """Take nothing more; wake the lanes waiting for a retry."""
        with self._due:
            self._stopped = True
            self._due.notify_all()

    def abandon(self) -> list[Job]:
        """Give up on the jobs lanes still hold (the caller records them)."""
        with self._lock:
            self._abandoned = True
            held, self._held = list(self._held.values()), {}
        return held

    def leftovers(self) -> tuple[list[Job], list[Job]]:
        """After a stop: the jobs set aside (never begun) and those waiting to retry."""
        with self._lock:
            set_aside, self._deferred = list(self._deferred), deque()
            return set_aside, self._waiting.drain()

    def in_progress(self) -> list[str]:
        """The URLs held by lanes or waiting to retry, for the stall report."""
        with self._lock:
            urls = [job.url for job in self._held.values()]
            return urls + [f"{job.url} (retry waiting)" for job in self._waiting.jobs()]

    # ---------------------------------------------------------- under the lock

    def _take_due(self) -> Retry | None:
        retry = self._waiting.pop_due()
        if retry is not None:
            self._load[host_key(retry.job.url)] += 1
        return retry

    def _take(self) -> Job | Outcome | None:
        item = self._pick_deferred() or self._pull()
        if isinstance(item, Job):
            self._load[host_key(item.url)] += 1
        return item

    def _pick_deferred(self) -> Job | None:
        for position, job in enumerate(self._deferred):
            if self._host_free(job):
                del self._deferred[position]
                return job
        return None

    def _pull(self) -> Job | Outcome | None:
        for item in self._items:
            if isinstance(item, Outcome) or self._host_free(item):
                return item
            self._deferred.append(item)
            if len(self._deferred) > self._lookahead:
                # Every host in sight is busy: wait in line for the oldest.
                return self._deferred.popleft()
        self._exhausted = True
        return self._deferred.popleft() if self._deferred else None

    def _host_free(self, job: Job) -> bool:
        return self._load[host_key(job.url)] < self._host_limit
