#!/usr/bin/env python
"""megatron_starflow entry point: ``python launch.py train|eval|sample ...`` (see README)."""

import sys

from megatron_starflow.cli import main

if __name__ == "__main__":
    sys.exit(main())
