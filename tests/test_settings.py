"""Settings refuse ill-typed and absurd values with one clear line, everywhere.

The library (``Settings``, ``HttpSettings``, ``ImageSpec``), the command line and the
TOML config give the same message for the same bad value; the bounds are the
documented ones (README, "Command line").
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from downloader.cli import USAGE_HINT, load_settings, main
from downloader.errors import InputError
from downloader.settings import (
    HttpSettings,
    ImageFormat,
    ImageSpec,
    Mode,
    NameBy,
    ResizeMode,
    Settings,
    check_environment_proxies,
)

SETTINGS_CLASSES = (Settings, HttpSettings, ImageSpec)
NAN = float("nan")
INF = float("inf")
# One line: a label, "must be", what is expected, and the value that was given.
ONE_LINE = re.compile(r"[^\n]+ must [^\n]+")


def refusal(build: Callable[[], object]) -> str:
    """Return the message of the InputError that ``build`` raises."""
    with pytest.raises(InputError) as caught:
        build()
    return str(caught.value)


@pytest.mark.parametrize(
    ("cls", "name"),
    [
        (cls, field.name)
        for cls in SETTINGS_CLASSES
        for field in dataclasses.fields(cls)
    ],
)
def test_every_field_refuses_a_value_of_the_wrong_type(cls: type, name: str) -> None:
    """Each field of each settings class is checked: an odd object is an InputError."""
    message = refusal(lambda: cls(**{name: object()}))

    label = message.split(" must ")[0]
    assert ONE_LINE.fullmatch(message)
    assert label.lstrip("-").replace("-", "_") in (name, name.removesuffix("s"))
    assert message.endswith("(object)")


BAD_VALUES: list[tuple[type, dict[str, Any], str]] = [
    # Settings
    (Settings, {"threads": 10**6}, "--threads must be an integer from 1 to 1024, "),
    (Settings, {"threads": 0}, r"--threads must be an integer from 1 to 1024, got 0$"),
    (Settings, {"threads": True}, r"--threads .* got True \(bool\)$"),
    (Settings, {"threads": "8"}, r"--threads .* got '8' \(str\)$"),
    (Settings, {"threads": 8.0}, r"--threads .* got 8.0 \(float\)$"),
    (Settings, {"threads": 10**5000}, r"--threads .* got <int too large to show>$"),
    (Settings, {"procs": 2.5}, r"--procs must be an integer from 1 to 512, got 2.5 "),
    (Settings, {"procs": 513}, "--procs must be an integer from 1 to 512, got 513"),
    (Settings, {"procs": False}, r"--procs .* got False \(bool\)"),
    (Settings, {"download_procs": 0}, "--download-procs must be an integer from 1 "),
    (Settings, {"download_procs": 1.0}, r"--download-procs .* \(float\)"),
    (Settings, {"item_timeout": 0}, "--item-timeout must be a number of seconds gr"),
    (Settings, {"item_timeout": NAN}, "--item-timeout .* got nan$"),
    (Settings, {"item_timeout": INF}, "--item-timeout .* at most 86400, got inf$"),
    (Settings, {"item_timeout": "5"}, r"--item-timeout .* got '5' \(str\)$"),
    (Settings, {"item_timeout": True}, r"--item-timeout .* got True \(bool\)$"),
    (Settings, {"max_tasks_per_worker": 0}, "max_tasks_per_worker must be an int"),
    (Settings, {"max_tasks_per_worker": 2.0}, r"max_tasks_per_worker .*\(float\)"),
    (Settings, {"stall_report": -1}, "stall_report must be a number of seconds"),
    (Settings, {"stall_report": 86_401}, "stall_report .* got 86401$"),
    (Settings, {"out": 5}, r"--out must be a non-empty path .* got 5 \(int\)$"),
    (Settings, {"out": ""}, "--out must be a non-empty path"),
    (Settings, {"out": "a\0b"}, "--out .* without NUL characters, got 'a\\\\x00b'$"),
    (Settings, {"out": b"bytes"}, r"--out .* \(bytes\)$"),
    (Settings, {"mode": "thread"}, "--mode must be one of sequential, threads, "),
    (Settings, {"mode": 3}, r"--mode .* got 3 \(int\)$"),
    (Settings, {"name_by": "md5"}, "--name-by must be one of url, sha256, got 'md5'"),
    (Settings, {"force": "yes"}, r"--force must be True or False, got 'yes' \(str"),
    (Settings, {"keep_originals": 1}, r"--keep-originals .* got 1 \(int\)$"),
    (Settings, {"http": {}}, r"http must be .*HttpSettings.* got {} \(dict\)$"),
    (Settings, {"image": None}, r"image must be .*ImageSpec.* \(NoneType\)$"),
    # HttpSettings
    (HttpSettings, {"timeout": 0}, "--timeout must be a number of seconds greater"),
    (HttpSettings, {"timeout": 86_401}, "--timeout .* at most 86400, got 86401$"),
    (HttpSettings, {"timeout": NAN}, "--timeout .* got nan$"),
    (HttpSettings, {"timeout": "30"}, r"--timeout .* got '30' \(str\)$"),
    (HttpSettings, {"deadline": -INF}, "--deadline .* got -inf$"),
    (HttpSettings, {"deadline": 10**400}, "--deadline .* at most 86400, got 1000"),
    (HttpSettings, {"deadline": False}, r"--deadline .* \(bool\)$"),
    (HttpSettings, {"retries": -1}, "--retries must be an integer from 0 to 100, "),
    (HttpSettings, {"retries": 101}, "--retries .* got 101$"),
    (HttpSettings, {"retries": 1.0}, r"--retries .* got 1.0 \(float\)$"),
    (HttpSettings, {"backoff": -0.5}, "backoff must be a number of seconds from 0"),
    (HttpSettings, {"max_backoff": INF}, "max_backoff .* got inf$"),
    (HttpSettings, {"max_bytes": 0}, "--max-bytes must be a whole number of bytes "),
    (HttpSettings, {"max_bytes": 2**40 + 1}, "--max-bytes .* 1099511627776, got"),
    (HttpSettings, {"max_bytes": 1e6}, r"--max-bytes .* \(float\)$"),
    (HttpSettings, {"max_redirects": 51}, "max_redirects must be an integer from 0"),
    (HttpSettings, {"per_host": 0}, "--per-host must be an integer from 1 to 1024"),
    (HttpSettings, {"per_host": 1025}, "--per-host .* got 1025$"),
    (HttpSettings, {"min_speed": -1}, "min_speed must be a whole number of bytes"),
    (HttpSettings, {"min_speed": True}, r"min_speed .* \(bool\)$"),
    (HttpSettings, {"user_agent": 5}, r"--user-agent must be a str.* \(int\)$"),
    (HttpSettings, {"user_agent": "a\r\nX: b"}, "--user-agent .* printable ASCII"),
    # httpx sends header values as ASCII (this crashed the client as it was made) and
    # h11 refuses spaces at either end (every request failed).
    (HttpSettings, {"user_agent": "bot \u00fc"}, "--user-agent .* got 'bot \u00fc'$"),
    (HttpSettings, {"user_agent": " bot"}, "--user-agent .* without spaces at either"),
    (
        HttpSettings,
        {"headers": [("X-A", "\u00fc")]},
        "--header 'X-A' .* printable ASCII",
    ),
    (HttpSettings, {"headers": [("X-A", "a ")]}, "--header 'X-A' .* got 'a '$"),
    (HttpSettings, {"headers": "X: y"}, r"--header must be .*pairs.* \(str\)$"),
    (HttpSettings, {"headers": [("X",)]}, r"--header must be .*pairs.*\(tuple\)$"),
    (HttpSettings, {"headers": [("X", 1)]}, r"--header must be .*pairs.*\(tuple"),
    (HttpSettings, {"headers": [b"Xy"]}, r"--header must be .*pairs.*\(bytes\)$"),
    (HttpSettings, {"headers": 5}, r"--header .* got 5 \(int\)$"),
    (HttpSettings, {"verify": "no"}, r"verify must be True or False, got 'no'"),
    (HttpSettings, {"block_private": None}, r"--block-private .* \(NoneType\)$"),
    # ImageSpec
    (ImageSpec, {"resize": "squash"}, "--resize must be one of fit, fill, exact, "),
    (ImageSpec, {"max_size": 0}, "--max-size must be an integer from 1 to 65535"),
    (ImageSpec, {"max_size": 65_536}, "--max-size .* got 65536$"),
    (ImageSpec, {"max_size": True}, r"--max-size .* \(bool\)$"),
    (
        ImageSpec,
        {"size": (0, 10)},
        "--size sides must be greater than 0 and .*got 0x10$",
    ),
    (ImageSpec, {"size": (10, 65_536)}, "--size sides .* at most 65535, got 10x65536$"),
    (ImageSpec, {"size": (10,)}, r"--size .* got \(10,\) \(tuple\)$"),
    (ImageSpec, {"size": "800x600"}, r"--size .* got '800x600' \(str\)$"),
    (ImageSpec, {"size": (10.0, 10)}, r"--size .* got \(10.0, 10\) \(tuple\)$"),
    (ImageSpec, {"size": (True, 10)}, r"--size .* \(tuple\)$"),
    (
        ImageSpec,
        {"sizes": ((0, 64),)},
        "--sizes sides must be greater than 0 .* got 0x64$",
    ),
    (ImageSpec, {"sizes": 5}, r"--sizes must be .* got 5 \(int\)$"),
    (ImageSpec, {"sizes": "256"}, r"--sizes must be .* \(str\)$"),
    (ImageSpec, {"sizes": [(n, n) for n in range(1, 66)]}, "at most 64 sizes, got 65"),
    (ImageSpec, {"sizes": ((8, 8), (8, 8))}, "--sizes must not repeat a size"),
    (ImageSpec, {"format": "tiff"}, "--format must be one of jpeg, webp, png, avif"),
    (ImageSpec, {"format": 1}, r"--format .* got 1 \(int\)$"),
    (ImageSpec, {"quality": 0}, "--quality must be an integer from 1 to 100, got 0"),
    (ImageSpec, {"quality": 101}, "--quality .* got 101$"),
    (ImageSpec, {"quality": 85.0}, r"--quality .* got 85.0 \(float\)$"),
    (ImageSpec, {"upscale": 1}, r"--upscale must be True or False, got 1 \(int\)$"),
    (ImageSpec, {"progressive": "no"}, r"--progressive .* \(str\)$"),
    (ImageSpec, {"optimize": 0}, r"--optimize .* \(int\)$"),
    (ImageSpec, {"keep_metadata": None}, r"--keep-metadata .* \(NoneType\)$"),
    (ImageSpec, {"grayscale": ""}, r"--grayscale .* \(str\)$"),
    (ImageSpec, {"transform": 5}, r"--transform must be a str.* \(int\)$"),
    (ImageSpec, {"max_pixels": 0}, "--max-pixels must be an integer from 1 to "),
    (ImageSpec, {"max_pixels": 65_535**2 + 1}, "--max-pixels .* got 4294836226$"),
]


@pytest.mark.parametrize(("cls", "values", "message"), BAD_VALUES)
def test_bad_values_are_one_line_input_errors(
    cls: type, values: dict[str, Any], message: str
) -> None:
    """A wrong type, NaN, infinity or a value past its bound: one InputError line."""
    text = refusal(lambda: cls(**values))

    assert re.search(message, text), text
    assert ONE_LINE.fullmatch(text)


@given(st.integers())
def test_threads_take_exactly_the_integers_from_1_to_1024(threads: int) -> None:
    """In range: kept as given; outside: refused, the value named."""
    if 1 <= threads <= 1024:
        assert Settings(threads=threads).threads == threads
    else:
        assert refusal(lambda: Settings(threads=threads)).endswith(f"got {threads}")


@given(st.one_of(st.booleans(), st.text(), st.floats(), st.none(), st.binary()))
def test_threads_refuse_every_non_integer(value: object) -> None:
    """Booleans, text, floats (even 8.0), None and bytes are refused, type named."""
    message = refusal(lambda: Settings(threads=value))  # type: ignore[arg-type]

    assert message.endswith(f"({type(value).__name__})")


@given(st.one_of(st.integers(), st.floats()))
def test_timeout_takes_finite_numbers_up_to_a_day(seconds: float) -> None:
    """Ints and floats in (0, 86400] are kept as floats; others are refused."""
    if 0 < seconds <= 86_400:
        timeout = HttpSettings(timeout=seconds).timeout
        assert type(timeout) is float
        assert timeout == float(seconds)
    else:
        assert "--timeout must be" in refusal(lambda: HttpSettings(timeout=seconds))


def test_the_bounds_themselves_are_accepted() -> None:
    """Each bound is inclusive: the largest documented value works."""
    settings = Settings(
        threads=1024,
        procs=512,
        download_procs=512,
        item_timeout=86_400,
        http=HttpSettings(
            timeout=86_400,
            deadline=86_400,
            retries=100,
            max_bytes=2**40,
            max_redirects=50,
            per_host=1024,
            min_speed=2**30,
            backoff=0,
        ),
        image=ImageSpec(size=(65_535, 65_535), quality=100, max_pixels=65_535**2),
    )

    assert (settings.threads, settings.procs, settings.http.retries) == (1024, 512, 100)
    assert settings.http.backoff == 0.0


def test_convenient_values_are_converted() -> None:
    """Enum values as strings, str paths, ints for seconds, lists and dict headers."""
    settings = Settings(
        out="imgs",  # type: ignore[arg-type]
        mode="threads",  # type: ignore[arg-type]
        name_by="sha256",  # type: ignore[arg-type]
        item_timeout=5,
        http=HttpSettings(timeout=5, headers={"X-A": "1"}),  # type: ignore[arg-type]
        image=ImageSpec(
            resize="fill",  # type: ignore[arg-type]
            format="png",  # type: ignore[arg-type]
            size=[20, 10],  # type: ignore[arg-type]
            sizes=[[8, 8], (4, 4)],  # type: ignore[arg-type]
        ),
    )

    assert settings.out == Path("imgs")
    assert (settings.mode, settings.name_by) == (Mode.THREADS, NameBy.SHA256)
    assert (settings.item_timeout, settings.http.timeout) == (5.0, 5.0)
    assert settings.http.headers == (("X-A", "1"),)
    assert (settings.image.resize, settings.image.format) == (
        ResizeMode.FILL,
        ImageFormat.PNG,
    )
    assert (settings.image.size, settings.image.sizes) == ((20, 10), ((8, 8), (4, 4)))


def test_a_path_like_out_and_replace_keep_working(tmp_path: Path) -> None:
    """os.PathLike is a path; dataclasses.replace re-checks and keeps the values."""

    class Place(os.PathLike[str]):
        def __fspath__(self) -> str:
            return str(tmp_path / "out")

    settings = Settings(out=Place())  # type: ignore[arg-type]
    again = dataclasses.replace(settings, threads=2)

    assert again.out == tmp_path / "out"
    assert again.threads == 2
    with pytest.raises(InputError, match="--threads"):
        dataclasses.replace(settings, threads=0)


def test_the_default_procs_is_always_accepted() -> None:
    """The default (this machine's cores) never exceeds the --procs bound."""
    assert 1 <= Settings().procs <= 512


# ---------------------------------------------------------------- command line

LIST = ["urls.txt", "--dry-run", "--no-config"]


@pytest.mark.parametrize(
    ("argv", "cls", "values"),
    [
        (["--threads", "1000000"], Settings, {"threads": 1_000_000}),
        (["--threads", "0"], Settings, {"threads": 0}),
        (["--procs", "0"], Settings, {"procs": 0}),
        (["--procs", "100000"], Settings, {"procs": 100_000}),
        (["--download-procs", "9999"], Settings, {"download_procs": 9999}),
        (["--per-host", "0"], HttpSettings, {"per_host": 0}),
        (["--per-host", "5000"], HttpSettings, {"per_host": 5000}),
        (["--timeout", "nan"], HttpSettings, {"timeout": NAN}),
        (["--timeout", "inf"], HttpSettings, {"timeout": INF}),
        (["--timeout", "0"], HttpSettings, {"timeout": 0.0}),
        (["--deadline", "1e9"], HttpSettings, {"deadline": 1e9}),
        (["--retries", "-1"], HttpSettings, {"retries": -1}),
        (["--retries", "1000"], HttpSettings, {"retries": 1000}),
        (["--max-bytes", "2000G"], HttpSettings, {"max_bytes": 2000 * 1024**3}),
        (["--max-bytes", "0"], HttpSettings, {"max_bytes": 0}),
        (["--item-timeout", "-5"], Settings, {"item_timeout": -5.0}),
        (["--quality", "101"], ImageSpec, {"quality": 101}),
        (["--max-size", "0"], ImageSpec, {"max_size": 0}),
        (["--max-size", "70000"], ImageSpec, {"max_size": 70_000}),
        (["--size", "0x10"], ImageSpec, {"size": (0, 10)}),
        (["--sizes", "10,99999"], ImageSpec, {"sizes": ((10, 10), (99999, 99999))}),
        (["--out", ""], Settings, {"out": ""}),
        (["--header", "X: a\rb"], HttpSettings, {"headers": [("X", "a\rb")]}),
    ],
)
def test_the_command_line_shows_the_library_message(
    argv: list[str],
    cls: type,
    values: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A flag's bad value: exit 2 and exactly the library's message, on one line."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/x.jpg\n")

    code = main([*LIST, *argv])

    captured = capsys.readouterr()
    assert code == 2
    assert captured.err == f"error: {refusal(lambda: cls(**values))}{USAGE_HINT}\n"
    assert captured.out == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--demo-count", "0"],
            "--demo-count must be an integer from 1 to 10000, got 0",
        ),
        (["--demo-count", "10001"], "--demo-count must be an integer from 1 to 10000"),
        (
            ["--demo-latency", "-1"],
            "--demo-latency must be a number of seconds from 0 ",
        ),
        (["--demo-latency", "nan"], "--demo-latency .* from 0 to 60, got nan"),
    ],
)
def test_bad_demo_options_exit_2_before_the_corpus_is_made(
    argv: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The demo's own options are bounded too: one line, exit 2, nothing served."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    code = main(["--demo", "--no-config", "--out", "o", *argv])

    err = capsys.readouterr().err
    assert code == 2
    assert re.fullmatch(f"error: {message}.*\n", err), err
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("text", "cls", "values"),
    [
        ('threads = "8"\n', Settings, {"threads": "8"}),
        ("threads = true\n", Settings, {"threads": True}),
        ("threads = 2.5\n", Settings, {"threads": 2.5}),
        ("threads = 1000000\n", Settings, {"threads": 1_000_000}),
        ('procs = "4"\n', Settings, {"procs": "4"}),
        ("timeout = nan\n", HttpSettings, {"timeout": NAN}),
        ("timeout = inf\n", HttpSettings, {"timeout": INF}),
        ('timeout = "30"\n', HttpSettings, {"timeout": "30"}),
        ("retries = 1e3\n", HttpSettings, {"retries": 1000.0}),
        ("max-bytes = true\n", HttpSettings, {"max_bytes": True}),
        ('max-bytes = "2000G"\n', HttpSettings, {"max_bytes": 2000 * 1024**3}),
        ("quality = 0\n", ImageSpec, {"quality": 0}),
        ("size = true\n", ImageSpec, {"size": True}),
        ('size = "0x5"\n', ImageSpec, {"size": (0, 5)}),
        ("mode = 3\n", Settings, {"mode": 3}),
        ('headers = ["X: a\\u0000b"]\n', HttpSettings, {"headers": [("X", "a\0b")]}),
        ("out = 5\n", Settings, {"out": 5}),
        ('out = ""\n', Settings, {"out": ""}),
        ("transform = 5\n", ImageSpec, {"transform": 5}),
    ],
)
def test_a_bad_config_value_gives_the_library_message(
    text: str,
    cls: type,
    values: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A TOML value of the wrong type or range: exit 2, the file and key named, then
    the library's own words; load_settings raises the same."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "downloader.toml").write_text(text)
    key = text.split(" = ")[0]
    library = refusal(lambda: cls(**values))
    label = library.split(" ")[0]  # "--threads"; the file names the key instead
    expected = f"config downloader.toml: {key}" + library.removeprefix(label)

    code = main(["urls.txt", "--dry-run"])

    assert code == 2
    assert capsys.readouterr().err == f"error: {expected}{USAGE_HINT}\n"
    assert refusal(lambda: load_settings("downloader.toml")) == expected


def test_a_config_date_is_shown_as_written(tmp_path: Path) -> None:
    """TOML has dates: a date where a number goes is shown in its ISO form, as the
    file wrote it, never as Python's ``datetime.date(2026, 1, 1)``."""
    path = tmp_path / "downloader.toml"
    path.write_text("threads = 2026-01-01\ntimeout = 07:30:00\n")

    message = refusal(lambda: load_settings(path))

    assert message.endswith(
        "threads must be an integer from 1 to 1024, got 2026-01-01 (date)"
    )
    path.write_text("timeout = 07:30:00\n")
    assert refusal(lambda: load_settings(path)).endswith("got 07:30:00 (time)")


def test_config_numbers_and_sizes_still_read(tmp_path: Path) -> None:
    """TOML ints for seconds, sizes as text or numbers, and lists still work."""
    config = tmp_path / "c.toml"
    config.write_text(
        'timeout = 5\ndeadline = 7.5\nmax-bytes = "20M"\nsizes = [256, 1024]\n'
        "per-host = 2\nquality = 70\n"
    )

    settings = load_settings(config)

    assert (settings.http.timeout, settings.http.deadline) == (5.0, 7.5)
    assert settings.http.max_bytes == 20 * 1024**2
    assert settings.image.sizes == ((256, 256), (1024, 1024))
    assert (settings.http.per_host, settings.image.quality) == (2, 70)


def test_config_max_bytes_as_a_number(tmp_path: Path) -> None:
    """max-bytes takes a TOML integer as well as its "20M" text."""
    config = tmp_path / "c.toml"
    config.write_text("max-bytes = 500000\nsize = 10\n")

    settings = load_settings(config)

    assert settings.http.max_bytes == 500_000
    assert settings.image.size == (10, 10)


def test_the_demo_options_are_checked_in_a_config_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """demo-count = "8" in a config is refused like threads = "8"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "downloader.toml").write_text('demo-count = "8"\n')

    code = main(["--demo"])

    assert code == 2
    assert capsys.readouterr().err == (
        "error: config downloader.toml: demo-count must be an integer from 1 to "
        f"10000, got '8' (str){USAGE_HINT}\n"
    )


@pytest.mark.parametrize("text", ["1.5", "0.0001k", "1.0000001M"])
def test_a_fraction_of_a_byte_is_refused(
    text: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--max-bytes 1.5 used to become 1 byte (every URL then failed); now exit 2."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/x.jpg\n")
    (tmp_path / "downloader.toml").write_text(f'max-bytes = "{text}"\n')

    from_flag = main([*LIST, "--max-bytes", text])
    flag_err = capsys.readouterr().err
    from_config = main(["urls.txt", "--dry-run"])

    assert from_flag == 2
    assert f"not a whole number of bytes: '{text}'" in flag_err
    assert from_config == 2
    assert "not a whole number of bytes" in capsys.readouterr().err


def test_a_fraction_with_a_unit_is_a_whole_number_of_bytes(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('max-bytes = "1.5M"\n')

    assert load_settings(config).http.max_bytes == 1_572_864


def test_a_proxy_is_refused_without_showing_its_password(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--proxy with a scheme httpx cannot use, and the same in HTTPS_PROXY (which
    crashed every download thread or worker as it made its client): one line, exit 2,
    nothing written, and the password never shown; --proxy replaces the variable."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    base = ["urls.txt", "--no-config", "--out", "out"]

    flag = main([*base, "--proxy", "socks5://me:s3cret@127.0.0.1:1"])
    flag_err = capsys.readouterr().err
    monkeypatch.setenv("HTTPS_PROXY", "garbage://me:s3cret@127.0.0.1:1")
    env = main(base)
    env_err = capsys.readouterr().err

    assert (flag, env) == (2, 2)
    assert flag_err == (
        "error: --proxy must be an http:// or https:// URL, got "
        f"'socks5://***@127.0.0.1:1'{USAGE_HINT}\n"
    )
    assert env_err.startswith("error: HTTPS_PROXY (in the environment; or give")
    assert "s3cret" not in flag_err + env_err
    assert not (tmp_path / "out").exists()
    check_environment_proxies(HttpSettings(proxy="http://127.0.0.1:3128"))  # no error
