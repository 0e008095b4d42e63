"""Tests for reading URL lists into jobs: validation, keys, stems, streaming, dedupe."""

from __future__ import annotations

import gc
import hashlib
import io
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from downloader.errors import InputError
from downloader.records import Job, Outcome, Status
from downloader.sources import (
    MAX_URL_LENGTH,
    Line,
    check_url,
    normalize_url,
    plan_jobs,
    read_lines,
    safe_stem,
)

STEM_SHAPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,59}-[0-9a-f]{12}")


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("HTTP://Example.COM/a/B.jpg", "http://example.com/a/B.jpg"),
        ("http://example.com:80/x", "http://example.com/x"),
        ("https://example.com:443/x", "https://example.com/x"),
        ("http://example.com:443/x", "http://example.com:443/x"),
        ("https://example.com:8443/x", "https://example.com:8443/x"),
        ("http://example.com:080/x", "http://example.com/x"),
        ("http://example.com:/x", "http://example.com/x"),
        ("http://example.com/x#Part-2", "http://example.com/x"),
        ("http://example.com", "http://example.com/"),
        ("http://example.com?q=1", "http://example.com/?q=1"),
        ("http://example.com/Path/IMG.JPG", "http://example.com/Path/IMG.JPG"),
        ("http://example.com/x?B=2&a=1", "http://example.com/x?B=2&a=1"),
        ("http://example.com/a%2Fb?x=%7E", "http://example.com/a%2Fb?x=%7E"),
        ("http://User:Pass@Example.com/", "http://User:Pass@example.com/"),
        ("http://[::1]:80/x", "http://[::1]/x"),
        ("http://[2001:DB8::1]:8080/", "http://[2001:db8::1]:8080/"),
    ],
)
def test_normalize_url(url: str, key: str) -> None:
    """Scheme, host, default port, fragment and empty path are normalised; rest kept."""
    assert normalize_url(url) == key


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/a.jpg",
        "https://example.com/",
        "HTTPS://EXAMPLE.COM/A.JPG",
        "http://bücher.example/katze.jpg",
        "http://example.com/%E7%8C%AB/猫.jpg?q=ä",
        "http://user:pass@example.com/x.png",
        "http://127.0.0.1:8080/img.png",
        "http://[::1]:8080/img.png",
        "http://2130706433/",
        "http://example.com./trailing-dot",
        pytest.param(
            "http://h/" + "a" * (MAX_URL_LENGTH - len("http://h/")), id="max-length"
        ),
    ],
)
def test_check_url_accepts(url: str) -> None:
    """Usable http(s) URLs, including Unicode hosts, credentials and loopback, pass."""
    assert check_url(url) is None


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/a.jpg", "unsupported scheme 'ftp' (only http and https)"),
        ("file:///etc/passwd", "unsupported scheme 'file' (only http and https)"),
        (
            "javascript:alert(1)",
            "unsupported scheme 'javascript' (only http and https)",
        ),
        ("example.com/a.jpg", "not a URL (no scheme)"),
        ("not a url", "whitespace or control character in URL"),
        ("http://exa mple.com/", "whitespace or control character in URL"),
        ("http://example.com/a\tb", "whitespace or control character in URL"),
        ("http://example.com/\x07.jpg", "whitespace or control character in URL"),
        ("http://example.com/\x85.jpg", "whitespace or control character in URL"),
        ("http://example.com/\u3000.jpg", "whitespace or control character in URL"),
        ("http://", "no host"),
        ("http:///a.jpg", "no host"),
        ("http://user@/a.jpg", "no host"),
        ("http://host:99999/", "invalid port '99999'"),
        ("http://host:0/", "invalid port '0'"),
        ("http://host:8o/", "invalid port '8o'"),
        ("http://host:٨٠/", "invalid port '٨٠'"),
        ("http://[::1]x/", "invalid port 'x'"),
        pytest.param(
            "http://host:" + "9" * 5000 + "/", "invalid port '99999", id="huge-port"
        ),
        ("http://a..b/", "host is not a valid name: 'a..b'"),
        ("http://" + "x" * 64 + ".com/", "host is not a valid name: "),
        ("http://a<b/", "host is not a valid name: 'a<b'"),
        ("http://[::1/", "malformed URL: "),
        ("http://[not-an-ip]/", "malformed URL: "),
        ("http://example.com/\ud800", "URL is not valid Unicode (lone surrogate)"),
        pytest.param(
            "http://example.com/" + "a" * MAX_URL_LENGTH,
            f"URL longer than {MAX_URL_LENGTH} characters",
            id="too-long",
        ),
    ],
)
def test_check_url_rejects(url: str, reason: str) -> None:
    """Unusable texts get a short reason a person understands."""
    result = check_url(url)

    assert result is not None
    assert result.startswith(reason)


