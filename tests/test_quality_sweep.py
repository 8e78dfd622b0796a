"""tools/quality_sweep.py: recipe parsing and its errors, the table (best setting per recipe from
the last checkpoint), and one small end-to-end sweep: two recipes trained in parallel processes,
every checkpoint scored for EMA and raw weights, resumable rows, training minutes from meta.json."""

import argparse
import json
import os
import subprocess
import sys

import pytest

from helpers_scripts import ROOT, load_script
from helpers_system import TINY_SYSTEM

quality_sweep = load_script("tools/quality_sweep.py")


def test_parse_recipe():
    assert quality_sweep.parse_recipe("base:") == ("base", [])
    assert quality_sweep.parse_recipe("p4:data.s2d_patch=4,model.latent_channels=48") == \
        ("p4", ["data.s2d_patch=4", "model.latent_channels=48"])
    for bad, msg in (("nocolon", "expected NAME:key=value"), (":a=1", "expected NAME"),
                     ("x:data.s2d_patch", "is not section.key=value"), ("a b:", "expected NAME")):
        with pytest.raises(argparse.ArgumentTypeError, match=msg):
            quality_sweep.parse_recipe(bad)
    assert quality_sweep.floats("1,0.7") == [1.0, 0.7]
    for bad in ("", "x", "nan", "-1", "inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            quality_sweep.floats(bad)
    assert quality_sweep.counts("1,8") == [1, 8]
    for bad in ("", "0", "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            quality_sweep.counts(bad)


def _row(recipe, step, overall, shape=0.0, weights="ema", w=1.0, t=1.0, minutes=1.0):
    return {"recipe": recipe, "step": step, "weights": weights, "w": w, "T": t, "N": 1, "train_minutes": minutes,
            "overall": overall, "shape": shape, "color": 1.0, "direction": 0.5, "background": 1.0}


def test_table_picks_the_best_setting_of_the_last_checkpoint():
    rows = [_row("a", 10, 0.9), _row("a", 20, 0.3, t=1.0), _row("a", 20, 0.5, t=0.7, weights="raw"),
            _row("b", 20, 0.1)]
    md = quality_sweep.table(rows, {"a": ["x.y=1"], "b": []})
    head = md.split("\n\n")[0].splitlines()
    assert head[2].startswith("| a | x.y=1 | 20 | 1.0 | raw | 1 | 0.7 | 1 | 50.0 %")  # not step 10's 90 %
    assert head[3].startswith("| b | (base) | 20 |")
    assert md.count("| a |") == 4  # the summary line + three rows


@pytest.mark.slow
def test_small_sweep_end_to_end(tmp_path, monkeypatch):
    # as inside a torchrun / SLURM job: the sweep's runs must still be one process each
    for key, value in {"RANK": "3", "WORLD_SIZE": "8", "MASTER_ADDR": "gpu-017", "MASTER_PORT": "24242",
                       "SLURM_PROCID": "3", "SLURM_NTASKS": "8"}.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "sweep"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "quality_sweep.py"), "--out", str(out),
           "--recipe", "base:", "--recipe", "wide:model.deep_width=48,model.head_dim=16",
           "--steps", "4", "--ckpt-every", "2", "--parallel", "2", "--threads", "1", "--samples", "2",
           "--temperature", "1,0.5", "--candidates", "1", *TINY_SYSTEM, "train.warmup_steps=1", "train.ema_decay=0.9"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "sweep.jsonl")]
    # 2 recipes x 2 checkpoints x 2 weights x 1 guidance x 2 temperatures
    assert len(rows) == 16
    assert {(r["recipe"], r["step"], r["weights"], r["T"]) for r in rows} == {
        (n, s, w, t) for n in ("base", "wide") for s in (2, 4) for w in ("ema", "raw") for t in (1.0, 0.5)}
    for r in rows:
        assert 0.0 <= r["overall"] <= min(r[a] for a in ("shape", "color", "direction", "background"))
        assert r["train_minutes"] is not None and r["train_minutes"] >= 0
    minutes = {r["step"]: r["train_minutes"] for r in rows if r["recipe"] == "base"}
    assert minutes[4] >= minutes[2]
    md = (out / "sweep.md").read_text()
    assert "| wide | model.deep_width=48 model.head_dim=16 | 4 |" in md
    assert (out / "curve.png").stat().st_size > 0
    # a second call trains nothing and scores nothing again
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "train base" not in again.stdout
    assert len(open(out / "sweep.jsonl").read().splitlines()) == 16
