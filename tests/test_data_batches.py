"""A fixed batch per rank (bad samples replaced, counted and logged), exact resume and DP
resharding of the data position with bad samples in the shards, and decode worker processes that
give the same batches as decoding in the loop."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from helpers_scripts import load_script
from megatron_starflow.data.bad_data import BadDataError, BadDataLog
from megatron_starflow.data.sampler import GlobalOrderSampler, merge_states, rebase
from megatron_starflow.data.shards import ShardWriter, npy_bytes, read_shards
from megatron_starflow.data.video import ClipSpec, VideoClipIterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = ClipSpec(4, 8, 8, crop="random")
# sample index -> what is wrong with it (the others are good pre-decoded clips)
BAD = {2: "zero", 5: "garbage", 9: "nocaption", 13: "short", 14: "cut", 21: "zero"}
KINDS = {"zero": "zero_byte", "garbage": "undecodable", "nocaption": "no_caption",
         "short": "too_short", "cut": "truncated"}
N, SHARD = 24, 6


def _clip(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (6, 12, 12, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    """24 pre-decoded clips in 4 shards of 6; six are bad, in different shards and positions."""
    out = tmp_path_factory.mktemp("bad_shards")
    with ShardWriter(str(out), max_count=SHARD) as writer:
        for i in range(N):
            members = {"txt": f"clip {i}".encode(), "json": b"{}", "frames.npy": npy_bytes(_clip(i))}
            kind = BAD.get(i)
            if kind == "zero":
                members["frames.npy"] = b""
            elif kind == "garbage":
                members["frames.npy"] = np.random.default_rng(i).bytes(300)
            elif kind == "cut":
                members["frames.npy"] = members["frames.npy"][:200]
            elif kind == "nocaption":
                del members["txt"]
            elif kind == "short":
                members["frames.npy"] = npy_bytes(_clip(i)[:2])
            writer.write(f"s{i:03d}", members)
    return str(out)


def _iters(shards, dp, batch=3, log_dir=None, spec=SPEC, seed=5, **kw):
    records, sizes = read_shards(shards)
    return [VideoClipIterator(records, spec, "pyav", seed=seed, dp_rank=r, dp_size=dp, batch_size=batch,
                              shard_sizes=sizes,
                              bad_log=BadDataLog(os.path.join(log_dir, f"bad{r}.jsonl") if log_dir else "",
                                                 max_bad_fraction=0.5), **kw)
            for r in range(dp)]


def _step(its) -> list[dict]:
    return [it.next_batch() for it in its]


def _same(a: dict, b: dict) -> bool:
    return (a["key"] == b["key"] and a["position"] == b["position"]
            and torch.equal(a["video"], b["video"]))


def test_every_batch_is_full_and_an_epoch_reads_every_good_sample_once(bad_shards, tmp_path):
    its = _iters(bad_shards, dp=2, log_dir=str(tmp_path))
    good_positions, key_of = [], {}
    while min(it.sampler.slot_position(it.sampler.scanned) for it in its) < N:
        for batch in _step(its):
            assert batch["video"].shape == (3, 4, 8, 8, 3)  # exactly batch_size, every step
            good_positions += batch["position"]
            key_of.update(zip(batch["position"], batch["key"]))
    bad_logged = [json.loads(line) for r in range(2)
                  for line in (tmp_path / f"bad{r}.jsonl").read_text().splitlines()]
    bad_positions = [rec["position"] for rec in bad_logged]
    # within the first epoch: every position exactly once, good or bad, and nothing else
    first = sorted([p for p in good_positions if p < N] + [p for p in bad_positions if p < N])
    assert first == list(range(N))
    order = GlobalOrderSampler(N, seed=5, shard_sizes=[SHARD] * 4).epoch_order(0)
    assert sorted(int(order[p]) for p in bad_positions if p < N) == sorted(BAD)
    assert sorted(key_of[p] for p in good_positions if p < N) == sorted(
        f"s{i:03d}" for i in range(N) if i not in BAD)
    kinds = {rec["key"]: rec["kind"] for rec in bad_logged if rec["position"] < N}
    assert kinds == {f"s{i:03d}": KINDS[k] for i, k in BAD.items()}
    total = sum(it.bad.bad for it in its)
    assert total == len(bad_logged) and sum(it.bad.seen for it in its) == len(good_positions) + total


def test_resume_with_bad_samples_is_exact_and_resharding_repeats_and_skips_nothing(bad_shards):
    its = _iters(bad_shards, dp=2)
    for _ in range(5):  # stop where the ranks have met different numbers of bad samples
        _step(its)
        if its[0].sampler.scanned != its[1].sampler.scanned:
            break
    assert its[0].sampler.scanned != its[1].sampler.scanned
    state = json.loads(json.dumps(merge_states([it.state_dict() for it in its])))
    assert state["sampler"]["consumed"] == sum(it.sampler.scanned for it in its)
    assert state["bad_data"]["seen"] == state["sampler"]["consumed"]
    expect = [_step(its) for _ in range(4)]
    # same DP size: every rank continues exactly where it was
    again = _iters(bad_shards, dp=2)
    for it in again:
        it.load_state_dict(state)
    assert [it.bad.seen for it in again] == [s["seen"] for s in state["bad_data"]["per_rank"].values()]
    for want in expect:
        got = _step(again)
        assert all(_same(g, w) for g, w in zip(got, want))
    # DP 2 -> 3: the consumed set is kept, so the epoch ends with exactly the unread positions
    taken = set(range(state["sampler"]["frontier"])) | set(state["sampler"]["exceptions"])
    probe = GlobalOrderSampler(N, seed=5, dp_size=2)
    probe.frontier, probe.exceptions = state["sampler"]["frontier"], state["sampler"]["exceptions"]
    for r, k in state["sampler"]["scanned"].items():
        taken |= {probe.free_position(int(r) + j * 2) for j in range(k)}
    three = _iters(bad_shards, dp=3, log_dir=None)
    for it in three:
        it.load_state_dict(state)
    assert sum(it.bad.seen for it in three) == state["bad_data"]["seen"]  # totals kept on rank 0
    later, bad_later = [], []
    while min(it.sampler.slot_position(it.sampler.scanned) for it in three) < N:
        for it in three:
            seen = it.sampler.scanned
            batch = it.next_batch()
            assert len(batch["key"]) == 3
            later += batch["position"]
            bad_later += [it.sampler.slot_position(j) for j in range(seen, it.sampler.scanned)
                          if it.sampler.slot_position(j) not in batch["position"]]
    rest = sorted(p for p in later + bad_later if p < N)
    assert rest == sorted(set(range(N)) - taken)  # nothing repeated, nothing skipped


def test_rebase_keeps_the_consumed_set():
    # rank 0 read 5 slots, rank 1 read 3, after an earlier re-basing left exceptions 12 and 15
    frontier, exceptions, dp = 10, [12, 15], 2
    probe = GlobalOrderSampler(100, dp_size=dp)
    probe.frontier, probe.exceptions = frontier, exceptions
    scanned = {0: 5, 1: 3}
    consumed = set(range(frontier)) | set(exceptions) | {
        probe.free_position(r + j * dp) for r, k in scanned.items() for j in range(k)}
    new_frontier, new_exceptions = rebase(frontier, exceptions, dp, scanned)
    assert set(range(new_frontier)) | set(new_exceptions) == consumed
    assert new_frontier not in consumed and all(e > new_frontier for e in new_exceptions)


def test_a_data_set_with_no_readable_sample_stops_with_a_clear_error(bad_shards):
    records, _ = read_shards(bad_shards)
    bad_only = [records[i] for i in sorted(BAD)]
    it = VideoClipIterator(bad_only, SPEC, "pyav", batch_size=2, bad_log=BadDataLog(max_bad_fraction=1.0))
    with pytest.raises(BadDataError, match="no readable sample"):
        it.next_batch()


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def video_shards(tmp_path_factory):
    """Real VP9 and H.264 files (+ two broken ones) in 3 shards, for decoding in workers."""
    root = tmp_path_factory.mktemp("worker_videos")
    load_script("tools/make_synthetic_data.py").main(
        ["--out", str(root / "v"), "--num", "5", "--frames", "8", "--height", "16", "--width", "16",
         "--fps", "8", "--format", "webm,mp4"])
    (root / "v" / "broken.webm").write_bytes(b"\x1a\x45\xdf\xa3" + bytes(400))
    (root / "v" / "broken.txt").write_text("a caption\n")
    with ShardWriter(str(root / "s"), max_count=4) as writer:
        for name in sorted(n for n in os.listdir(root / "v") if n.endswith((".webm", ".mp4"))):
            stem, ext = os.path.splitext(name)
            caption = (root / "v" / f"{stem}.txt").read_text().strip()
            writer.write(f"{stem}_{ext[1:]}", {ext[1:]: (root / "v" / name).read_bytes(),
                                               "txt": caption.encode()})
    return str(root / "s")


def test_worker_processes_give_the_same_batches_as_the_loop_and_resume_exactly(video_shards):
    records, sizes = read_shards(video_shards)
    assert len(records) == 11

    def make(workers, rank=0, dp=2):
        return VideoClipIterator(records, ClipSpec(4, 16, 16, crop="random", stride=2), "auto", seed=1,
                                 dp_rank=rank, dp_size=dp, batch_size=2, shard_sizes=sizes,
                                 num_workers=workers, bad_log=BadDataLog(max_bad_fraction=0.5))

    loop = [make(0, r) for r in range(2)]
    workers = [make(2, r) for r in range(2)]
    try:
        for _ in range(4):  # 16 samples of 11: runs into the second epoch, meets the broken file
            want, got = _step(loop), _step(workers)
            assert all(_same(g, w) for g, w in zip(got, want))
        assert sum(it.bad.bad for it in loop) >= 1
        assert [it.bad.state_dict() for it in workers] == [it.bad.state_dict() for it in loop]
        assert [it.decoded_by for it in workers] == [it.decoded_by for it in loop]
        state = merge_states([it.state_dict() for it in workers])
        want = [_step(loop) for _ in range(2)]
        for it in workers:  # what the workers read ahead is dropped; they restart at the state
            it.load_state_dict(state)
        for w in want:
            assert all(_same(g, x) for g, x in zip(_step(workers), w))
    finally:
        for it in workers:
            it.close()


# ------------------------------------------------------------------------------------------------
def _train_config(shards: str, steps: int = 4, workers: int = 0):
    from megatron_starflow.config import load_config

    from helpers_launch import TINY

    return load_config(os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml"),
                       [*TINY, f"train.steps={steps}", "train.ckpt_every=2", f"train.eval_every={steps}",
                        "data.batch_size=3", "data.source=shards", f"data.shards={shards}",
                        f"data.heldout_shards={shards}", "data.max_bad_fraction=0.5",
                        "data.crop=random", "train.keep_checkpoints=3", f"data.num_workers={workers}"])


def _metrics(run_dir: str) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _rewind(run_dir: str, step: int) -> None:
    import shutil

    root = os.path.join(run_dir, "checkpoints")
    for name in os.listdir(root):
        if name.startswith("step_") and int(name[5:]) > step:
            shutil.rmtree(os.path.join(root, name))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write(f"step_{step:07d}")
    os.remove(os.path.join(run_dir, "metrics.jsonl"))


def test_training_on_bad_shards_resumes_exactly_with_decode_workers(bad_shards, tmp_path):
    import shutil

    from megatron_starflow.training import sharded_checkpoint as store
    from megatron_starflow.training.trainer import train

    run = str(tmp_path / "run")
    train(_train_config(bad_shards), run, quiet=True)
    full = _metrics(run)
    # the loader state in the checkpoint is the one of an iterator that made the same 2 steps
    its = _iters(bad_shards, dp=1, spec=ClipSpec(2, 8, 8, crop="random"), seed=0)
    for _ in range(2):
        its[0].next_batch()
    meta = store.read_meta(os.path.join(run, "checkpoints", "step_0000002"))
    assert meta["data"]["sampler"]["scanned"] == {"0": its[0].sampler.scanned}
    assert meta["data"]["bad_data"]["counts"] == dict(its[0].bad.counts)
    resumed = str(tmp_path / "resumed")
    shutil.copytree(run, resumed)
    _rewind(resumed, 2)
    train(_train_config(bad_shards, workers=2), resumed, quiet=True)  # decoding in 2 workers now
    again = _metrics(resumed)
    assert sorted(again) == [3, 4] and all(again[s] == full[s] for s in (3, 4)), (full, again)


@pytest.mark.slow
def test_two_rank_checkpoint_holds_both_strides_and_resumes_on_one_process(bad_shards, tmp_path):
    from helpers_dist import run_checks
    from megatron_starflow.training import sharded_checkpoint as store
    from megatron_starflow.training.trainer import train

    cfg = _train_config(bad_shards, steps=2)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg.to_dict()))
    run = str(tmp_path / "dp2")
    run_checks(os.path.join(ROOT, "tests", "dist_scripts", "train_run.py"), str(tmp_path / "out.json"),
               [str(config), run], world=2, timeout=600)
    meta = store.read_meta(os.path.join(run, "checkpoints", "step_0000002"))
    sampler, bad = meta["data"]["sampler"], meta["data"]["bad_data"]
    assert sorted(sampler["scanned"]) == ["0", "1"] and sorted(bad["per_rank"]) == ["0", "1"]
    assert sum(sampler["scanned"].values()) == sampler["consumed"] == bad["seen"]
    assert bad["seen"] - bad["bad"] == 2 * 2 * 3  # 2 steps x 2 ranks x 3 good samples
    # one process continues: re-based position, the bad counters summed on the one rank
    train(_train_config(bad_shards, steps=4), run, quiet=True)
    after = store.read_meta(os.path.join(run, "checkpoints", "step_0000004"))["data"]
    assert after["bad_data"]["seen"] - after["bad_data"]["bad"] == 12 + 2 * 3
    consumed_before = set(range(sampler["frontier"])) | set(sampler["exceptions"])
    probe = GlobalOrderSampler(N, dp_size=2)
    probe.frontier, probe.exceptions = sampler["frontier"], sampler["exceptions"]
    for r, k in sampler["scanned"].items():
        consumed_before |= {probe.free_position(int(r) + j * 2) for j in range(k)}
    s = after["sampler"]
    one = GlobalOrderSampler(N)
    one.frontier, one.exceptions = s["frontier"], s["exceptions"]
    consumed_after = set(range(s["frontier"])) | set(s["exceptions"]) | {
        one.free_position(j) for j in range(s["scanned"]["0"])}
    assert consumed_before < consumed_after
    assert len(consumed_after) == s["consumed"] == after["bad_data"]["seen"]


def test_data_throughput_benchmark_reports_every_path_and_the_7b_need(tmp_path):
    bench = load_script("benchmarks/data_throughput.py")
    out = bench.run(device="cpu", workers=(0,), clips=2, file_frames=5, frames=5, height=16, width=16,
                    batch=2, latent_samples=2, timed_clips=4, workdir=str(tmp_path))
    assert set(out["paths"]) >= {"pyav_vp9", "pyav_h264", "decoded_clip_shards", "latent_shards_7b"}
    for name, res in out["paths"].items():
        row = res["workers"]["0"]
        assert row["clips"] == 4 and row["bad"] == 0 and row["clips_per_s"] > 0, name
    assert out["paths"]["latent_shards_7b"]["workers"]["0"]["decoded_by"] == {"latents": 6}
    assert "not measured" in out["not_measured"]["dali_gpu_h264"]
    need = out["requirement_7b"]
    # every rank of a replica (tp x pp; the 7B config has cp 1) reads the replica's batch
    assert need["layout"]["tp"] * need["layout"]["pp"] == need["ranks_reading_one_replica_batch"]
    ranks = need["ranks_reading_one_replica_batch"]
    assert need["clips_per_s_per_rank"] == need["clips_per_s_per_gpu"] * ranks
    assert abs(need["clips_per_s_per_gpu"] - 0.4 * 989e12 / need["model_flops_per_clip"]) < 1e-12
    assert set(out["keeps_up"]) == set(out["paths"])


def test_the_dali_decoder_follows_the_callers_device(bad_shards, tmp_path):
    """No GPU here: the GPU decoder is only configured (its pipeline is built on first use)."""
    from types import SimpleNamespace

    from megatron_starflow.data.video import DALI_GPU_CODECS, dali_available, dali_device_for
    from megatron_starflow.training.build import train_loader

    assert dali_device_for(torch.device("cuda", 3)) == ("mixed", 3)
    assert dali_device_for(torch.device("cpu")) == ("cpu", None) == dali_device_for(None)
    if not dali_available():
        pytest.skip("nvidia-dali is not installed")
    records, _ = read_shards(bad_shards)
    gpu = VideoClipIterator(records, SPEC, "auto", device=torch.device("cuda", 1))
    cpu = VideoClipIterator(records, SPEC, "auto", device=torch.device("cpu"))
    assert (gpu.decoder.dali.device, gpu.decoder.dali.device_id) == ("mixed", 1)
    assert {"h264", "hevc", "vp9"} <= DALI_GPU_CODECS
    assert gpu.decoder.dali.can_decode("h264") and not cpu.decoder.dali.can_decode("h264")
    # the training loop hands its one device to the loader
    layout = SimpleNamespace(dp_rank=0, dp_size=1, device=torch.device("cuda", 0))
    loader = train_loader(_train_config(bad_shards), str(tmp_path), None, layout)
    assert (loader.settings.dali_device, loader.settings.dali_device_id) == ("mixed", 0)