def test_safe_stem_is_readable_and_hashed() -> None:
    """The stem is the last segment without extension, plus 12 hex digits of sha256."""
    key = "http://h/a/cat.jpg?x=1"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]

    assert safe_stem(key) == f"cat-{digest}"


def test_safe_stem_differs_by_query() -> None:
    """Two URLs that differ only after '?' get different stems."""
    first = safe_stem("http://h/a/cat.jpg?x=1")
    second = safe_stem("http://h/a/cat.jpg?x=2")

    assert first.startswith("cat-")
    assert second.startswith("cat-")
    assert first != second


@pytest.mark.parametrize(
    ("key", "readable"),
    [
        ("http://h/", "image"),
        ("http://h/.jpg", "image"),
        ("http://h/..%2F..%2Fetc%2Fpasswd", "etc_passwd"),
        ("http://h/..%5C..%5Cwin.ini", "win"),
        ("http://h/...hidden.jpg", "hidden"),
        ("http://h/-rf.png", "rf"),
        ("http://h/my%20photo%20(1).final.JPG", "my_photo_1_.final"),
        ("http://h/a%00b.png", "a_b"),
        ("http://h/%E7%8C%AB.png", "image"),
        ("http://h/caf%C3%A9.jpg", "caf_"),
        pytest.param("http://h/" + "n" * 500 + ".jpg", "n" * 60, id="long-name"),
    ],
)
def test_safe_stem_cleans_names(key: str, readable: str) -> None:
    """Dots, separators, Unicode and length are reduced to a safe readable part."""
    stem = safe_stem(key)

    assert stem.rpartition("-")[0] == readable
    assert STEM_SHAPE.fullmatch(stem)


@given(st.text())
def test_safe_stem_is_always_safe(segment: str) -> None:
    """Whatever the key, the stem is a non-empty plain name of bounded length."""
    for key in (segment, f"http://h/{segment}"):
        stem = safe_stem(key)

        assert STEM_SHAPE.fullmatch(stem)
        assert not {"/", "\\", "\x00"} & set(stem)
        assert len(stem) <= 80


@given(st.lists(st.text(), min_size=2, max_size=50, unique=True))
def test_safe_stem_is_unique(segments: list[str]) -> None:
    """Distinct keys get distinct stems, even when their readable parts agree."""
    keys = [f"http://h/{segment}?same" for segment in segments]

    assert len({safe_stem(key) for key in keys}) == len(keys)


def test_read_lines_skips_blanks_and_comments(tmp_path: Path) -> None:
    """Blank and comment lines are skipped; CRLF, BOM and padding are stripped."""
    path = tmp_path / "urls.txt"
    path.write_bytes(
        b"\xef\xbb\xbfhttp://a/1\r\n\r\n   \t \n# comment\n  # indented\n"
        b"  http://b/2  \r\nhttp://c/3"
    )

    assert list(read_lines(path)) == [
        Line(1, "http://a/1"),
        Line(6, "http://b/2"),
        Line(7, "http://c/3"),
    ]


def test_read_lines_accepts_str_path_and_joined_lists(tmp_path: Path) -> None:
    """A str path works, and a BOM left by `cat`-joined lists is dropped on any line."""
    path = tmp_path / "urls.txt"
    path.write_bytes(b"\xef\xbb\xbfhttp://a/1\n\xef\xbb\xbfhttp://b/2\n")

    assert [line.text for line in read_lines(str(path))] == ["http://a/1", "http://b/2"]


def test_read_lines_marks_bad_bytes_and_goes_on(tmp_path: Path) -> None:
    """A non-UTF-8 line and a NUL line become errors; the other lines still come."""
    path = tmp_path / "urls.txt"
    path.write_bytes(b"http://a/1\nhttp://b/caf\xe9.jpg\nhttp://c/\x00\nhttp://d/4\n")

    lines = list(read_lines(path))

    assert [(line.number, line.error) for line in lines] == [
        (1, None),
        (2, "line is not valid UTF-8"),
        (3, "NUL byte in line"),
        (4, None),
    ]
    assert lines[1].text == "http://b/caf\ufffd.jpg"


def test_read_lines_bounds_an_endless_line(tmp_path: Path) -> None:
    """A line far longer than any URL becomes a short error line; reading goes on."""
    path = tmp_path / "urls.txt"
    path.write_bytes(b"http://a/" + b"x" * 200_000 + b"\nhttp://b/2\n")

    long_line, next_line = read_lines(path)

    assert long_line.number == 1
    assert long_line.error is not None
    assert long_line.error.startswith("line longer than")
    assert len(long_line.text) < 1000
    assert next_line == Line(2, "http://b/2")


