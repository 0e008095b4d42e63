"""Tests for reading URL lists into jobs: validation, keys, stems, streaming, dedupe."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import os
import re
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from downloader.errors import InputError
from downloader.records import Job, Outcome, Status
from downloader.sources import (
    MAX_URL_LENGTH,
    InputFormat,
    Line,
    LocalFiles,
    UrlList,
    can_reread,
    check_url,
    count_entries,
    local_jobs,
    normalize_url,
    open_source,
    plan_jobs,
    read_lines,
    reads_once,
    safe_name,
    safe_stem,
)

# Generous for a call that must return at once: counting must never wait on a FIFO.
COUNT_WAIT_S = 10.0

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
    """Each job is made before the list is read further ahead (2,000 lines prove it
    as well as 200,000: the check is per line, not a memory figure)."""
    total = 2_000
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


# ---------------------------------------------------------------- input formats


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("list.txt", InputFormat.TXT),
        ("list", InputFormat.TXT),
        ("list.CSV", InputFormat.CSV),
        ("list.tsv", InputFormat.TSV),
        ("list.jsonl", InputFormat.JSONL),
        ("list.ndjson", InputFormat.JSONL),
        ("list.json", InputFormat.TXT),
    ],
)
def test_format_follows_the_extension(name: str, expected: InputFormat) -> None:
    """The extension picks the format; anything unknown is plain text."""
    assert InputFormat.for_path(name) is expected


def test_csv_rows_give_url_name_and_extra_fields(tmp_path: Path) -> None:
    """A CSV header names the columns; quoted fields may hold commas and newlines."""
    path = tmp_path / "list.csv"
    path.write_bytes(
        b"\xef\xbb\xbf Name ,URL,caption,licence\r\n"
        b'cat,http://a/cat.jpg,"a cat, sitting",cc-by\r\n'
        b"\r\n"
        b',http://a/dog.jpg,"two\nlines",\r\n'
        b"bird,http://a/bird.jpg\r\n"
    )

    lines = list(read_lines(path))

    assert lines == [
        Line(
            2,
            "http://a/cat.jpg",
            None,
            "cat",
            (("caption", "a cat, sitting"), ("licence", "cc-by")),
        ),
        Line(
            4,
            "http://a/dog.jpg",
            None,
            None,
            (("caption", "two\nlines"), ("licence", "")),
        ),
        Line(6, "http://a/bird.jpg", None, "bird", (("caption", ""), ("licence", ""))),
    ]


def test_tsv_is_tab_separated(tmp_path: Path) -> None:
    """A .tsv list splits on tabs, so commas stay inside a field."""
    path = tmp_path / "list.tsv"
    path.write_text("url\tnote\nhttp://a/1.jpg\tone, two\n", encoding="utf-8")

    assert list(read_lines(path)) == [
        Line(2, "http://a/1.jpg", None, None, (("note", "one, two"),))
    ]


def test_csv_rows_that_cannot_be_used_become_errors(tmp_path: Path) -> None:
    """Empty url, too many fields and bad bytes fail their row; the rest still come."""
    path = tmp_path / "list.csv"
    path.write_bytes(
        b"url,name\n"
        b",nameless\n"
        b"http://a/1.jpg,one,surplus\n"
        b"http://a/caf\xe9.jpg,two\n"
        b"http://a/4.jpg,four\n"
    )

    lines = list(read_lines(path))

    assert [(line.number, line.error) for line in lines] == [
        (2, "no URL in the 'url' column"),
        (3, "row has 3 fields but the header has 2"),
        (4, "line is not valid UTF-8"),
        (5, None),
    ]
    assert lines[1].text == "http://a/1.jpg"


def test_csv_field_over_the_limit_fails_its_row_and_reading_goes_on(
    tmp_path: Path,
) -> None:
    """A runaway quoted field is cut off by csv's limit; later rows still come."""
    path = tmp_path / "list.csv"
    chunk = "x" * 60_000
    path.write_text(
        f'url\n"http://a/{chunk}\n{chunk}\n{chunk}\nhttp://b/2.jpg\n',
        encoding="utf-8",
    )

    lines = list(read_lines(path))

    assert lines[0].number == 2
    assert lines[0].error is not None
    assert lines[0].error.startswith("malformed row: field larger than field limit")
    assert len(lines[0].text) < 300
    assert lines[-1] == Line(5, "http://b/2.jpg")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("link,name\nhttp://a/1.jpg,x\n", "has no 'url' column"),
        ("http://a/1.jpg\n", "has no 'url' column"),
        ("\n\n", "is empty: it needs a header row"),
        ("url,URL\nhttp://a/1.jpg,x\n", "repeats the column 'url'"),
    ],
)
def test_csv_header_problems_fail_at_call_time(
    tmp_path: Path, content: str, message: str
) -> None:
    """A header without a url column stops the run before it starts."""
    path = tmp_path / "list.csv"
    path.write_text(content, encoding="utf-8")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InputError, match=message):
            read_lines(path)
        gc.collect()

    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_json_lines_give_url_name_and_extra(tmp_path: Path) -> None:
    """JSON Lines: every value keeps its JSON type (NaN, not JSON, stays text); bad
    lines fail."""
    path = tmp_path / "list.jsonl"
    path.write_text(
        '{"url": "http://a/1.jpg", "name": "one", "tags": ["x"], "n": 2, "f": NaN}\n'
        "\n"
        "{not json\n"
        '["http://a/2.jpg"]\n'
        '{"link": "http://a/3.jpg", "id": 3}\n'
        '{"url": " http://a/4.jpg ", "name": 4}\n' + "[" * 50_000 + "\n"
        # 64 levels with the object (kept), then 65 (refused: too deep to pickle
        # safely to a worker at some depth; 600 levels failed the whole run there).
        '{"url": "http://a/5.jpg", "d": ' + "[" * 63 + "]" * 63 + "}\n"
        '{"url": "http://a/6.jpg", "d": ' + "[" * 64 + "]" * 64 + "}\n",
        encoding="utf-8",
    )

    lines = list(read_lines(path))

    assert lines[0] == Line(
        1, "http://a/1.jpg", None, "one", (("tags", ["x"]), ("n", 2), ("f", "NaN"))
    )
    assert lines[1].number == 3
    assert lines[1].error is not None
    # The file's line is the entry's number; the decoder's own "line 1" is not said.
    assert lines[1].error == (
        "line is not valid JSON: expecting property name enclosed in double quotes "
        "at column 2"
    )
    assert lines[2] == Line(4, '["http://a/2.jpg"]', "line is not a JSON object")
    assert lines[3].error == 'object has no "url" string'
    assert lines[3].extra == (("link", "http://a/3.jpg"), ("id", 3))
    assert lines[4] == Line(6, "http://a/4.jpg", None, "4")
    assert lines[5].error == "line is not valid JSON: nested too deeply"
    assert (lines[6].text, lines[6].error) == ("http://a/5.jpg", None)
    assert lines[7].error == "line nests deeper than 64 levels"
    assert len(lines[5].text) < 300


