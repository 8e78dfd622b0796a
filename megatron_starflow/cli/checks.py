"""Checks of command-line inputs shared by ``launch.py`` and the tools: every bad number or path is
ONE line naming the flag and what is allowed, exit code 2, before anything is read or written.

* ``ArgumentParser``: argparse without the usage block: ``PROG: error: argument --cfg: must be a
  finite number in [0, 100], got 'nan'`` and exit code 2.
* ``integer`` / ``real`` / ``SEED``: ``type=`` callables that refuse NaN, infinities and values
  outside their range (the message states the range).
* ``input_file`` / ``input_folder``: ``type=`` callables for paths that must exist.
* ``check_output_file`` / ``check_output_folder``: after parsing (they need ``--overwrite``): an
  output path that is a folder (or a folder path that is a file), an existing output without
  ``--overwrite``, a folder that cannot be written.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed
GUIDANCE_MAX = 100.0  # --cfg: guidance weight w in [0, GUIDANCE_MAX]


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage block) with exit code 2; its
    sub-parsers are of the same kind."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse(parser: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace | None, int]:
    """``(args, 0)``, or ``(None, exit code)`` when argparse exits (a bad argument: 2; --help: 0),
    so that in-process callers of a ``main`` get the code back instead of ``SystemExit``."""
    try:
        return parser.parse_args(argv), 0
    except SystemExit as exc:
        return None, (exc.code if isinstance(exc.code, int) else 2)


def _range_text(lo, hi, lo_open=False, hi_open=False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return "finite"


def integer(lo: int | None = 1, hi: int | None = None):
    """``type=`` for an integer in ``[lo, hi]`` (None: unbounded on that side)."""
    def convert(text: str) -> int:
        want = f"an integer {_range_text(lo, hi)}"
        try:
            value = int(str(text).strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return value

    convert.__name__ = "integer"
    return convert


def real(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
         hi_open: bool = False):
    """``type=`` for a finite float in the given interval (open ends excluded)."""
    def convert(text: str) -> float:
        want = f"a finite number {_range_text(lo, hi, lo_open, hi_open)}" if (
            lo is not None or hi is not None) else "a finite number"
        try:
            value = float(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
        bad = not math.isfinite(value)
        bad = bad or (lo is not None and (value <= lo if lo_open else value < lo))
        bad = bad or (hi is not None and (value >= hi if hi_open else value > hi))
        if bad:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return value

    convert.__name__ = "real"
    return convert


SEED = integer(0, SEED_MAX)
GUIDANCE = real(0.0, GUIDANCE_MAX)
TAU = real(0.0, 1.0)  # Jacobi stop rule: relative squared change per iteration
TEMPERATURE = real(0.0, 4.0)  # scale of the prior noise z (1: the model's own distribution)


def input_file(text: str) -> str:
    """``type=`` for a file that must exist and be readable."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text!r} does not exist")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be read (permission denied)")
    return text


def input_folder(text: str) -> str:
    """``type=`` for a folder that must exist."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text!r} does not exist")
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    return text


def input_path(text: str) -> str:
    """``type=`` for a file or folder that must exist (checkpoints: run, step or file)."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text!r} does not exist")
    return text


def writable(folder: str) -> bool:
    """Whether files can be created in the existing ``folder`` (tests replace this to simulate a
    read-only folder when they run as root, for whom ``os.access`` is always true)."""
    return os.access(folder, os.W_OK | os.X_OK)


def _check_parent(flag: str, path: str) -> None:
    """The nearest existing folder above ``path`` must be a folder we can write in."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: {parent} is a file, so no folder can be made there")
    if not writable(parent):
        raise ValueError(f"{flag} {path}: cannot write in folder {parent} (permission denied); "
                         f"choose a writable location")


def check_output_file(flag: str, path: str, overwrite: bool) -> None:
    """An output file: not a folder, not existing unless ``overwrite``, in a writable folder."""
    if not path:
        raise ValueError(f"{flag}: give a file name")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder; give a file name inside it, e.g. "
                         f"{os.path.join(path, 'out' + _ext(flag))}")
    if os.path.lexists(path) and not overwrite:
        raise ValueError(f"{flag} {path} exists; pass --overwrite to replace it, or choose "
                         f"another name")
    _check_parent(flag, path)


def _ext(flag: str) -> str:
    return {"--grid": ".png", "--png": ".png", "--out": ""}.get(flag, "")


def check_output_folder(flag: str, path: str, overwrite: bool | None = None,
                        marker: str | None = None) -> None:
    """An output folder: not a file, writable (or creatable). With ``overwrite`` given, a folder
    that already holds ``marker`` (or, without a marker, anything) is refused unless it is
    True."""
    if not path:
        raise ValueError(f"{flag}: give a folder")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file; give a folder")
    if os.path.isdir(path):
        if not writable(path):
            raise ValueError(f"{flag} {path}: cannot write in this folder (permission denied)")
        if overwrite is False:
            taken = os.path.exists(os.path.join(path, marker)) if marker else bool(os.listdir(path))
            if taken:
                what = f"holds {marker}" if marker else "is not empty"
                raise ValueError(f"{flag} {path} {what}; pass --overwrite to replace its "
                                 f"contents, or choose another folder")
        return
    _check_parent(flag, path)


def warn(message: str) -> None:
    """One warning line on stderr."""
    print(f"warning: {message}", file=sys.stderr)


def or_usage_error(parser: argparse.ArgumentParser, check, *args, **kwargs) -> None:
    """Run ``check(*args, **kwargs)``; a ValueError becomes the parser's one-line error (exit
    code 2), for tools whose ``main`` has no error handler of its own."""
    try:
        check(*args, **kwargs)
    except ValueError as exc:
        parser.error(str(exc))


def size_bytes(text: str) -> str:
    """``type=`` for a size such as 5GB, 500MB, 64KB or 1000 (bytes); 0 = no limit."""
    import re

    if not re.fullmatch(r"\s*[0-9]+(\.[0-9]+)?\s*([KMGT]i?B?|B)?\s*", str(text), re.IGNORECASE):
        raise argparse.ArgumentTypeError(f"must be a size such as 5GB, 500MB or 1000000 (bytes; "
                                         f"0: one file), got {text!r}")
    return text
