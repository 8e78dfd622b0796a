"""Prompts for sampling: given on the command line and/or read from a file, one per line."""

from __future__ import annotations

import os


def read_prompts(prompts: list[str] | None = None, prompts_file: str | None = None) -> list[str]:
    """``prompts`` followed by the non-empty lines of ``prompts_file`` (UTF-8); a missing, empty
    or non-UTF-8 file is a clear error."""
    out = list(prompts or [])
    if prompts_file:
        if not os.path.isfile(prompts_file):
            raise FileNotFoundError(f"prompt file {prompts_file!r} does not exist")
        with open(prompts_file, "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8-sig")  # a BOM (Windows editors) is not part of a prompt
        except UnicodeDecodeError as exc:
            line = data[:exc.start].count(b"\n") + 1
            raise ValueError(f"--prompts {prompts_file!r} is not UTF-8 text (byte "
                             f"0x{data[exc.start]:02x} on line {line}); save it as UTF-8") from None
        out += [line.strip() for line in text.splitlines() if line.strip()]
        if not out:
            raise ValueError(f"prompt file {prompts_file!r} holds no prompts (one per line)")
    return out
