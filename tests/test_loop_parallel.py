"""The real training loop under data, tensor (+sequence), pipeline and context parallelism on gloo,
against the one-process loop with the same global batch, and resumes that change the layout.

One 4-process launch (tests/dist_scripts/loop_layouts.py) trains every layout from scratch and
resumes rewound runs with another layout. Every sample's noise is a function of its position in
the data order (training/sample_noise.py), so all layouts compute the same losses up to float32
summation order: per step within 1e-5 relative. Resumes continue the uninterrupted one-process
run: the first resumed step within 1e-5 relative, the next within 1e-4 (Adam amplifies round-off).
"""

from __future__ import annotations

import json
import os

import pytest

from helpers_dist import ROOT, run_checks
from helpers_launch import TINY, last_losses, rewind

STEPS, CKPT = 4, 2
GLOBAL_BATCH = 4


def tiny_config(run_dir: str):
    from megatron_starflow.config import load_config

    overrides = [*TINY, f"train.steps={STEPS}", f"train.ckpt_every={CKPT}",
                 f"train.eval_every={STEPS}", f"data.batch_size={GLOBAL_BATCH}",
                 "train.keep_checkpoints=3", "train.lr=3e-3", "train.warmup_steps=1"]
    cfg = load_config(os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml"), overrides)
    cfg.train.out_dir = run_dir
    return cfg


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, megatron_ready):
    from megatron_starflow.training.trainer import train

    work = tmp_path_factory.mktemp("loop_layouts")
    ref_dir = str(work / "run" / "ref")
    cfg = tiny_config(ref_dir)
    train(cfg, ref_dir, quiet=True)
    config_path = str(work / "config.json")
    with open(config_path, "w") as f:
        json.dump(cfg.to_dict(), f)
    results = run_checks(os.path.join(ROOT, "tests", "dist_scripts", "loop_layouts.py"),
                         str(work / "out.json"), [str(work), config_path], world=4, timeout=900)
    return {"work": str(work), "ref": last_losses(ref_dir), "results": results}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["dp4", "tp2dp2", "tp2sp_dp2", "pp2dp2", "cp2dp2", "pp2tp2",
                                    "cp2tp2sp"])
def test_layout_matches_one_process_loop(runs, layout):
    ref, got = runs["ref"], {int(k): v for k, v in runs["results"][f"run/{layout}"].items()}
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert rel(got[step], ref[step]) <= 1e-5, (layout, step, got[step], ref[step])


@pytest.mark.slow
@pytest.mark.parametrize("change", ["tp2dp2->dp4", "dp4->tp2dp2", "pp2dp2->dp4", "dp4->pp2dp2",
                                    "cp2dp2->dp4", "dp4->cp2dp2"])
def test_resume_with_another_layout_continues_the_run(runs, change):
    ref = runs["ref"]
    got = {int(k): v for k, v in runs["results"][f"resume/{change}"].items()}
    assert sorted(got) == list(range(CKPT + 1, STEPS + 1)), got
    assert rel(got[CKPT + 1], ref[CKPT + 1]) <= 1e-5, (got, ref)
    for step in range(CKPT + 2, STEPS + 1):
        assert rel(got[step], ref[step]) <= 1e-4, (step, got[step], ref[step])


@pytest.mark.slow
def test_four_rank_checkpoint_resumes_on_one_process(runs, tmp_path):
    from megatron_starflow.training.trainer import train

    src = os.path.join(runs["work"], "run", "dp4")
    run_dir = str(tmp_path / "dp4_to_1")
    rewind(src, run_dir, CKPT, keep_metrics=False)
    train(tiny_config(run_dir), run_dir, quiet=True)
    got, ref = last_losses(run_dir), runs["ref"]
    assert rel(got[CKPT + 1], ref[CKPT + 1]) <= 1e-5
    assert rel(got[STEPS], ref[STEPS]) <= 1e-4


@pytest.mark.slow
def test_no_checkpoint_file_holds_most_of_the_optimizer_state(runs):
    """DP=4: each rank writes its own rows of the fp32 master weights and Adam moments; no file
    of the checkpoint holds more than 60 % of the one-process optimizer state."""
    def files(step_dir, part):
        folder = os.path.join(step_dir, part)
        return {f"{part}/{f}": os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                if f.endswith(".distcp")}

    one = os.path.join(runs["work"], "run", "ref", "checkpoints", f"step_{STEPS:07d}")
    four = os.path.join(runs["work"], "run", "dp4", "checkpoints", f"step_{STEPS:07d}")
    one_optimizer = sum(files(one, "optim").values())
    written = {**files(four, "optim"), **files(four, "model")}
    assert len(files(four, "optim")) == 4, written
    assert max(written.values()) <= 0.6 * one_optimizer, (written, one_optimizer)
