"""Retry waits that free the download thread: ``fetch(defer_retries=True)`` and the
pipeline's heap of waiting retries (threads and download processes)."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from downloader import Status, iter_results, run
from downloader.demo import serve_in_thread
from downloader.errors import FetchError
from downloader.fetch import HostLimiter, RetryLater, fetch, make_client
from downloader.records import Job
from downloader.runtime import Cancellation
from downloader.settings import HttpSettings
from tests.helpers import LocalServer, fast_settings, leftovers, read_manifest

# The /retry-after route asks for 2 s; capped here so a test waits 1 s, not 2.
CAPPED_WAIT_S = 1.0
RETRIES = 2
# A wait far longer than the cancel tests take: the retry must never be made.
LONG_BACKOFF_S = 20.0


def make_job(url: str) -> Job:
    """A job for ``url``, as the sources stage would make it."""
    return Job(index=0, line=1, url=url, key=url, stem="item")


def first_image(corpus: Path) -> str:
    """The name of the first generated image of the corpus."""
    return sorted(p.name for p in corpus.glob("img-*"))[0]


def test_fetch_raises_retry_later_then_continues_the_budget(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """A 429 raises RetryLater (capped wait, 1 attempt); the next call is attempt 2."""
    http = HttpSettings(timeout=5, retries=RETRIES, max_backoff=CAPPED_WAIT_S)
    job = make_job(f"{server.base_url}/retry-after/seconds/{first_image(corpus)}")
    cancel = threading.Event()
    with make_client(http, 1) as client:
        with pytest.raises(RetryLater) as caught:
            fetch(
                job,
                client,
                http,
                tmp_path,
                cancel=cancel,
                hosts=HostLimiter(1),
                defer_retries=True,
            )
        assert list(tmp_path.iterdir()) == []
        fetched = fetch(
            job,
            client,
            http,
            tmp_path,
            cancel=cancel,
            hosts=HostLimiter(1),
            defer_retries=True,
            attempts_done=caught.value.attempts,
        )

    assert caught.value.delay == CAPPED_WAIT_S
    assert caught.value.attempts == 1
    assert fetched.attempts == 2
    assert fetched.path.is_file()


def fetch_until_final(
    job: Job,
    client: httpx.Client,
    http: HttpSettings,
    tmp_dir: Path,
    deferrals: list[RetryLater],
) -> None:
    """Call ``fetch`` again after each RetryLater (kept in ``deferrals``) at once."""
    hosts = HostLimiter(1)
    while True:
        try:
            fetch(
                job,
                client,
                http,
                tmp_dir,
                cancel=threading.Event(),
                hosts=hosts,
                defer_retries=True,
                attempts_done=deferrals[-1].attempts if deferrals else 0,
            )
        except RetryLater as later:
            deferrals.append(later)
        else:
            return


def test_fetch_deferring_keeps_the_retry_budget(
    server: LocalServer, tmp_path: Path
) -> None:
    """Always 503: RetryLater twice, then "HTTP 503 after 3 attempts"; 3 requests."""
    http = HttpSettings(timeout=5, retries=RETRIES, backoff=0.01, max_backoff=0.01)
    job = make_job(f"{server.base_url}/status/503")
    deferrals: list[RetryLater] = []
    with make_client(http, 1) as client, pytest.raises(FetchError) as caught:
        fetch_until_final(job, client, http, tmp_path, deferrals)

    assert not isinstance(caught.value, RetryLater)
    assert caught.value.reason == f"HTTP 503 after {RETRIES + 1} attempts"
    assert caught.value.attempts == RETRIES + 1
    assert [later.attempts for later in deferrals] == [1, 2]
    assert server.request_count("/status/503") == RETRIES + 1


@pytest.mark.parametrize("download_procs", [1, 2])
def test_a_waiting_retry_frees_the_thread_for_other_urls(
    corpus: Path, tmp_path: Path, download_procs: int
) -> None:
    """One thread per process: URLs of another host finish while a 429's retry waits."""
    with (
        serve_in_thread(LocalServer(corpus)) as limited,
        serve_in_thread(LocalServer(corpus)) as other,
    ):
        assert isinstance(limited, LocalServer)
        assert isinstance(other, LocalServer)
        names = sorted(p.name for p in corpus.glob("img-*"))
        retried = f"{limited.base_url}/retry-after/seconds/{names[0]}"
        fast = [other.url_for(name) for name in names[:4]]
        settings = fast_settings(
            tmp_path / "out",
            threads=download_procs,
            procs=1,
            download_procs=download_procs,
            http=HttpSettings(
                timeout=5, retries=RETRIES, max_backoff=CAPPED_WAIT_S, per_host=8
            ),
        )

        outcomes = list(iter_results([retried, *fast], settings))

    by_url = {outcome.url: outcome for outcome in outcomes}
    first, second = (when for _, when in limited.log)
    assert by_url[retried].status is Status.OK
    assert by_url[retried].attempts == 2
    assert [by_url[url].status for url in fast] == [Status.OK] * len(fast)
    # Every other URL was requested before the retry came due (with one thread in
    # all, after the first attempt too; with two processes the other may start first).
    earliest = first if download_procs == 1 else 0.0
    assert all(earliest < when < second for _, when in other.log)
    assert outcomes[-1].url == retried
    assert second - first >= CAPPED_WAIT_S * 0.9


