"""Defaults from a TOML file: ``--config FILE``, else ``./downloader.toml`` if present.

The keys are the command line's long option names, with the same values::

    threads = 8
    max-bytes = "20M"
    format = "webp"
    sizes = [256, 1024]            # a list is joined with commas: "256,1024"
    headers = ["Authorization: Bearer ..."]
    insecure = false               # switches take true or false

Flags given on the command line win over the file: a value replaces the file's (for
the box options ``max-size``/``size``/``sizes``, one given on the command line
replaces whichever the file set), and ``--header`` adds to the file's headers (a
header of the same name replaces the file's). Relative paths are relative to the
current folder, as on the command line. An unknown key, a table or a bad value is a
usage error (exit 2) naming the file and the key.

A value has its TOML type: a number option takes a TOML number (``threads = "8"`` and
``threads = true`` are refused, as ``Settings`` refuses them, in the same words), and
a string only where the flag has a syntax of its own (``max-bytes = "20M"``,
``size = "800x600"``).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from downloader.errors import InputError
from downloader.settings import Check

__all__ = ["DEFAULT_CONFIG", "parse_args", "read_config"]

DEFAULT_CONFIG = Path("downloader.toml")
"""Read from the current folder when no ``--config`` is given."""
# Options that make no sense as defaults in a file (a part or a merge is one run's,
# and a file shared by the machines of a split would give them all the same part).
_NOT_IN_FILE = frozenset(
    {"help", "version", "config", "no-config", "part", "merge-parts", "parquet-only"}
)
# Keys accepted besides the option names: the plural reads better for a list.
_ALIASES = {"headers": "header"}
# Flag types that only parse a number: their TOML value must already be one.
_NUMBER_TYPES = (int, float)


def read_config(path: str | Path) -> dict[str, Any]:
    """Read a config file into a flat table of option name → value.

    Raises:
        InputError: the file cannot be read, is not TOML, or holds a table.
    """
    import tomllib  # only a run with a config file reads TOML (start-up time)

    path = Path(path)
    try:
        with path.open("rb") as file:
            table = tomllib.load(file)
    except OSError as exc:
        raise InputError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"config {path}: not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:  # TOML is UTF-8; tomllib lets this through
        raise InputError(
            f"config {path}: not valid TOML: not UTF-8 (byte {exc.start})"
        ) from exc
    for key, value in table.items():
        if isinstance(value, dict):
            raise InputError(
                f"config {path}: [{key}] is a table; write options at the top level"
            )
    return table


def parse_args(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    *,
    checks: Mapping[str, Check] | None = None,
) -> argparse.Namespace:
    """Parse ``argv`` with the config file's values as defaults.

    The parser must have ``--config`` and ``--no-config``. Sets ``config`` on the
    result to the file used (a ``Path``), or None. ``checks`` (long option name →
    check, as ``settings.OPTION_CHECKS``) are run on the file's values, so that a bad
    one is refused with the file and key named, in the words ``Settings`` uses.

    Raises:
        SystemExit: from argparse, for a bad command line or ``--help``.
        InputError: the config file is missing (when named), unreadable or invalid.
    """
    first = parser.parse_args(argv)
    path = _config_path(first)
    if path is None:
        first.config = None
        return first
    originals = _apply(
        parser, read_config(path), origin=f"config {path}", checks=checks or {}
    )
    args = parser.parse_args(argv)
    _keep_command_line_boxes(parser, first, args, originals)
    args.config = path
    return args


def _config_path(args: argparse.Namespace) -> Path | None:
    if args.no_config:
        if args.config is not None:
            raise InputError("--config and --no-config contradict each other")
        return None
    if args.config is not None:
        return Path(args.config)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Long option name (without dashes) → its action, for every optional argument."""
    options = {}
    for action in parser._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag[2:] not in _NOT_IN_FILE:
                options[flag[2:]] = action
    return options