def test_read_lines_reads_text_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    """'-' reads standard input, also when it is a text-only stream."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("# list\nhttp://a/1\n\nhttp://b/2\n"))

    assert list(read_lines("-")) == [Line(2, "http://a/1"), Line(4, "http://b/2")]


def test_read_lines_reads_stdin_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """'-' decodes real stdin per line, so one bad line does not stop the rest."""
    raw = io.BytesIO(b"http://a/\xff\nhttp://b/2\n")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(raw, encoding="utf-8"))

    lines = list(read_lines("-"))

    assert [line.error for line in lines] == ["line is not valid UTF-8", None]
    assert lines[1] == Line(2, "http://b/2")


def test_read_lines_accepts_strings() -> None:
    """An iterable of strings is numbered from 1 like a file."""
    urls = ["http://a/1", "", "  http://b/2\n", "#x", "http://c/\x00"]

    assert list(read_lines(urls)) == [
        Line(1, "http://a/1"),
        Line(3, "http://b/2"),
        Line(5, "http://c/\x00", "NUL byte in line"),
    ]


def test_read_lines_missing_file_fails_at_call(tmp_path: Path) -> None:
    """A missing list raises InputError when read_lines is called, not when iterated."""
    path = tmp_path / "missing.txt"

    with pytest.raises(
        InputError, match=r"cannot read URL list .*missing\.txt: No such"
    ):
        read_lines(path)


def test_read_lines_directory_fails_at_call(tmp_path: Path) -> None:
    """A directory given as the list raises InputError at call time."""
    with pytest.raises(InputError, match="cannot read URL list"):
        read_lines(tmp_path)


@pytest.mark.parametrize("pulled", [0, 1])
def test_read_lines_closes_file_when_dropped(tmp_path: Path, pulled: int) -> None:
    """A list left unread or half read is closed when its iterator goes away."""
    path = tmp_path / "urls.txt"
    path.write_text("http://a/1\nhttp://b/2\n")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lines = read_lines(path)
        for _ in range(pulled):
            next(lines)
        del lines
        gc.collect()

    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_plan_jobs_dedupes_variants() -> None:
    """Spellings of one URL give one job with the first occurrence's line and text."""
    lines = [
        Line(1, "http://Example.com/a.jpg"),
        Line(2, "HTTP://example.com:80/a.jpg#top"),
        Line(3, "http://example.com/b.jpg"),
        Line(5, "http://example.com/a.jpg"),
    ]

    jobs = list(plan_jobs(lines))

    assert jobs == [
        Job(
            index=0,
            line=1,
            url="http://Example.com/a.jpg",
            key="http://example.com/a.jpg",
            stem=safe_stem("http://example.com/a.jpg"),
        ),
        Job(
            index=1,
            line=3,
            url="http://example.com/b.jpg",
            key="http://example.com/b.jpg",
            stem=safe_stem("http://example.com/b.jpg"),
        ),
    ]


def test_plan_jobs_reports_each_bad_text_once() -> None:
    """Repeated identical invalid lines give one failed record; line errors pass on."""
    lines = [
        Line(1, "ftp://x/a.jpg"),
        Line(2, "http://ok/a.jpg"),
        Line(3, "ftp://x/a.jpg"),
        Line(4, "http://ok/\ufffd", "line is not valid UTF-8"),
        Line(5, "http://ok/\ufffd", "line is not valid UTF-8"),
    ]

    records = list(plan_jobs(lines))

    failures = [record for record in records if isinstance(record, Outcome)]
    assert failures == [
        Outcome(
            url="ftp://x/a.jpg",
            status=Status.FAILED,
            line=1,
            error="unsupported scheme 'ftp' (only http and https)",
        ),
        Outcome(
            url="http://ok/\ufffd",
            status=Status.FAILED,
            line=4,
            error="line is not valid UTF-8",
        ),
    ]
    assert all(failure.stage is None for failure in failures)
    assert len(records) == 3


def test_plan_jobs_indexes_jobs_in_order() -> None:
    """Job indexes run 0..n-1 over unique valid URLs, skipping bad and repeated ones."""
    texts = ["http://h/1", "bad", "http://h/2", "http://H/1", "http://h/3", "bad"]

    records = list(plan_jobs(read_lines(texts)))

    jobs = [record for record in records if isinstance(record, Job)]
    assert [job.index for job in jobs] == [0, 1, 2]
    assert [job.line for job in jobs] == [1, 3, 5]
    assert len(records) == 4


def test_plan_jobs_streams_lazily() -> None:
    """Over 200,000 lines, each job is made before the list is read further ahead."""
    total = 200_000
    taken = 0
    read_ahead_limit = 2

    def urls() -> Iterator[str]:
        for number in range(total):
            if number > taken + read_ahead_limit:
                raise AssertionError(f"line {number} read after {taken} jobs taken")
            yield f"http://example.com/{number}.jpg"

    jobs = plan_jobs(read_lines(urls()))
    first = next(jobs)
    taken = 1
    for job in jobs:
        assert isinstance(job, Job)
        taken += 1

    assert first == Job(
        index=0,
        line=1,
        url="http://example.com/0.jpg",
        key="http://example.com/0.jpg",
        stem=safe_stem("http://example.com/0.jpg"),
    )
    assert taken == total
