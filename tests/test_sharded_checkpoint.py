"""Sharded DCP checkpoints (training/sharded_checkpoint.py) of ShardedAdamW state and weights.

One process: a bit-exact round trip with extras/meta/config/files, the folder layout and manifest,
`latest` and retention, corruption handling (truncated file, changed byte, missing manifest, all
damaged, a temp folder of a killed writer), strict loading.
Four gloo processes (slow, tests/dist_scripts/sharded_ckpt_checks.py): same-layout round trips
and resharding between (tp, dp) = (2,1), (1,2), (2,2), (1,4), a two-"stage" layout and (1,1) with
megatron Column/RowParallelLinear weights, all bit-exact against the one-process state, plus the
continuation step; DTensor nesting (tp outer, shard inner); the DP=2 file sizes; distributed hash
verification; and load_full_model of a TP=2 save in this (one) process.
"""

import json
import os

import pytest
import torch

from helpers_dist import run_checks
from helpers_sharded import Tiny, batch, groups_of, loss_fn

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "dist_scripts", "sharded_ckpt_checks.py")
LRS = {"flow": 1e-2, "denoiser": 1e-2}


def trained(steps=2, seed=0):
    from megatron_starflow.training.sharded_optimizer import ShardedAdamW

    model = Tiny(torch.bfloat16, seed=seed)
    opt = ShardedAdamW(groups_of(model), betas=(0.9, 0.95), weight_decay=0.1)
    for s in range(steps):
        opt.zero_grad()
        x, y = batch(s, torch.bfloat16)
        loss_fn(model, x, y).backward()
        opt.reduce_grads()
        opt.step(LRS, {"flow": 1.0, "denoiser": 1.0})
    return model, opt


def tensors(opt):
    t = opt.model_sharded_state_dict(prefix="model.")
    t.update(opt.sharded_state_dict())
    return t


def save_steps(run_dir, steps, keep=5):
    from megatron_starflow.training import sharded_checkpoint as sc

    model, opt = trained()
    paths = [sc.save(str(run_dir), s, tensors(opt), {"s": s}, {"m": s}, {"c": 1}, keep=keep) for s in steps]
    opt.close()
    return paths


def truncate(path, rel, keep_fraction=0.5):
    full = os.path.join(path, rel)
    size = os.path.getsize(full)
    with open(full, "r+b") as f:
        f.truncate(int(size * keep_fraction))


