#!/usr/bin/env bash
# Install the CPU requirements (torch first, so nothing pulls a CUDA build), then this package
# (editable: launch.py, the tools and the `megatron-starflow` command run the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -r requirements.txt
python -m pip install --quiet -e .
