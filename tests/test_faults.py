"""Rows of the README's fault matrix that no other test covers (issue 19): a disk that fills up
during a checkpoint save, SIGTERM / SIGUSR1 / SIGUSR2 delivered to the training process, a bad
video at every position of a shard, a missing tokenizer, and a config written by another version.
The other rows are tests/test_resume.py (SIGKILL mid-step / mid-save, NaN steps, corrupt
checkpoints), tests/test_launch.py (SIGKILL of a 2-process run) and tests/test_video_data.py (every
kind of bad file)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal

import pytest
import torch

from helpers_faults import FaultHooks
from helpers_launch import CONFIG, latest_step, overrides, step_losses

pytestmark = pytest.mark.usefixtures("one_thread")


def _enospc(what: str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), what)


# ------------------------------------------------------------------------------ disk full

def _tiny_state():
    from helpers_sharded import Tiny, groups_of

    from megatron_starflow.training.sharded_optimizer import ShardedAdamW

    model = Tiny(torch.float32)
    opt = ShardedAdamW(groups_of(model), betas=(0.9, 0.95), weight_decay=0.1)
    tensors = opt.model_sharded_state_dict(prefix="model.")
    tensors.update(opt.sharded_state_dict())
    return opt, tensors


@pytest.mark.parametrize("where", ["weights (DCP fsync)", "weights (DCP write)", "extras (torch.save)",
                                   "manifest", "latest pointer"])
def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    """ENOSPC at five points of ``sharded_checkpoint.save``: the save raises an OSError with that
    errno (DCP's CheckpointException, a BaseException, is unwrapped); ``latest`` still names the
    previous checkpoint, which loads; no half-written folder is taken for a checkpoint (temp
    folders are ignored, and the next save removes them)."""
    from megatron_starflow.training import sharded_checkpoint as sc

    opt, tensors = _tiny_state()
    run = str(tmp_path)
    first = sc.save(run, 1, tensors, {"r": 1}, {"m": 1}, {"c": 1})
    with monkeypatch.context() as m:
        real_save = torch.save
        if where == "weights (DCP fsync)":
            m.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(_enospc("fsync")))
        elif where == "weights (DCP write)":  # DCP serialises tensors into its .distcp streams
            m.setattr(torch, "save", lambda obj, f, *a, **k: (_ for _ in ()).throw(_enospc("distcp"))
                      if not str(getattr(f, "name", "")).endswith(".pt") else real_save(obj, f, *a, **k))
        elif where == "extras (torch.save)":
            m.setattr(torch, "save", lambda obj, f, *a, **k: (_ for _ in ()).throw(_enospc(f.name))
                      if str(getattr(f, "name", "")).endswith(".pt") else real_save(obj, f, *a, **k))
        elif where == "manifest":
            real = sc._write_json
            m.setattr(sc, "_write_json", lambda path, obj: (_ for _ in ()).throw(_enospc(path))
                      if path.endswith(sc.MANIFEST) else real(path, obj))
        else:
            real_replace = os.replace
            m.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(_enospc(b))
                      if os.path.basename(b) == sc.LATEST else real_replace(a, b))
        with pytest.raises(OSError) as info:
            sc.save(run, 2, tensors, {"r": 2}, {"m": 2}, {"c": 2})
    assert info.value.errno == errno.ENOSPC
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_0000001"
    found, notes = sc.find_resumable(run)
    assert found == first and notes == []
    assert sc.read_meta(found)["m"] == 1
    if where == "latest pointer":  # the new folder was complete and renamed: intact, not `latest`
        assert sc.verify(str(root / "step_0000002")) == []
    else:  # only a temporary folder: never listed, removed by the next save
        assert not (root / "step_0000002").exists()
        assert [d for d in os.listdir(root) if d.startswith("step_0000002")][0].startswith("step_0000002.tmp-")
        assert sc.list_checkpoints(run) == [first]
    third = sc.save(run, 3, tensors, {"r": 3}, {"m": 3}, {"c": 3})
    assert sc.find_resumable(run) == (third, [])
    assert not [d for d in os.listdir(root) if ".tmp-" in d]
    opt.close()


class DiskFull(FaultHooks):
    """The save of ``step`` fails with ENOSPC after its files are written, before the rename."""

    def __init__(self, step: int):
        super().__init__()
        self.full_at = step

    def during_save(self, step: int, tmp_dir: str) -> None:
        if step == self.full_at:
            raise _enospc(os.path.join(tmp_dir, "integrity.json"))


def test_disk_full_in_training_is_one_line_and_resume_is_exact(tmp_path, capsys):
    """launch.py train with the disk full at the step-4 save: one error line, exit 1, `latest` =
    step 2; the same command then resumes from step 2 and reproduces the uninterrupted run's
    losses (steps 3-4 are computed again: that is what was lost)."""
    from megatron_starflow.cli import main

    args = ["--config", CONFIG, *overrides(6, 2)]
    ref = str(tmp_path / "reference")
    assert main(["train", "--out", ref, *args]) == 0
    run = str(tmp_path / "full")
    capsys.readouterr()
    assert main(["train", "--out", run, *args], hooks=DiskFull(4)) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "no space left on device" in err[0] and "`latest`" in err[0]
    assert latest_step(run) == 2
    assert main(["train", "--out", run, *args]) == 0
    want, got = step_losses(ref), step_losses(run)
    assert sorted(got) == list(range(1, 7))
    assert all(v == want[s][0] for s, values in got.items() for v in values)
    assert [len(got[s]) for s in range(1, 7)] == [1, 1, 2, 2, 1, 1]


# ------------------------------------------------------------------------------ signals

class SignalAt(FaultHooks):
    """Deliver a real signal to this process in the middle of step ``step`` (1-based: after its
    backward, before the update); the loop's handler records it."""

    def __init__(self, step: int, signum: int, marker: str):
        super().__init__(requeue_marker=marker)
        self.at, self.signum = step, signum

    def after_backward(self, step: int, params: list) -> None:
        if step + 1 == self.at:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1", "SIGUSR2"])
def test_signal_checkpoints_at_the_step_boundary_and_requeues(tmp_path, monkeypatch, name):
    """SIGTERM (SLURM's stop), SIGUSR1 and SIGUSR2 (submitit's preemption warning, listened to
    under submitit) reach the process mid-run: it finishes the step, checkpoints it, asks for a
    requeue (a marker here) and stops; starting it again resumes and ends at the planned step with
    the uninterrupted run's losses. Lost: nothing."""
    from megatron_starflow.config import load_config
    from megatron_starflow.training.trainer import train

    if name == "SIGUSR2":
        monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")  # the handler listens to submitit's signal
    signum = getattr(signal, name)
    before = signal.getsignal(signum)
    cfg = load_config(CONFIG, overrides(5, 100))
    run, marker = str(tmp_path / "run"), str(tmp_path / "requeue.json")
    result = train(cfg, run, quiet=True, hooks=SignalAt(2, signum, marker))
    assert signal.getsignal(signum) == before  # the loop's handler is uninstalled again
    assert result.preempted and result.steps == 2
    info = json.loads(open(marker).read())
    assert info["signal"] == name and info["step"] == 2 and latest_step(run) == 2
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert train(cfg, run, quiet=True).steps == 5
    ref = str(tmp_path / "reference")
    train(cfg, ref, quiet=True)
    want, got = step_losses(ref), step_losses(run)
    assert sorted(got) == list(range(1, 6)) and all(len(v) == 1 for v in got.values())
    assert all(got[s][0] == want[s][0] for s in got)


# ------------------------------------------------------------------------------ bad video in a shard

@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """4 good 8-frame VP9 clips and one truncated file (decodes partly, then fails)."""
    from helpers_scripts import load_script

    root = tmp_path_factory.mktemp("shard_faults")
    make = load_script("tools/make_synthetic_data.py").main
    make(["--out", str(root / "good"), "--num", "4", "--frames", "8", "--height", "16", "--width", "16",
          "--format", "webm"])
    make(["--out", str(root / "long"), "--num", "1", "--frames", "24", "--height", "32", "--width", "32",
          "--format", "webm"])
    data = (root / "long" / "train_0000000.webm").read_bytes()
    (root / "bad.webm").write_bytes(data[: len(data) * 6 // 10])
    return root


@pytest.mark.parametrize("position", range(5))
def test_bad_video_at_every_position_of_a_shard(clips, tmp_path, position):
    """A truncated video packed (``--no-check``) at position 0..4 of a 5-sample shard: one batch
    of 4 holds exactly the 4 good clips in shard order, the bad one is logged once by kind and
    path. Lost: that sample only."""
    from helpers_scripts import load_script

    from megatron_starflow.data.bad_data import BadDataLog
    from megatron_starflow.data.shards import read_shards
    from megatron_starflow.data.video import ClipSpec, VideoClipIterator

    good = [str(clips / "good" / f"train_{i:07d}.webm") for i in range(4)]
    files = good[:position] + [str(clips / "bad.webm")] + good[position:]
    (tmp_path / "m.csv").write_text("path,caption\n" + "".join(f"{p},clip {i}\n" for i, p in enumerate(files)))
    load_script("tools/prepare_data.py").main(["--manifest", str(tmp_path / "m.csv"), "--out",
                                               str(tmp_path / "shards"), "--no-check", "--shard-size", "5"])
    records, sizes = read_shards(str(tmp_path / "shards"))
    assert sizes == [5] and [r.caption for r in records] == [f"clip {i}" for i in range(5)]
    log = BadDataLog(str(tmp_path / "bad.jsonl"), max_bad_fraction=0.5)
    it = VideoClipIterator(records, ClipSpec(8, 16, 16), "pyav", batch_size=2, bad_log=log, shuffle=False,
                           shard_sizes=sizes)
    # one epoch of 5 slots: the 4 good clips in shard order, in two batches of 2
    got = [c for _ in range(2) for c in it.next_batch()["caption"]]
    assert got == [f"clip {i}" for i in range(5) if i != position]
    logged = [json.loads(line) for line in (tmp_path / "bad.jsonl").read_text().splitlines()] \
        if (tmp_path / "bad.jsonl").exists() else []
    if position < 4:  # read on the way
        assert [r["kind"] for r in logged] == ["truncated"]
        assert logged[0]["path"].endswith("shard-000000.tar:bad") and logged[0]["position"] == position
    else:  # the epoch's last slot: reached by the next batch, which starts the next epoch
        assert logged == []
        assert list(it.next_batch()["caption"]) == ["clip 0", "clip 1"]
        logged = [json.loads(line) for line in (tmp_path / "bad.jsonl").read_text().splitlines()]
        assert [(r["kind"], r["key"], r["position"]) for r in logged] == [("truncated", "bad", 4)]


# ------------------------------------------------------------------------------ tokenizer, old config

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, megatron_ready):
    from helpers_system import TINY_SYSTEM

    from megatron_starflow.config import load_config
    from megatron_starflow.data.tokenizer import ensure_tokenizer, tokenizer_path
    from megatron_starflow.models.system import StarFlowSystem
    from megatron_starflow.training.checkpoint import save_system_checkpoint

    run_dir = str(tmp_path_factory.mktemp("fault_ckpt"))
    cfg = load_config(None, TINY_SYSTEM + [f"train.out_dir={run_dir}"])
    ensure_tokenizer(cfg, run_dir)
    torch.manual_seed(0)
    step_dir = save_system_checkpoint(run_dir, 0, cfg, StarFlowSystem(cfg, run_dir),
                                      tokenizer_file=tokenizer_path(cfg, run_dir))
    return run_dir, step_dir


def _copy(step_dir: str, dst) -> str:
    out = str(dst / "step_0000000")
    shutil.copytree(step_dir, out)
    return out


def _rewrite_config(step_dir: str, edit) -> None:
    """Edit config.json the way an older version would have written it (its manifest agrees)."""
    from megatron_starflow.training import sharded_checkpoint as sc

    path = os.path.join(step_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    edit(cfg)
    with open(path, "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(step_dir, sc.MANIFEST)) as f:
        manifest = json.load(f)
    manifest["files"]["config.json"] = {"size": os.path.getsize(path), "sha256": sc._sha256(path)}
    with open(os.path.join(step_dir, sc.MANIFEST), "w") as f:
        json.dump(manifest, f)


def _sample(step_dir: str, tmp_path, capsys) -> tuple[int, list[str]]:
    from megatron_starflow.cli import main

    capsys.readouterr()
    code = main(["sample", "--checkpoint", step_dir, "--prompt", "a", "--out", str(tmp_path / "s.mp4"),
                 "--block-size", "16"])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]


def test_missing_tokenizer_is_one_line(checkpoint, tmp_path, capsys):
    """The tokenizer copy inside a checkpoint deleted: one line (the manifest lists it), exit 2,
    nothing written; a checkpoint without a copy whose text.path is gone: one line naming
    text.path and how to get one; a training config pointing at a missing tokenizer likewise."""
    from megatron_starflow.training import sharded_checkpoint as sc

    run_dir, step_dir = checkpoint
    step = _copy(step_dir, tmp_path / "deleted")
    os.remove(os.path.join(step, "tokenizer", "spm.model"))
    code, err = _sample(step, tmp_path, capsys)
    assert code == 2 and len(err) == 1 and "not intact: tokenizer/spm.model: missing" in err[0]
    # written without a copy (the manifest does not list one), pointing at a tokenizer now gone
    step = _copy(step_dir, tmp_path / "none")
    shutil.rmtree(os.path.join(step, "tokenizer"))
    with open(os.path.join(step, sc.MANIFEST)) as f:
        manifest = json.load(f)
    del manifest["files"]["tokenizer/spm.model"]
    with open(os.path.join(step, sc.MANIFEST), "w") as f:
        json.dump(manifest, f)
    _rewrite_config(step, lambda c: c["text"].update(path=str(tmp_path / "gone.model")))
    code, err = _sample(step, tmp_path, capsys)
    assert code == 2 and len(err) == 1 and "text.path" in err[0] and "gone.model" in err[0]
    assert not (tmp_path / "s.mp4").exists()
    from megatron_starflow.cli import main

    code = main(["train", "--config", CONFIG, "--out", str(tmp_path / "run"), *overrides(2, 2),
                 f"text.path={tmp_path / 'gone.model'}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 2 and len(err) == 1 and "gone.model" in err[0]


def test_config_from_another_version(checkpoint, tmp_path, capsys):
    """A key this version does not know: one error naming it (exit 2). A key the file lacks
    (written before the key existed): this version's default, and the checkpoint samples."""
    from megatron_starflow.config import ModelConfig
    from megatron_starflow.convert.loading import load_system

    _, step_dir = checkpoint
    newer = _copy(step_dir, tmp_path / "newer")
    _rewrite_config(newer, lambda c: c["model"].update(flux_capacitor=1.21))
    code, err = _sample(newer, tmp_path, capsys)
    assert code == 2 and len(err) == 1
    assert "unknown config key model.flux_capacitor (from saved config)" in err[0]
    assert "another version of megatron_starflow" in err[0]
    older = _copy(step_dir, tmp_path / "older")
    _rewrite_config(older, lambda c: c["model"].pop("denoiser_output_scale"))
    system, _, _ = load_system(older)
    assert system.cfg.model.denoiser_output_scale == ModelConfig().denoiser_output_scale
    code, err = _sample(older, tmp_path, capsys)
    assert code == 0 and err == [] and (tmp_path / "s.mp4").is_file()


def test_truncated_weights_in_a_named_step_folder_is_one_line(checkpoint, tmp_path, capsys):
    """sample / eval given a step folder whose weight file was truncated: one line naming the file,
    its size and the manifest's (exit 2), instead of DCP's EOFError traceback. (A run folder falls
    back to the newest intact checkpoint: tests/test_resume.py.)"""
    _, step_dir = checkpoint
    step = _copy(step_dir, tmp_path)
    victim = os.path.join(step, "model", "__0_0.distcp")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    code, err = _sample(step, tmp_path, capsys)
    assert code == 2 and len(err) == 1
    assert "is not intact: model/__0_0.distcp" in err[0] and "(truncated)" in err[0]
    assert not (tmp_path / "s.mp4").exists()
