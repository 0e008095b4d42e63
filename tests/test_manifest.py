"""The manifest, failed.txt and resume: what a rerun reads back and what it redoes."""

from __future__ import annotations

from pathlib import Path

from downloader import Status, run
from downloader.settings import HttpSettings
from tests.helpers import LocalServer, corpus_urls, fast_settings, read_manifest

NO_RETRY = HttpSettings(timeout=5, retries=0, backoff=0, per_host=8)


def test_feeding_failed_txt_back_retries_exactly_the_failures(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """failed.txt lists the failures; running it fetches those and nothing else."""
    good = corpus_urls(server, corpus)[:3]
    name = corpus_urls(server, corpus)[3].rpartition("/")[2]
    flaky = f"{server.base_url}/flaky/1/{name}"
    gone = f"{server.base_url}/status/404"
    out = tmp_path / "out"
    run([*good, flaky, gone], fast_settings(out, http=NO_RETRY))
    failed_txt = out / "failed.txt"
    listed = failed_txt.read_text(encoding="utf-8").splitlines()
    before = dict(server.requests)

    report = run(failed_txt, fast_settings(out, http=NO_RETRY))

    assert sorted(listed) == sorted([flaky, gone])
    new_requests = {p: n - before.get(p, 0) for p, n in server.requests.items()}
    assert {p for p, n in new_requests.items() if n} == {
        f"/flaky/1/{name}",
        "/status/404",
    }
    by_url = {o.url: o for o in report.results}
    assert by_url[flaky].status is Status.OK
    assert by_url[gone].error == "HTTP 404"
    assert failed_txt.read_text(encoding="utf-8").splitlines() == [gone]
    records = read_manifest(out)
    assert len(records) == 5  # one line per URL, the latest outcome
    assert sorted(str(r["status"]) for r in records) == ["failed"] + ["ok"] * 4


def test_a_torn_last_line_is_ignored_and_its_url_redone(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """A crash mid-write leaves half a line: the rerun redoes that URL only."""
    urls = corpus_urls(server, corpus)[:3]
    out = tmp_path / "out"
    run(urls, fast_settings(out))
    lines = (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    torn = lines[-1][: len(lines[-1]) // 2]
    (out / "manifest.jsonl").write_text("\n".join([*lines[:-1], torn]))
    redo = [url for url in urls if url not in "\n".join(lines[:-1])]
    before = server.request_count()

    report = run(urls, fast_settings(out))

    assert len(redo) == 1
    assert server.request_count() - before == 1
    assert {o.url: o.status for o in report.results}[redo[0]] is Status.OK
    records = read_manifest(out)
    assert sorted(str(r["url"]) for r in records) == sorted(urls)


def test_an_ok_record_whose_image_was_deleted_is_redone(
    server: LocalServer, corpus: Path, tmp_path: Path
) -> None:
    """Resume trusts the manifest only while the image it names is still there."""
    urls = corpus_urls(server, corpus)[:2]
    out = tmp_path / "out"
    first = run(urls, fast_settings(out))
    (out / str(first.results[0].path)).unlink()
    before = server.request_count()

    again = run(urls, fast_settings(out))

    statuses = {o.url: o.status for o in again.results}
    assert statuses[first.results[0].url] is Status.OK
    assert statuses[first.results[1].url] is Status.SKIPPED
    assert server.request_count() - before == 1
    assert len(read_manifest(out)) == 2