def test_format_can_be_forced_and_stdin_read_as_csv(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An explicit format wins over the name; '-' reads stdin in that format."""
    raw = io.BytesIO(b"url,name\nhttp://a/1.jpg,one\n")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(raw, encoding="utf-8"))

    assert list(read_lines("-", InputFormat.CSV)) == [
        Line(2, "http://a/1.jpg", None, "one")
    ]


def test_strings_can_be_read_as_json_lines() -> None:
    """An iterable of strings works in any format."""
    lines = ['{"url": "http://a/1.jpg"}', '{"url": "http://a/2.jpg"}']

    assert [line.text for line in read_lines(lines, InputFormat.JSONL)] == [
        "http://a/1.jpg",
        "http://a/2.jpg",
    ]


# ------------------------------------------------------------- names and stems


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cat", "cat"),
        ("cat.PNG", "cat"),
        ("2024.05.01", "2024.05.01"),
        ("../../etc/passwd", "etc_passwd"),
        ("-rf now", "rf_now"),
        ("Ünïcode name", "n_code_name"),
        ("...", ""),
        ("x" * 300, "x" * 120),
    ],
)
def test_safe_name(name: str, expected: str) -> None:
    """A name is cut down to a safe stem that stays in the output folder."""
    assert safe_name(name) == expected


def test_names_become_stems_and_collisions_get_a_hash() -> None:
    """The first use of a name is the stem; a later one (any case) gets the hash."""
    lines = [
        Line(1, "http://a/1.jpg", name="cat"),
        Line(2, "http://a/2.jpg", name="Cat.jpg"),
        Line(3, "http://a/3.jpg", name="photo-0123456789ab"),
        Line(4, "http://a/4.jpg", name="..."),
        Line(5, "http://a/5.jpg", extra=(("k", "v"),)),
    ]

    jobs = [job for job in plan_jobs(lines) if isinstance(job, Job)]

    assert jobs[0].stem == "cat"
    assert jobs[1].stem == safe_stem(jobs[1].key, "Cat.jpg")
    assert jobs[1].stem.startswith("Cat-")
    assert STEM_SHAPE.fullmatch(jobs[2].stem)
    assert jobs[2].stem != "photo-0123456789ab"
    assert jobs[3].stem == safe_stem(jobs[3].key)
    assert jobs[4].extra == (("k", "v"),)


def test_failed_rows_keep_their_extra_fields() -> None:
    """A row that is not a URL becomes a failed record that still carries its row."""
    records = list(plan_jobs([Line(2, "not a url", extra=(("id", "7"),))]))

    assert records == [
        Outcome(
            url="not a url",
            status=Status.FAILED,
            line=2,
            error="whitespace or control character in URL",
            extra=(("id", "7"),),
        )
    ]


# ------------------------------------------------------------------ local files


def make_files(folder: Path, names: list[str]) -> None:
    """Create empty files (and their folders) under ``folder``."""
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")


def test_a_folder_gives_its_image_files_sorted(tmp_path: Path) -> None:
    """A folder: image suffixes only, sorted, no subfolders, no other files."""
    make_files(tmp_path, ["b.JPG", "a.png", "notes.txt", "sub/c.jpg", ".hidden.gif"])

    jobs = [job for job in local_jobs(tmp_path) if isinstance(job, Job)]

    names = [Path(str(job.local_path)).name for job in jobs]
    assert names == [".hidden.gif", "a.png", "b.JPG"]
    assert [job.index for job in jobs] == [0, 1, 2]
    assert jobs[1].url == (tmp_path / "a.png").resolve().as_uri()
    assert jobs[1].key == jobs[1].url
    assert STEM_SHAPE.fullmatch(jobs[1].stem)
    assert jobs[1].stem.startswith("a-")


def test_a_glob_recurses_and_skips_the_output_folder(tmp_path: Path) -> None:
    """'**' recurses; files under the excluded output folder are left out."""
    make_files(tmp_path, ["x/1.jpg", "x/y/2.jpg", "out/3.jpg", "x/4.txt"])

    jobs = local_jobs(str(tmp_path / "**" / "*.jpg"), exclude=tmp_path / "out")

    names = sorted(
        Path(str(job.local_path)).name for job in jobs if isinstance(job, Job)
    )
    assert names == ["1.jpg", "2.jpg"]


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("missing", "no such folder or file"),
        ("empty", "no image files to process"),
        ("*.nothing", "no image files to process"),
    ],
)
def test_local_files_problems_fail_at_call_time(
    tmp_path: Path, pattern: str, message: str
) -> None:
    """A missing folder or an empty match is an InputError at once."""
    (tmp_path / "empty").mkdir()

    with pytest.raises(InputError, match=message):
        local_jobs(str(tmp_path / pattern))


def test_open_source_reads_every_kind_of_source(tmp_path: Path) -> None:
    """Paths, UrlList (format forced) and LocalFiles all give jobs."""
    listing = tmp_path / "list.data"
    listing.write_text('{"url": "http://a/1.jpg"}\n', encoding="utf-8")
    make_files(tmp_path, ["pics/p.png"])

    forced = list(open_source(UrlList(listing, InputFormat.JSONL)))
    by_extension = list(open_source(listing))
    local = list(open_source(LocalFiles(tmp_path / "pics")))

    assert [job.url for job in forced if isinstance(job, Job)] == ["http://a/1.jpg"]
    assert isinstance(by_extension[0], Outcome)  # plain text: a JSON line is no URL
    assert [job.local_path for job in local if isinstance(job, Job)] == [
        str((tmp_path / "pics" / "p.png").resolve())
    ]


def test_count_entries_counts_what_a_run_would_read(tmp_path: Path) -> None:
    """Progress total: no blanks, comments or CSV header; None when unknown."""
    text = tmp_path / "urls.txt"
    text.write_text("# list\nhttp://h/a\n\n  http://h/b  \n#x\nhttp://h/a\n")
    table = tmp_path / "urls.csv"
    table.write_text("url,name\nhttp://h/a,a\nhttp://h/b,b\n")

    assert count_entries(text) == 3
    assert count_entries(UrlList(str(table), InputFormat.CSV)) == 2
    assert count_entries(["http://h/a", "http://h/b"]) == 2
    assert count_entries("-") is None
    assert count_entries(tmp_path / "missing.txt") is None
    assert count_entries(LocalFiles(tmp_path)) is None


def test_a_list_that_reads_once_is_never_counted(tmp_path: Path) -> None:
    """A pipe named by /dev/fd/N: no total, and every byte is left for the run."""
    data = b"http://h/a\nhttp://h/b\n"
    reader, writer = os.pipe()
    try:
        os.write(writer, data)
        os.close(writer)
        path = f"/dev/fd/{reader}"

        total = count_entries(path)
        forced = count_entries(UrlList(path, InputFormat.TXT))
        left = os.read(reader, 1024)
    finally:
        os.close(reader)

    assert (total, forced) == (None, None)
    assert left == data


def test_counting_a_fifo_without_a_writer_returns_at_once(tmp_path: Path) -> None:
    """Opening a FIFO to count it would wait for a writer: it is not opened at all."""
    fifo = tmp_path / "urls.txt"
    os.mkfifo(fifo)

    with ThreadPoolExecutor(1) as pool:
        counting = pool.submit(count_entries, fifo)
        try:
            total = counting.result(timeout=COUNT_WAIT_S)
        except TimeoutError:
            # Release the blocked open() so the thread can end, then fail.
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            counting.result(timeout=COUNT_WAIT_S)
            pytest.fail("count_entries blocked on a FIFO with no writer")

    assert total is None


def test_can_reread_only_regular_files(tmp_path: Path) -> None:
    """Only a regular file (or a link to one) can be read twice."""
    text = tmp_path / "urls.txt"
    text.write_text("http://h/a\n")
    (tmp_path / "link.txt").symlink_to(text)
    os.mkfifo(tmp_path / "fifo")

    assert can_reread(text)
    assert can_reread(str(tmp_path / "link.txt"))
    assert not can_reread("-")
    assert not can_reread(tmp_path / "fifo")
    assert not can_reread(tmp_path)
    assert not can_reread("/dev/null")
    assert not can_reread(tmp_path / "missing.txt")


def test_reads_once_names_what_gives_its_lines_once(tmp_path: Path) -> None:
    """'-', FIFOs, pipes and devices read once; files, folders and missing paths not."""
    text = tmp_path / "urls.txt"
    text.write_text("http://h/a\n")
    os.mkfifo(tmp_path / "fifo")
    reader, writer = os.pipe()
    try:
        pipe = reads_once(f"/dev/fd/{reader}")
    finally:
        os.close(reader)
        os.close(writer)

    assert pipe
    assert reads_once("-")
    assert reads_once(tmp_path / "fifo")
    assert reads_once("/dev/null")
    assert not reads_once(text)
    assert not reads_once(tmp_path)
    assert not reads_once(tmp_path / "missing.txt")
