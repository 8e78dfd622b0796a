#!/usr/bin/env bash
# The main job on a fresh machine: install, train the tiny model on synthetic captioned videos,
# print held-out bits/dim (start and end), evaluate, and sample T2V / I2V / V2V mp4s + a frame grid.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/tiny}
bash scripts/install.sh
python launch.py train --config examples/configs/quickstart.yaml --out "$RUN" "$@"
python launch.py eval --checkpoint "$RUN"
mkdir -p "$RUN/samples"
python tools/make_synthetic_data.py --out "$RUN/samples/inputs" --split heldout --num 1 \
    --frames 8 --height 16 --width 16 --format npy --overwrite > /dev/null
INPUT=$(ls "$RUN"/samples/inputs/*.npy | head -n 1)
python launch.py sample --checkpoint "$RUN" --task t2v --cfg 1.0 \
    --prompt "a red circle moves right on a black background" \
    --prompt "a yellow square moves down on a navy background" \
    --out "$RUN/samples/t2v.mp4" --grid "$RUN/samples/t2v_grid.png" --overwrite
python launch.py sample --checkpoint "$RUN" --task i2v --cfg 1.0 --image "$INPUT" \
    --prompt "$(head -n 1 "$RUN/samples/inputs/metadata.jsonl" | python -c 'import json,sys; print(json.load(sys.stdin)["caption"])')" \
    --out "$RUN/samples/i2v.mp4" --grid "$RUN/samples/i2v_grid.png" --overwrite
python launch.py sample --checkpoint "$RUN" --task v2v --cfg 1.0 --video "$INPUT" --context-frames 4 \
    --prompt "$(head -n 1 "$RUN/samples/inputs/metadata.jsonl" | python -c 'import json,sys; print(json.load(sys.stdin)["caption"])')" \
    --out "$RUN/samples/v2v.mp4" --grid "$RUN/samples/v2v_grid.png" --overwrite
echo "samples in $RUN/samples"
