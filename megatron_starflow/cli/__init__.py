"""Command-line entry points behind ``launch.py`` and the ``megatron-starflow`` console script:
train | eval | sample."""

from megatron_starflow.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