def _apply(
    parser: argparse.ArgumentParser,
    table: dict[str, Any],
    *,
    origin: str,
    checks: Mapping[str, Check],
) -> dict[str, Any]:
    """Set the table's values as the parser's defaults; return the replaced ones."""
    options = _options(parser)
    values: dict[str, Any] = {}
    names: dict[str, str] = {}
    for key, value in table.items():
        name = _ALIASES.get(key, key)
        action = options.get(name)
        if action is None:
            raise InputError(f"{origin}: unknown key {key!r}{_suggest(key, options)}")
        if action.dest in values:
            raise InputError(f"{origin}: {key!r} repeats {names[action.dest]!r}")
        where = f"{origin}: {key}"
        values[action.dest] = _convert(action, value, where, checks.get(name))
        names[action.dest] = key
    _check_exclusive(parser, names, origin)
    originals = {dest: parser.get_default(dest) for dest in values}
    parser.set_defaults(**values)
    return originals


def _suggest(key: str, options: dict[str, argparse.Action]) -> str:
    import difflib  # only a mistyped key needs it (start-up time)

    close = difflib.get_close_matches(key.replace("_", "-"), [*options, *_ALIASES], 1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _convert(
    action: argparse.Action, value: Any, where: str, check: Check | None
) -> Any:
    """Check and convert one value as argparse would convert the flag's text.

    With a ``check``, the value is checked as it is, or, where it stands for the
    flag's text (see ``_as_text``), converted from that text and then checked. The
    check's message names ``where``.
    """
    if action.nargs == 0:  # a switch: store_true and the like
        if not isinstance(value, bool):
            raise InputError(f"{where}: expected true or false, not {value!r}")
        return action.const if value else action.default
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        converted = [_convert_text(action, item, where) for item in items]
        if check is not None:
            check(converted, where)
        return converted
    if isinstance(value, list):
        value = ",".join(str(item) for item in value)
    if check is None:
        return _convert_text(action, value, where)
    if _as_text(action, value):
        value = _convert_text(action, value, where)
    check(value, where)
    return value


def _as_text(action: argparse.Action, value: Any) -> bool:
    """Tell whether ``value`` is read as the flag's text before it is checked.

    A string is, and so is a number for a flag with a syntax of its own
    (``max-bytes = 500000``, ``size = 800``); a number option's value never is
    (``threads = "8"`` is refused), nor a bool or a date.
    """
    if action.type in _NUMBER_TYPES:
        return False
    if isinstance(value, str):
        return True
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and action.type is not None


def _convert_text(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(value, bool | dict | list):
        raise InputError(f"{where}: expected a value like on the command line")
    text = str(value)
    try:
        converted = action.type(text) if callable(action.type) else text
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        raise InputError(f"{where}: {exc}") from exc
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise InputError(f"{where}: {text!r} is not one of {choices}")
    return converted


def _exclusive_groups(
    parser: argparse.ArgumentParser,
) -> list[list[argparse.Action]]:
    return [group._group_actions for group in parser._mutually_exclusive_groups]


def _check_exclusive(
    parser: argparse.ArgumentParser, names: dict[str, str], origin: str
) -> None:
    for group in _exclusive_groups(parser):
        keys = [names[action.dest] for action in group if action.dest in names]
        if len(keys) > 1:
            raise InputError(f"{origin}: {' and '.join(keys)} exclude each other")


def _keep_command_line_boxes(
    parser: argparse.ArgumentParser,
    first: argparse.Namespace,
    args: argparse.Namespace,
    originals: dict[str, Any],
) -> None:
    """Undo the file's value of an exclusive option when the command line chose one.

    ``first`` was parsed without the file: an option that differs from its
    original default there was given on the command line.
    """
    for group in _exclusive_groups(parser):
        given = [
            action
            for action in group
            if getattr(first, action.dest) != originals.get(action.dest, action.default)
        ]
        if not given:
            continue
        for action in group:
            if action not in given and action.dest in originals:
                setattr(args, action.dest, originals[action.dest])
