"""Video-file data path: PyAV vs DALI decoding, DP sharding, exact resume, bad files, shards, and a
short training run from shards. Real VP9 (.webm) and H.264 (.mp4) files are written once per module
by tools/make_synthetic_data.py."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch

from megatron_starflow.data.bad_data import BadDataError, BadDataLog, BadSample
from megatron_starflow.data.sampler import GlobalOrderSampler, merge_states
from megatron_starflow.data.shards import read_shards
from megatron_starflow.data.synthetic import make_clip
from megatron_starflow.data.video import (ClipSpec, VideoClipIterator, dali_available, decode_pyav,
                                          probe, records_from_folder, resize_crop)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """6 clips as lossless VP9 + H.264 (12 files), 2 lossy VP9 clips, and their shards."""
    root = tmp_path_factory.mktemp("videos")
    make = _tool("make_synthetic_data")
    make.main(["--out", str(root / "mixed"), "--num", "6", "--frames", "8", "--height", "16",
               "--width", "16", "--fps", "8", "--format", "webm,mp4"])
    make.main(["--out", str(root / "lossy"), "--num", "2", "--frames", "8", "--height", "32",
               "--width", "32", "--fps", "8", "--format", "webm", "--vp9-lossy"])
    prep = _tool("prepare_data")
    prep.main(["--input", str(root / "mixed"), "--out", str(root / "shards"), "--shard-size", "5"])
    return root


# ------------------------------------------------------------------------------------------------
def test_synthetic_writer_makes_real_vp9_and_h264_with_captions(files):
    mixed = files / "mixed"
    assert probe(str(mixed / "train_0000000.webm")).codec == "vp9"
    assert probe(str(mixed / "train_0000000.mp4")).codec == "h264"
    video, caption, _ = make_clip(0, "train", 8, 16, 16)
    assert (mixed / "train_0000000.txt").read_text().strip() == caption
    # lossless VP9 4:4:4: only the RGB <-> YUV rounding (at most 1 level); H.264 4:2:0: codec error
    vp9 = decode_pyav(str(mixed / "train_0000000.webm"), np.arange(8)).astype(int)
    assert np.abs(vp9 - video).max() <= 1
    h264 = decode_pyav(str(mixed / "train_0000000.mp4"), np.arange(8)).astype(int)
    assert np.abs(h264 - video).mean() < 8
    lines = (mixed / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 12 and {json.loads(x)["file"][-4:] for x in lines} == {"webm", ".mp4"}


@needs_dali
@pytest.mark.parametrize("folder", ["mixed", "lossy"])
def test_dali_and_pyav_give_the_same_frames_for_vp9(files, folder):
    recs = [r for r in records_from_folder(str(files / folder)) if r.path.endswith(".webm")]
    size = 16 if folder == "mixed" else 32
    spec = ClipSpec(frames=4, height=size, width=size, stride=2, start="first")
    out = {}
    for backend in ("pyav", "dali"):
        it = VideoClipIterator(recs, spec, backend, shuffle=False, batch_size=len(recs))
        batch = it.next_batch()
        assert it.decoded_by[backend] == len(recs) and batch["key"] == [r.key for r in recs]
        out[backend] = batch["video"].numpy().astype(int)
    diff = np.abs(out["pyav"] - out["dali"])
    truth = np.stack([make_clip(int(r.key.split("_")[1]), "train", 8, size, size)[0][[0, 2, 4, 6]]
                      for r in recs]).astype(int)
    err = {k: np.abs(v - truth).mean() for k, v in out.items()}
    if folder == "mixed":  # lossless 4:4:4: the back ends differ by YUV -> RGB rounding only
        assert diff.max() <= 2 and diff.mean() < 0.1, (diff.max(), diff.mean())
    else:  # 4:2:0: the chroma upsampling filters differ at sharp colour edges, within codec error
        assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 32, (diff.mean(), err)
    assert abs(err["dali"] - err["pyav"]) < 1.0, err


def test_clip_sampling_stride_fps_and_crop(files):
    path = str(files / "mixed" / "train_0000001.webm")
    full = decode_pyav(path, np.arange(8))
    recs = [r for r in records_from_folder(str(files / "mixed")) if r.key == "train_0000001"
            and r.path.endswith(".webm")]
    # stride 2 at the native 8 fps -> frames 0, 2, 4, 6
    it = VideoClipIterator(recs, ClipSpec(4, 16, 16, stride=2, start="first"), "pyav", shuffle=False)
    assert np.array_equal(it.next_batch()["video"][0].numpy(), full[[0, 2, 4, 6]])
    # resampled to 4 fps -> every second frame as well
    it = VideoClipIterator(recs, ClipSpec(3, 16, 16, sample_fps=4, start="first"), "pyav", shuffle=False)
    assert np.array_equal(it.next_batch()["video"][0].numpy(), full[[0, 2, 4]])
    # 8 frames at stride 2 do not fit into 8 -> too short
    it = VideoClipIterator(recs, ClipSpec(8, 16, 16, stride=2), "pyav", shuffle=False,
                           bad_log=BadDataLog(max_bad_fraction=1.0))
    res = it.decode([(0, 0)])[0][2]
    assert isinstance(res, BadSample) and res.kind == "too_short"
    # resize + centre crop: a 16x32 frame becomes 8x8 from its centre
    frames = np.zeros((1, 16, 32, 3), np.uint8)
    frames[:, :, 8:24] = 200
    out = resize_crop(frames, ClipSpec(1, 8, 8))
    assert out.shape == (1, 8, 8, 3) and (out[:, :, 1:-1] == 200).all() and out.min() > 150


# ------------------------------------------------------------------------------------------------
def _epoch_positions(n, dp, batch, shard_sizes, start_state=None, stop_after_steps=None):
    samplers = [GlobalOrderSampler(n, seed=7, dp_rank=r, dp_size=dp, shard_sizes=shard_sizes)
                for r in range(dp)]
    if start_state:
        for s in samplers:
            s.load_state_dict(start_state)
    taken, steps = [], 0
    while samplers[0].consumed < n and (stop_after_steps is None or steps < stop_after_steps):
        for s in samplers:
            taken.extend((p, i) for p, i in s.next_batch(batch) if p < n)
        steps += 1
    return taken, merge_states([s.state_dict() for s in samplers])


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_dp_sharding_covers_every_sample_once_per_epoch(dp):
    n, sizes = 23, [5, 5, 5, 5, 3]
    taken, _ = _epoch_positions(n, dp, batch=2, shard_sizes=sizes)
    assert sorted(i for _, i in taken) == list(range(n))
    # shard-blocked order: an epoch reads shard after shard
    order = GlobalOrderSampler(n, seed=7, shard_sizes=sizes).epoch_order(0)
    shard_of = np.repeat(np.arange(5), sizes)[order]
    assert (np.diff(shard_of) != 0).sum() == 4
    # a different epoch is a different permutation
    assert not np.array_equal(order, GlobalOrderSampler(n, seed=7, shard_sizes=sizes).epoch_order(1))


@pytest.mark.parametrize("dp_before,dp_after", [(2, 2), (2, 3), (3, 1)])
def test_resume_mid_epoch_yields_exactly_the_remaining_samples(dp_before, dp_after):
    n, sizes = 29, [10, 10, 9]
    first, state = _epoch_positions(n, dp_before, 2, sizes, stop_after_steps=2)
    assert state["consumed"] == 2 * 2 * dp_before and state["epoch"] == 0 and "shard" in state
    rest, _ = _epoch_positions(n, dp_after, 2, sizes, start_state=state)
    got = [i for _, i in first] + [i for _, i in rest]
    assert sorted(got) == list(range(n))  # nothing repeated, nothing skipped
    # the remaining samples are exactly the tail of the global order
    order = GlobalOrderSampler(n, seed=7, shard_sizes=sizes).epoch_order(0)
    assert sorted(i for _, i in rest) == sorted(order[state["consumed"]:].tolist())


def test_iterator_resume_is_exact_and_dp_change_keeps_the_epoch(files):
    records, sizes = read_shards(str(files / "shards"))
    n = len(records)
    spec = ClipSpec(4, 16, 16, crop="random")

    def make(rank=0, dp=1):
        return VideoClipIterator(records, spec, "auto", seed=3, dp_rank=rank, dp_size=dp,
                                 batch_size=2, shard_sizes=sizes)

    a = make()
    a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON / checkpoint round trip
    expect = a.next_batch()
    b = make()
    b.load_state_dict(state)
    got = b.next_batch()
    assert got["key"] == expect["key"] and torch.equal(got["video"], expect["video"])
    # dp 2 for one step, then dp 3 until the end of the epoch: every file exactly once
    its = [make(r, 2) for r in range(2)]
    keys = [k for it in its for k, p in zip(*(lambda b: (b["key"], b["position"]))(it.next_batch()))]
    state = merge_states([it.state_dict() for it in its])
    its = [make(r, 3) for r in range(3)]
    for it in its:
        it.load_state_dict(state)
    while its[0].sampler.consumed < n:
        for it in its:
            batch = it.next_batch()
            keys += [k for k, p in zip(batch["key"], batch["position"]) if p < n]
    assert sorted(keys) == sorted(r.key for r in records)


# ------------------------------------------------------------------------------------------------
@pytest.fixture
def bad_folder(files, tmp_path):
    """4 good webm clips + one of each bad kind, captions in <stem>.txt."""
    src = files / "mixed"
    for i in range(4):
        for ext in ("webm", "txt"):
            shutil.copy(src / f"train_{i:07d}.{ext}", tmp_path / f"good{i}.{ext}")
    _tool("make_synthetic_data").main(["--out", str(tmp_path / "long"), "--num", "1", "--frames", "24",
                                       "--height", "32", "--width", "32", "--format", "webm"])
    data = (tmp_path / "long" / "train_0000000.webm").read_bytes()
    (tmp_path / "truncated.webm").write_bytes(data[: len(data) * 6 // 10])
    (tmp_path / "zero.webm").write_bytes(b"")
    (tmp_path / "garbage.webm").write_bytes(np.random.default_rng(0).bytes(3000))
    (tmp_path / "notavideo.mp4").write_text("this is a caption file, not an mp4\n")
    _tool("make_synthetic_data").main(["--out", str(tmp_path / "short"), "--num", "1", "--frames", "2",
                                       "--height", "16", "--width", "16", "--format", "webm"])
    shutil.copy(tmp_path / "short" / "train_0000000.webm", tmp_path / "short.webm")
    shutil.copy(src / "train_0000004.webm", tmp_path / "nocaption.webm")
    for name in ("truncated", "zero", "garbage", "notavideo", "short"):
        (tmp_path / f"{name}.txt").write_text("a caption\n")
    shutil.rmtree(tmp_path / "long")
    shutil.rmtree(tmp_path / "short")
    return tmp_path


EXPECTED_KINDS = {"truncated": "truncated", "zero": "zero_byte", "garbage": "undecodable",
                  "notavideo": "undecodable", "short": "too_short", "nocaption": "no_caption"}


@pytest.mark.parametrize("backend", ["pyav", "auto"])
def test_each_bad_file_kind_is_skipped_counted_and_logged(bad_folder, backend):
    # the six bad files first: a batch of 4 replaces each by the next file, so it reads all 10
    records = sorted(records_from_folder(str(bad_folder)), key=lambda r: r.key.startswith("good"))
    assert len(records) == 10
    log = BadDataLog(str(bad_folder / f"bad_{backend}.jsonl"), max_bad_fraction=0.7)
    it = VideoClipIterator(records, ClipSpec(4, 16, 16), backend, batch_size=4, bad_log=log,
                           shuffle=False)
    batch = it.next_batch()
    assert batch["key"] == [f"good{i}" for i in range(4)] and it.sampler.scanned == 10
    assert log.counts == {"truncated": 1, "zero_byte": 1, "undecodable": 2, "too_short": 1, "no_caption": 1}
    logged = [json.loads(x) for x in (bad_folder / f"bad_{backend}.jsonl").read_text().splitlines()]
    assert {os.path.splitext(os.path.basename(r["path"]))[0]: r["kind"] for r in logged} == EXPECTED_KINDS
    # the bad fraction (6/10) passes a 50 % limit: a clear abort
    strict = VideoClipIterator(records, ClipSpec(4, 16, 16), backend, batch_size=4, shuffle=False,
                               bad_log=BadDataLog(max_bad_fraction=0.5, min_samples=4))
    with pytest.raises(BadDataError, match="more than data.max_bad_fraction=0.5"):
        strict.next_batch()


def test_prepare_data_skips_bad_files_and_shards_round_trip(bad_folder, files, tmp_path):
    out = tmp_path / "packed"
    _tool("prepare_data").main(["--input", str(bad_folder), "--out", str(out), "--shard-size", "3",
                                "--min-frames", "4"])
    records, sizes = read_shards(str(out))
    assert sizes == [3, 1] and sorted(r.key for r in records) == [f"good{i}" for i in range(4)]
    for r in records:  # the bytes and captions in the shard are the files'
        assert r.read_bytes() == (bad_folder / f"{r.key}.webm").read_bytes()
        assert r.caption == (bad_folder / f"{r.key}.txt").read_text().strip()
        assert r.meta["codec"] == "vp9" and r.meta["frames"] == 8
    logged = [json.loads(x) for x in (out / "bad_data.jsonl").read_text().splitlines()]
    assert sorted(r["kind"] for r in logged) == sorted(EXPECTED_KINDS.values())
    assert not [p for p in os.listdir(out) if "partial" in p]
    manifest = json.loads((out / "shards.json").read_text())
    assert manifest["samples"] == 4 and [s["samples"] for s in manifest["shards"]] == [3, 1]
    # latent (pre-decoded) shards give the same clips as decoding the video shards
    lat = tmp_path / "latent"
    _tool("prepare_data").main(["--input", str(bad_folder), "--out", str(lat), "--latents", "--config",
                                os.path.join(ROOT, "examples/configs/tiny_cpu.yaml"), "data.frames=4"])
    lrecs, _ = read_shards(str(lat))
    spec = ClipSpec(4, 16, 16, start="first")
    a = VideoClipIterator(records, spec, "pyav", shuffle=False, batch_size=4).next_batch()
    b = VideoClipIterator(lrecs, spec, "auto", shuffle=False, batch_size=4).next_batch()
    assert a["key"] == b["key"] and torch.equal(a["video"], b["video"])


def test_manifest_csv(files, tmp_path):
    mixed = files / "mixed"
    rows = ["path,caption"] + [f"{mixed / f'train_{i:07d}.mp4'},clip number {i}" for i in range(3)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    _tool("prepare_data").main(["--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "s")])
    records, _ = read_shards(str(tmp_path / "s"))
    assert [r.caption for r in records] == [f"clip number {i}" for i in range(3)]
    assert {r.meta["codec"] for r in records} == {"h264"}


# ------------------------------------------------------------------------------------------------
def test_train_three_steps_from_shards_saves_loader_state(files, tmp_path):
    from megatron_starflow.config import load_config
    from megatron_starflow.training import sharded_checkpoint as store
    from megatron_starflow.training.trainer import train

    overrides = ["train.steps=3", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=3",
                 "train.ckpt_every=3", "train.eval_batches=1", "train.wandb_mode=disabled",
                 "data.batch_size=2", "data.frames=2", "data.height=8", "data.width=8",
                 "data.num_heldout_clips=2", "model.num_blocks=2", "model.shallow_layers=1",
                 "model.deep_layers=1", "model.denoiser_layers=1", "text.layers=1", "data.source=shards", f"data.shards={files / 'shards'}",
                 f"data.heldout_shards={files / 'shards'}", "data.crop=random"]
    cfg = load_config(os.path.join(ROOT, "examples/configs/tiny_cpu.yaml"), overrides)
    result = train(cfg, str(tmp_path / "run"), quiet=True)
    assert result.steps == 3 and np.isfinite(result.eval_end["bits_per_dim"])
    path, _ = store.find_resumable(str(tmp_path / "run"))
    state = store.read_meta(path)
    assert state["data"]["sampler"]["consumed"] == 6 and state["data"]["bad_data"]["seen"] == 6
