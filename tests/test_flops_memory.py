"""FLOPs, memory estimate, Transformer Engine spec plumbing and the throughput benchmark (CPU, fast).

Tolerances:
  * FLOPs: ``model_flops(attention="dense")`` vs torch's FlopCounterMode over a whole training step
    (flow forward + backward + denoiser forward + backward, SDPA forced to its math path so that
    attention matmuls are visible to the counter): relative difference < 1 % (observed 0.04 %: the
    backward skips the input grads of the denoiser's projections, which we count as 3 x forward).
    Mask densities: closed-form pair counts equal the layouts' mask sums exactly.
  * Activations: the estimate vs the bytes of every tensor autograd saves during the forward
    (``saved_tensors_hooks``, unique storages, parameters excluded), with and without recompute.
    The estimate is an upper bound (it never under-counts: "fits" must mean fits) and close:
    flow +4.2 %, denoiser +6.5 % without recompute, +6.6 % and +12.3 % with it (the local fast
    path saves a little less than megatron's layers, for which the formula was written: +0.9 / +2.1
    / +5.7 / +9.1 %). Allowed: [0, +15 %]; a dropped term (under) or a doubled one fails.
  * MFU / TFLOP/s: the logged figures follow from the logged FLOPs and the step time recovered
    from the logged tokens/s (mfu = flops / dt / world / 1e12 / peak_tflops), and the FLOPs are the
    formula checked above.
"""

import json

import pytest
import torch

from megatron_starflow.config import ConfigError, load_config

SMALL_DATA = ["data.frames=4", "data.height=8", "data.width=8", "data.batch_size=2"]


def _saved_bytes(fn, params) -> int:
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_flops_match_flop_counter(megatron_ready):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_starflow.models.starflow import StarFlowV
    from megatron_starflow.training.flops import model_flops
    from megatron_starflow.training.losses import flow_and_fsm_backward

    cfg = load_config(overrides=SMALL_DATA + ["model.attn_window=2"])
    torch.manual_seed(0)
    model = StarFlowV(cfg.model)
    tokens = torch.randn(2, 4, 4, 4, cfg.model.token_channels)
    text = torch.randn(2, cfg.model.text_length, cfg.model.text_width, requires_grad=True)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        flow_and_fsm_backward(model, tokens, text)
    ours = model_flops(cfg, batch=2, grid=(4, 4, 4), attention="dense", text_encoder=False)
    measured = counter.get_total_flops()
    assert abs(ours.model_flops_per_step - measured) / measured < 0.01
    masked = model_flops(cfg, batch=2, grid=(4, 4, 4), text_encoder=False)
    assert masked.model_flops_per_step < ours.model_flops_per_step  # causal / windowed masks


@pytest.mark.parametrize("window", [0, 1, 2, 5])
def test_pair_counts_match_masks(window):
    from megatron_starflow.models.layout import SlotLayout
    from megatron_starflow.training.flops import causal_pairs, lookahead_pairs

    for text_len, frames, h, w in [(3, 4, 2, 3), (0, 1, 4, 4), (5, 3, 1, 2)]:
        causal = SlotLayout(text_len, frames, h, w, True, 4.0, window=window)
        assert int(causal.causal_mask().sum()) == causal_pairs(text_len, frames, h * w, window)
        if window:
            for ahead in (0, 1):
                assert int(causal.lookahead_mask(ahead=ahead).sum()) == \
                    lookahead_pairs(text_len, frames, h * w, window, ahead)


