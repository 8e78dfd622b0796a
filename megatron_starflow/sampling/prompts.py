"""Prompts for sampling: given on the command line and/or read from a file, one per line."""

from __future__ import annotations

import os


def read_prompts(prompts: list[str] | None = None, prompts_file: str | None = None) -> list[str]:
    """``prompts`` followed by the non-empty lines of ``prompts_file``; a missing or empty file
    is a clear error."""
    out = list(prompts or [])
    if prompts_file:
        if not os.path.isfile(prompts_file):
            raise FileNotFoundError(f"prompt file {prompts_file!r} does not exist")
        with open(prompts_file) as f:
            out += [line.strip() for line in f if line.strip()]
        if not out:
            raise ValueError(f"prompt file {prompts_file!r} holds no prompts (one per line)")
    return out
