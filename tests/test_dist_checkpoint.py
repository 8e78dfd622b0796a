"""megatron-core dist_checkpointing of STARFlow-V on CPU/gloo (training/dist_checkpoint.py).

One process: save, then load into a fresh model -> identical state_dict, checkpoint keys equal the
plain state_dict names. Two processes (slow): save from TP=2 (tests/dist_scripts/dist_ckpt_tp.py,
which also reloads at TP=2), then load here at TP=1 and compare with the TP-gathered full weights:
megatron reshards TP=2 -> TP=1 at load time.
"""

import json
import os

import pytest
from helpers_dist import run_torchrun
import torch

from conftest import TINY_MODEL, randomize_heads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "dist_scripts", "dist_ckpt_tp.py")


def _model(seed: int):
    from megatron_starflow.config import ModelConfig
    from megatron_starflow.models.starflow import StarFlowV

    torch.manual_seed(seed)
    model = StarFlowV(ModelConfig(**TINY_MODEL))
    randomize_heads(model, seed=seed + 100)
    return model


def _tensors(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}



def test_save_load_one_process(megatron_ready, tmp_path):
    from megatron.core.dist_checkpointing import load_tensors_metadata

    from megatron_starflow.training.dist_checkpoint import (load_dist, model_sharded_state_dict,
                                                            save_dist)

    model, fresh = _model(1), _model(2)
    want = _tensors(model)
    assert any(not torch.equal(want[k], v) for k, v in _tensors(fresh).items())
    sharded = model_sharded_state_dict(model)
    assert set(want) <= set(sharded)
    assert all(getattr(v, "key", k) == k for k, v in sharded.items())  # readable by plain name

    path = save_dist(model, str(tmp_path / "ckpt"))
    assert os.path.isdir(path) and not os.path.exists(path + ".tmp")
    assert set(want) <= set(load_tensors_metadata(path))
    load_dist(fresh, path)
    got = _tensors(fresh)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k

    save_dist(fresh, path)  # overwriting an existing checkpoint keeps it loadable
    load_dist(_model(3), path)

    # a text encoder is stored beside the model under `text_encoder.`
    enc, enc_fresh = torch.nn.Linear(4, 5), torch.nn.Linear(4, 5)
    save_dist(model, path, text_encoder=enc)
    assert "text_encoder.weight" in load_tensors_metadata(path)
    load_dist(_model(4), path, text_encoder=enc_fresh)
    assert torch.equal(enc_fresh.weight, enc.weight) and torch.equal(enc_fresh.bias, enc.bias)


@pytest.mark.slow
def test_tp2_save_loads_at_tp1(megatron_ready, tmp_path):
    from megatron_starflow.training.dist_checkpoint import load_dist

    ckpt, full_path, out = tmp_path / "tp2", tmp_path / "full.pt", tmp_path / "out.json"
    run_torchrun(SCRIPT, [ckpt, full_path, out], world=2)
    res = json.loads(out.read_text())
    assert res["sharded_qkv_rows"] == 48  # 3 * 32 / tp: the saving ranks really held TP shards
    assert res["tp2_reload_maxdiff"] == 0.0

    full = torch.load(full_path)
    model = _model(9)  # this process: TP=1
    load_dist(model, str(ckpt))
    got = dict(model.named_parameters())
    assert set(got) == set(full)
    for k, v in full.items():
        assert got[k].shape == v.shape, k
        assert torch.equal(got[k].detach(), v), k