@pytest.mark.parametrize("recompute", [False, True])
def test_activation_estimate_matches_saved_tensors(megatron_ready, recompute):
    from megatron_starflow.models.starflow import StarFlowV
    from megatron_starflow.parallel import memory

    cfg = load_config(overrides=SMALL_DATA + [f"model.recompute={recompute}"])
    torch.manual_seed(0)
    model = StarFlowV(cfg.model)
    b, grid = 2, (4, 4, 4)
    x = torch.randn(b, *grid, cfg.model.token_channels, requires_grad=True)
    text = torch.randn(b, cfg.model.text_length, cfg.model.text_width)
    flow = _saved_bytes(lambda: model(x, text).nll_per_dim().mean(), model.parameters())
    den = _saved_bytes(lambda: model.denoise_score(x.detach(), text), model.parameters())
    kw = dict(micro_batch=b, act=4, recompute=recompute, grid=grid, peak=False)
    est_flow = memory.activation_bytes(cfg, range(cfg.model.num_blocks), **kw)
    est_den = memory.denoiser_activation_bytes(cfg, **kw)
    assert 0.0 <= est_flow / flow - 1 <= 0.15, (est_flow, flow)
    assert 0.0 <= est_den / den - 1 <= 0.15, (est_den, den)
    if recompute:  # the peak adds one recomputed layer: the no-recompute per-layer formula
        assert memory.activation_bytes(cfg, range(cfg.model.num_blocks), **{**kw, "peak": True}) > est_flow


def test_memory_static_and_7b_table(megatron_ready, capsys):
    from helpers_scripts import load_script

    estimate_memory = load_script("tools/estimate_memory.py")
    from megatron_starflow.parallel import memory

    per = memory.static_bytes_per_param(dp=8, distributed_optimizer=True)
    assert per["params"] + per["grads"] + per["optimizer"] == pytest.approx(6 + 12 / 8)
    assert sum(memory.static_bytes_per_param(1, False).values()) == 18
    report = estimate_memory.main(["--preset", "7b", "--tp", "2", "--pp", "4", "--dp", "12",
                                   "--recompute", "--distributed-optimizer", "--json"])
    assert abs(report["total_params"] / 6.89e9 - 1) < 0.01
    stages = report["layout"]["stages"]
    tp = 2
    inv = memory.param_inventory(load_config(preset="7b"))
    assert sum(r["params_per_rank"] for r in stages) * tp == pytest.approx(
        sum(inv.sharded.values()) + tp * sum(inv.replicated.values()))
    assert report["recommended"] is not None and report["recommended"]["recompute"]
    assert all(row["tp"] * row["pp"] * row["dp"] == 96 for row in report["table"])
    json.dumps(report)


def test_te_spec_clear_error_and_key_map(megatron_ready):
    from megatron_starflow.models.starflow import StarFlowV
    from megatron_starflow.models.transformer import (TE_UNAVAILABLE, SpecUnavailableError,
                                                      TransformerStack, local_key_map, te_key_map)

    try:
        import transformer_engine  # noqa: F401
        has_te = True
    except Exception:
        has_te = False
    if not (has_te and torch.cuda.is_available()):
        with pytest.raises(SpecUnavailableError, match="parallel.spec=te needs transformer_engine"):
            TransformerStack(64, 1, 32, spec="te")
        assert "requirements-gpu.txt" in TE_UNAVAILABLE
    cfg = load_config(overrides=SMALL_DATA)
    state = StarFlowV(cfg.model).state_dict()
    te_state = te_key_map(state)
    assert not any("layernorm" in k for k in te_state)
    layers = cfg.model.shallow_layers * (cfg.model.num_blocks - 1) + cfg.model.deep_layers \
        + cfg.model.denoiser_layers
    assert sum(k.endswith("linear_qkv.layer_norm_weight") for k in te_state) == layers
    assert sum(k.endswith("mlp.linear_fc1.layer_norm_bias") for k in te_state) == layers
    back = local_key_map(te_state)
    assert list(back) == list(state)
    assert all(back[k] is state[k] for k in state)


def test_fp8_config():
    with pytest.raises(ConfigError, match="parallel.spec=te"):
        load_config(overrides=["parallel.fp8=hybrid"])
    with pytest.raises(ConfigError, match="parallel.fp8"):
        load_config(overrides=["parallel.fp8=e5m2", "parallel.spec=te"])
    cfg = load_config(overrides=["parallel.fp8=hybrid", "parallel.spec=te", "train.peak_tflops=989"])
    assert cfg.parallel.fp8_recipe == "delayed" and cfg.train.peak_tflops == 989.0
    from megatron_starflow.models.transformer import transformer_config

    tc = transformer_config(64, 1, 32, 4, 0.02, fp8="hybrid", fp8_recipe="delayed")
    assert tc.fp8 == "hybrid" and tc.fp8_recipe == "delayed"


