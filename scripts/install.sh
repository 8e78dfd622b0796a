#!/usr/bin/env bash
# Install the CPU requirements (torch first, so nothing pulls a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -r requirements.txt
