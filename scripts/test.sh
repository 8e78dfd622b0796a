#!/usr/bin/env bash
# The test command of the README: install, then the whole suite (slow multi-process tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m pytest -q -ra "$@"