def test_throughput_benchmark_cpu(megatron_ready):
    from helpers_scripts import load_script

    train_throughput = load_script("benchmarks/train_throughput.py")
    deep = train_throughput.run_gpu_deep(
        1, 1, None, True, 0.0, "width=64,layers=2,head_dim=32,frames=2,height=2,grid_width=4,text=8")
    assert deep["seq_len"] == 8 + 2 * 2 * 4 and deep["tokens_per_s"] > 0
    assert deep["hardware_flops_per_step"] == pytest.approx(deep["model_flops_per_step"] * 4 / 3)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            train_throughput.run_gpu_deep(1, 0, None, False, 0.0, "")
    tiny = train_throughput.run_preset("tiny", 1, 0, SMALL_DATA, peak_tflops=1.0)
    assert tiny["tokens_per_step"] == 2 * 4 * 4 * 4
    _check_step_metrics(tiny, load_config(overrides=SMALL_DATA), batch=2, grid=(4, 4, 4),
                        seconds=tiny["step_time_s"], peak=1.0)


def test_training_logs_flops(megatron_ready, tmp_path):
    from megatron_starflow.training.trainer import train
    from megatron_starflow.training.metrics import read_metrics

    cfg = load_config(overrides=SMALL_DATA + [
        "train.steps=2", "train.warmup_steps=0", "train.log_every=1", "train.eval_every=100",
        "train.ckpt_every=100", "train.eval_batches=1", "train.wandb_mode=disabled",
        "train.peak_tflops=1.0", "data.num_train_clips=8", "data.num_heldout_clips=2"])
    train(cfg, str(tmp_path), quiet=True)
    steps = [r for r in read_metrics(str(tmp_path)) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    tokens = 2 * 4 * 4 * 4  # batch 2 x latent grid (4, 4, 4)
    for r in steps:
        _check_step_metrics(r, cfg, batch=2, grid=(4, 4, 4), seconds=tokens / r["tokens_per_s"], peak=1.0)


def _check_step_metrics(r: dict, cfg, batch: int, grid: tuple, seconds: float, peak: float,
                        world: int = 1) -> None:
    """FLOPs = the formula (checked against FlopCounterMode above) for the global batch;
    TFLOP/s and MFU follow from them and the step time (rounding only)."""
    from megatron_starflow.training.flops import model_flops

    flops = model_flops(cfg, batch=batch, grid=grid)
    assert r["model_flops_per_step"] == flops.model_flops_per_step
    assert r["tflops_per_s"] == pytest.approx(flops.model_flops_per_step / seconds / world / 1e12, rel=1e-9)
    assert r["mfu"] == pytest.approx(r["tflops_per_s"] / peak, rel=1e-12)
    assert r["hfu"] == pytest.approx(flops.hardware_flops_per_step / seconds / world / 1e12 / peak, rel=1e-9)
    assert r["mfu"] < 0.1  # two CPU cores reach well under 0.1 TFLOP/s


@pytest.mark.parametrize("broken", ["hardware flops as model flops", "per-replica batch",
                                    "GFLOP/s as TFLOP/s", "mfu over world size twice"])
def test_step_metrics_check_rejects_wrong_figures(broken):
    """The MFU check above fails for the mistakes it is there to catch."""
    from megatron_starflow.training.flops import model_flops, step_metrics

    cfg = load_config(overrides=SMALL_DATA + ["model.recompute=true"])
    dt, peak = 0.25, 1.0
    flops = model_flops(cfg, batch=2, grid=(4, 4, 4))
    record = step_metrics(flops, dt, peak)
    _check_step_metrics(record, cfg, batch=2, grid=(4, 4, 4), seconds=dt, peak=peak)
    if broken == "hardware flops as model flops":
        record["mfu"] = record["hfu"]
    elif broken == "per-replica batch":
        record = step_metrics(model_flops(cfg, batch=1, grid=(4, 4, 4)), dt, peak)
    elif broken == "GFLOP/s as TFLOP/s":
        record["tflops_per_s"] *= 1e3
    else:
        record["mfu"] /= 2
    with pytest.raises(AssertionError):
        _check_step_metrics(record, cfg, batch=2, grid=(4, 4, 4), seconds=dt, peak=peak)
