"""The schedulers, one per ``Mode``, and the two that run in this process.

Every scheduler takes the planned items (jobs, and ready-made records to pass
through) and the run's ``Lifecycle``, and yields one ``Outcome`` per job it took out
(except a job whose claim deferred it: its record comes from the content index). They
differ only in where and when they run the same two steps; every record and event
comes from the lifecycle::

    sequential  this thread: fetch → transform, one item after the other
    threads     ThreadPoolExecutor(threads): fetch → transform per item (one GIL)
    processes   ProcessPoolExecutor(procs): fetch → transform per item, in workers
                (process_modes.run_processes)
    pipeline    threads fetch, worker processes transform (pipeline.run_pipeline)
    async       an event loop: download tasks, transforms in a process pool
                (process_modes.run_async)
    ray         shards of the list as Ray tasks, each running ``threads`` over
                its jobs on a node of the cluster (ray_mode.run_ray; the extra)

Each scheduler owns its pools in one function and releases them in ``finally``; a
stop request (Ctrl-C, a fault, the caller closing the generator) stops feeding,
cancels queued work, lets running items end as "interrupted", then shuts down.

The schedulers in modules of their own are imported when their mode runs: a run
imports only its own (their process machinery and asyncio cost start-up time).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from downloader.fetch import HostLimiter, make_client
from downloader.lifecycle import Lifecycle
from downloader.politeness import process_rate
from downloader.records import Job, Outcome
from downloader.scheduling import (
    IN_FLIGHT_SLACK,
    Lanes,
    Launch,
    Runner,
    schedule,
    stop_when_left_early,
)
from downloader.settings import Mode, Settings
from downloader.transform import configure_pillow

__all__ = ["RUNNERS", "Runner", "run_sequential", "run_threads", "scheduler_ready"]


def run_sequential(
    items: Iterable[Job | Outcome], lifecycle: Lifecycle
) -> Iterator[Outcome]:
    """Download then transform each item in turn, in this thread."""
    settings = lifecycle.settings
    configure_pillow(settings.image)
    hosts = HostLimiter(settings.http.per_host, process_rate(settings.http, 1))
    feed = iter(items)
    with make_client(settings.http, 1) as client:
        # Check before taking an item: what is left of the feed is the caller's.
        while not lifecycle.stopping:
            item = next(feed, None)
            if item is None:
                return
            if isinstance(item, Outcome):
                yield item
                continue
            outcome = lifecycle.run_here(item, client, hosts, "thread-0")
            if outcome is not None:
                yield outcome


def run_threads(
    items: Iterable[Job | Outcome], lifecycle: Lifecycle
) -> Iterator[Outcome]:
    """Download and transform each item in a pool thread; one GIL for all of it."""
    settings = lifecycle.settings
    configure_pillow(settings.image)
    lanes = Lanes("thread")
    hosts = HostLimiter(settings.http.per_host, process_rate(settings.http, 1))
    client = make_client(settings.http, settings.threads)
    pool = ThreadPoolExecutor(settings.threads, thread_name_prefix="downloader")

    def work(job: Job) -> Outcome | None:
        lane = lanes.name(threading.get_ident())
        return lifecycle.run_here(job, client, hosts, lane)

    def settle(
        future: Future[Outcome | None], job: Job, launch: Launch
    ) -> Iterator[Outcome]:
        if future.cancelled():  # still queued when the run stopped: never began
            yield lifecycle.not_started(job)
            return
        outcome = future.result()
        if outcome is not None:
            yield outcome

    try:
        with stop_when_left_early(lifecycle):
            yield from schedule(
                items,
                lifecycle,
                limit=settings.threads * (1 + IN_FLIGHT_SLACK),
                submit=lambda job: pool.submit(work, job),
                settle=settle,
                on_stop=lambda: pool.shutdown(wait=False, cancel_futures=True),
            )
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        client.close()


def run_pipeline(
    items: Iterable[Job | Outcome], lifecycle: Lifecycle
) -> Iterator[Outcome]:
    """Download with threads, transform in worker processes (pipeline.py)."""
    from downloader import pipeline  # imported when its mode runs (start-up time)

    yield from pipeline.run_pipeline(items, lifecycle)


def run_processes(
    items: Iterable[Job | Outcome], lifecycle: Lifecycle
) -> Iterator[Outcome]:
    """Fetch and transform each item in a pool worker (process_modes.py)."""
    from downloader import process_modes  # imported when its mode runs (start-up)

    yield from process_modes.run_processes(items, lifecycle)


def run_async(
    items: Iterable[Job | Outcome], lifecycle: Lifecycle
) -> Iterator[Outcome]:
    """Download in an event loop, transform in a process pool (process_modes.py)."""
    from downloader import process_modes  # imported when its mode runs (asyncio)

    yield from process_modes.run_async(items, lifecycle)


def run_ray(items: Iterable[Job | Outcome], lifecycle: Lifecycle) -> Iterator[Outcome]:
    """Run the jobs in shards on a Ray cluster (imported only when asked for)."""
    from downloader.ray_mode import run_ray as run_on_ray  # Ray is an optional extra

    yield from run_on_ray(items, lifecycle)


@contextlib.contextmanager
def scheduler_ready(settings: Settings) -> Iterator[None]:
    """What the scheduler needs before the run writes a record, for the run.

    For ``ray``: Ray joined (or a local one started). A cluster that does not
    answer stops the run before it plans, so a long list does not get a ``not
    started`` record per URL for an address mistyped; the others need nothing.
    """
    if settings.mode is not Mode.RAY:
        yield
        return
    from downloader.ray_mode import connected  # Ray is an optional extra

    with connected(settings):
        yield


RUNNERS: dict[Mode, Runner] = {
    Mode.SEQUENTIAL: run_sequential,
    Mode.THREADS: run_threads,
    Mode.PROCESSES: run_processes,
    Mode.PIPELINE: run_pipeline,
    Mode.ASYNC: run_async,
    Mode.RAY: run_ray,
}