def test_roundtrip_layout_and_manifest(tmp_path):
    from megatron_starflow.training import sharded_checkpoint as sc

    model, opt = trained(steps=3)
    tok = tmp_path / "spm.model"
    tok.write_bytes(b"tokenizer bytes")
    extras = {"rng": torch.get_rng_state(), "position": 123}
    path = sc.save(str(tmp_path / "run"), 3, tensors(opt), extras, {"parallel": {"tp": 1}}, lambda: {"lr": 1},
                   keep=2, files={"tokenizer/spm.model": str(tok)})
    assert path == str(tmp_path / "run" / "checkpoints" / "step_0000003")
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    names = {os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs}
    manifest = json.load(open(os.path.join(path, "integrity.json")))["files"]
    assert set(manifest) == names - {"integrity.json"}  # every other file, with size and sha256
    assert {"meta.json", "config.json", "extra/rank_00000.pt", "tokenizer/spm.model", "model/.metadata",
            "optim/.metadata", "model/__0_0.distcp", "optim/__0_0.distcp"} <= set(manifest)
    assert sc.read_meta(path)["step"] == 3 and sc.read_meta(path)["parallel"] == {"tp": 1}
    assert sc.read_config(path) == {"lr": 1}
    got = sc.load_extras(path, 0)
    assert got["position"] == 123 and torch.equal(got["rng"], extras["rng"])
    assert sc.load_extras(path, 1) is None  # another world size: no such rank file

    fresh, opt2 = trained(steps=0, seed=5)
    assert any(not torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    loaded = sc.load(path, tensors(opt2))
    opt2.load_sharded_state_dict(loaded)
    opt2.load_model_sharded_state_dict(loaded)
    for (k, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), k
        for n in ("master", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state_rows(k)[n], opt2.state_rows(k)[n]), (k, n)
    assert opt2.group_steps == opt.group_steps == {"flow": 3, "denoiser": 3}
    # training continues identically
    for o, m in ((opt, model), (opt2, fresh)):
        o.zero_grad()
        x, y = batch(7, torch.bfloat16)
        loss_fn(m, x, y).backward()
        o.reduce_grads()
        o.step(LRS, {"flow": 1.0, "denoiser": 1.0})
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    full = sc.load_full_model(path)
    assert set(full) == {k for k, _ in model.named_parameters()}
    assert full["scale"].shape == () and full["fc1.weight"].dtype == torch.bfloat16
    with pytest.raises(KeyError, match="not in the checkpoint"):
        sc.load(path, {"model.nope": torch.zeros(2)})
    assert sc.load(path, {"model.nope": torch.zeros(2)}, strict=False) == {}
    opt.close()
    opt2.close()


def test_latest_and_retention(tmp_path):
    from megatron_starflow.training import sharded_checkpoint as sc

    paths = save_steps(tmp_path, [1, 2, 3, 4], keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(os.listdir(root)) == ["latest", "step_0000003", "step_0000004"]
    assert (root / "latest").read_text().strip() == "step_0000004"
    assert sc.find_resumable(str(tmp_path)) == (paths[-1], [])
    save_steps(tmp_path, [4], keep=2)  # the same step again replaces the folder
    assert sorted(os.listdir(root)) == ["latest", "step_0000003", "step_0000004"]
    assert sc.find_resumable(str(tmp_path)) == (paths[-1], [])
    assert sc.find_resumable(str(tmp_path / "nothing")) == (None, [])


def test_truncated_latest_falls_back_with_one_warning(tmp_path):
    from megatron_starflow.training import sharded_checkpoint as sc

    first, second = save_steps(tmp_path, [1, 2])
    truncate(second, "optim/__0_0.distcp")
    path, notes = sc.find_resumable(str(tmp_path))
    assert path == first
    assert len(notes) == 1 and "step_0000002" in notes[0] and "optim/__0_0.distcp" in notes[0]
    assert "truncated" in notes[0]


def test_changed_byte_and_missing_manifest(tmp_path):
    from megatron_starflow.training import sharded_checkpoint as sc

    first, second, third = save_steps(tmp_path, [1, 2, 3])
    victim = os.path.join(third, "model", "__0_0.distcp")
    with open(victim, "r+b") as f:  # same size, one byte changed
        f.seek(os.path.getsize(victim) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    os.remove(os.path.join(second, "integrity.json"))
    path, notes = sc.find_resumable(str(tmp_path))
    assert path == first and len(notes) == 2
    assert "model/__0_0.distcp" in notes[0] and "sha256" in notes[0]
    assert "integrity.json" in notes[1] and "missing" in notes[1]


def test_all_damaged_is_one_clear_error(tmp_path):
    from megatron_starflow.training import sharded_checkpoint as sc

    first, second = save_steps(tmp_path, [1, 2])
    truncate(first, "extra/rank_00000.pt", 0.0)
    os.remove(os.path.join(second, "meta.json"))
    with pytest.raises(sc.NoIntactCheckpointError) as err:
        sc.find_resumable(str(tmp_path))
    assert isinstance(err.value, ValueError)
    msg = str(err.value)
    assert "step_0000001: extra/rank_00000.pt" in msg and "truncated" in msg
    assert "step_0000002: meta.json: missing" in msg


def test_temp_folder_of_killed_writer(tmp_path):
    from megatron_starflow.training import sharded_checkpoint as sc

    (first,) = save_steps(tmp_path, [1])
    dead = tmp_path / "checkpoints" / "step_0000002.tmp-deadbeef"
    (dead / "optim").mkdir(parents=True)
    (dead / "optim" / "__0_0.distcp").write_bytes(b"half")
    assert sc.find_resumable(str(tmp_path)) == (first, [])  # ignored
    save_steps(tmp_path, [3])
    assert not dead.exists()  # the next writer removes it
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_0000001", "step_0000003"]


def test_save_interrupted_before_rename(tmp_path):
    """A writer killed after writing but before the rename leaves only a temp folder."""
    from megatron_starflow.training import sharded_checkpoint as sc

    (first,) = save_steps(tmp_path, [1])
    model, opt = trained()

    class Killed(Exception):
        pass

    def die(tmp):
        assert os.path.isfile(os.path.join(tmp, "integrity.json"))
        raise Killed

    with pytest.raises(Killed):
        sc.save(str(tmp_path), 2, tensors(opt), {}, {}, {}, keep=3, before_rename=die)
    opt.close()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000001"
    assert sc.find_resumable(str(tmp_path)) == (first, [])


def test_roundtrip_with_process_group(megatron_ready, tmp_path):
    """With torch.distributed initialised (one rank), the state is DTensors on a one-rank mesh."""
    from torch.distributed.tensor import DTensor

    from megatron_starflow.training import sharded_checkpoint as sc

    model, opt = trained(steps=2)
    t = tensors(opt)
    assert isinstance(t["optim.flow.fc1.weight.master"], DTensor) and isinstance(t["model.fc1.weight"], DTensor)
    path = sc.save(str(tmp_path), 2, t, {"r": 0}, {}, {}, keep=1)
    assert sc.find_resumable(str(tmp_path)) == (path, [])
    fresh, opt2 = trained(steps=0, seed=5)
    loaded = sc.load(path, tensors(opt2))
    opt2.load_sharded_state_dict(loaded)
    opt2.load_model_sharded_state_dict(loaded)
    for (k, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), k
        for n in ("master", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state_rows(k)[n], opt2.state_rows(k)[n]), (k, n)
    assert torch.equal(sc.load_full_model(path)["fc2.weight"], model.fc2.weight.detach())
    opt.close()
    opt2.close()


@pytest.mark.slow
def test_reshard_4_ranks(tmp_path):
    from megatron_starflow.training import sharded_checkpoint as sc

    res = run_checks(SCRIPT, tmp_path / "out.json", [tmp_path], world=4, timeout=500)
    print(json.dumps({k: v for k, v in res.items() if k != "file_sizes_dp2"}, indent=1))
    for name in ("tp2dp1", "tp1dp2", "tp2dp2", "tp1dp4", "pp2"):
        r = res[f"save_{name}"]
        assert r["roundtrip_mismatch"] == [] and r["train_vs_reference_mismatch"] == [], (name, r)
        assert r["find_resumable_ok"] and r["meta"] == name, r
        assert r["norm_groups"] == ["denoiser", "flow"], r
        assert res[f"load_{name}_at_tp1dp1"]["mismatch"] == [], (name, res[f"load_{name}_at_tp1dp1"])
    for k, r in res.items():
        if k.startswith("reshard_"):
            assert r["mismatch"] == [] and r["next_step_mismatch"] == [], (k, r)
    assert res["dtensor_nesting"]["ok"], res["dtensor_nesting"]
    assert sorted(r["offset"][0] for r in res["dtensor_nesting"]["ranks"]) == [0, 128, 256, 384]
    sizes = res["file_sizes_dp2"]
    print(json.dumps(sizes, indent=1))
    assert len([f for f in sizes["files"] if f.startswith("optim/")]) == 2
    assert max(sizes["fractions"].values()) <= 0.60, sizes
    corrupt = res["corrupt_distributed"]
    assert corrupt["found_first"] and len(corrupt["notes"]) == 1 and "optim/__3_0.distcp" in corrupt["notes"][0]

    # load_full_model in this one process (no process group needed) gives the full TP=2 weights
    ref = torch.load(tmp_path / "reference.pt")["K"]
    full = sc.load_full_model(res["save_tp2dp1"]["path"])
    assert set(full) == {k for k in ref if k != "steps"}
    for k, v in full.items():
        assert torch.equal(v, ref[k]["param"]), k
    optim = sc.load_full_tensors(res["save_tp2dp2"]["path"], "optim", "optim.")
    for k in full:
        group = "denoiser" if k in ("norm", "odd") else "flow"
        for n in ("master", "exp_avg", "exp_avg_sq"):
            assert torch.equal(optim[f"{group}.{k}.{n}"].reshape(-1), ref[k][n].reshape(-1)), (k, n)