@pytest.mark.parametrize("download_procs", [1, 2])
def test_the_pipeline_keeps_the_retry_budget(
    server: LocalServer, tmp_path: Path, download_procs: int
) -> None:
    """Always 503 with a backoff: exactly retries + 1 requests, the usual reason."""
    url = f"{server.base_url}/status/503"
    settings = fast_settings(
        tmp_path / "out",
        threads=download_procs,
        procs=1,
        download_procs=download_procs,
        http=HttpSettings(timeout=5, retries=RETRIES, backoff=0.05, max_backoff=0.05),
    )

    report = run([url], settings)

    (outcome,) = report.results
    assert outcome.status is Status.FAILED
    assert outcome.error == f"HTTP 503 after {RETRIES + 1} attempts"
    assert outcome.attempts == RETRIES + 1
    assert server.request_count("/status/503") == RETRIES + 1


@pytest.mark.parametrize("download_procs", [1, 2])
def test_cancel_while_a_retry_waits_records_it_interrupted(
    corpus: Path, tmp_path: Path, download_procs: int
) -> None:
    """Cancel during a long retry wait: the run ends at once, the URL is interrupted."""
    names = sorted(p.name for p in corpus.glob("img-*"))
    out = tmp_path / "out"
    settings = fast_settings(
        out,
        threads=download_procs,
        procs=1,
        download_procs=download_procs,
        http=HttpSettings(
            timeout=5,
            retries=RETRIES,
            backoff=LONG_BACKOFF_S,
            max_backoff=LONG_BACKOFF_S,
        ),
    )
    cancel = Cancellation()
    outcomes = []
    # Two servers: a 503 slows its whole host down, and the fast URL must not wait.
    with (
        serve_in_thread(LocalServer(corpus)) as limited,
        serve_in_thread(LocalServer(corpus)) as other,
    ):
        assert isinstance(limited, LocalServer)
        assert isinstance(other, LocalServer)
        waiting = f"{limited.base_url}/flaky/1/{names[0]}"
        fast = other.url_for(names[1])

        for outcome in iter_results([waiting, fast], settings, cancel=cancel):
            outcomes.append(outcome)
            # Once it has begun: with two download processes the fast URL may be
            # done before the other process's first request (load), and a URL
            # cancelled before its first request is "not started", rightly.
            limited.wait_for_requests(1)
            cancel.set()

    by_url = {outcome.url: outcome for outcome in outcomes}
    assert len(outcomes) == 2
    assert by_url[fast].status is Status.OK
    assert by_url[waiting].status is Status.FAILED
    assert by_url[waiting].error == "interrupted"
    assert limited.request_count(f"/flaky/1/{names[0]}") == 1
    assert len(read_manifest(out)) == 2
    assert leftovers(out) == []
