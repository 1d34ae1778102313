"""What every subcommand shares: its parser with ``--debug``, the comma-list argument types, and the one-line
error that ``main`` prints.

Library errors name library arguments (``resume=True``, ``static_batch``); a subcommand whose flags differ from
those names lists ``FLAG_WORDS``, (regex, replacement) pairs that :func:`error_line` applies so that the line a
user of the command line reads names the flag (``--resume``, ``--static-batch``) instead.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from typing import Any

FlagWords = Sequence[tuple[str, str]]

# hints in runtime messages that say how to export a bundle that has what was asked for
EXPORT_HINT_WORDS = (
    (r"export_bundle\(\.\.\., fp16=True\)", "export with --fp16"),
    (r"export it with fp16=True", "export with --fp16"),
    (r"export_bundle\(\.\.\., static_batch=B\)", "export with --static-batch B"),
    (r"export_bundle\(\.\.\., tensorrt=True\)", "export with --tensorrt"),
)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # terminal colour codes some libraries put into their messages


def add_command(subparsers: argparse._SubParsersAction, name: str, **kwargs) -> argparse.ArgumentParser:
    """``subparsers.add_parser(name, **kwargs)`` that also takes ``--debug`` after the subcommand's name."""
    parser = subparsers.add_parser(name, **kwargs)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    return parser


def _comma_ints(text: str, expected: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}") from None


def int_list(text: str) -> list[int]:
    """argparse type: ``"1,2,2"`` -> ``[1, 2, 2]``."""
    return _comma_ints(text, "comma-separated ints like 1,2,2")


def class_list(text: str) -> list[int]:
    """argparse type for ``--class``: ``"7"`` -> ``[7]``, ``"1,7,7"`` -> ``[1, 7, 7]``."""
    return _comma_ints(text, "a class index or a comma list like 1,7,7")


def passes(check: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
    """Whether a library rule (a ``check_*`` function of :mod:`deploy_diff.runtime.arguments`) accepts these values.

    A subcommand that checks an option before slow work (training, loading) asks the library's rule and words the
    refusal itself, naming its flag."""
    try:
        check(*args, **kwargs)
    except (TypeError, ValueError):
        return False
    return True


def error_line(command: str, error: BaseException, flag_words: FlagWords = ()) -> str:
    """``deploy-diff COMMAND: error: Type: message`` on one line, without colour codes, flags named as flags."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    text = _ANSI.sub("", text)
    for pattern, replacement in flag_words:
        text = re.sub(pattern, replacement, text)
    return f"deploy-diff {command}: error: {type(error).__name__}: {text}"
