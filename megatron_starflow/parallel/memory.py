"""Per-GPU memory of a training layout: parameters, gradients, optimizer states, activations.

Static memory (bytes per parameter held by the rank; megatron's bf16 recipe):
  bf16 weights 2 + fp32 main grads 4 (megatron's DDP grad buffer) + fp32 master copy 4 + Adam's
  two fp32 moments 8 = 18; with the distributed optimizer the master copy and the moments are
  sharded over DP: 6 + 12 / dp. (float32 training: weights 4, grads 4, no master copy, Adam 8.)
  A rank holds its pipeline stage's parameters: TP-sharded ones (megatron's
  ``tensor_model_parallel`` attribute) divided by tp, the rest (norms, RowParallel biases, the
  replicated flow heads and projections) in full. Counted exactly from the model built on meta.

Activations saved for backward by one layer of our stacks (a megatron TransformerLayer with the
local spec and SDPA core attention), for b sequences of S slots, width h, a heads of d dims, MLP
ratio r, tensor-parallel size t; the list is what ``saved_tensors_hooks`` sees on CPU:
  * 4 S b h   layer-norm inputs and outputs (LN1 in, qkv in, LN2 in, fc1 in)       / t under SP
  * (6 + 2r) S b h / t   q and k after RoPE, the fused qkv output (v is a view of it), the attention
    output (= linear_proj's input), fc1 output (GELU's input) and GELU output (fc2's input)
  * 4 S b fp32 layer-norm mean/rstd (/ t under SP), a S b / t fp32 attention log-sum-exp,
    4 S d RoPE cos/sin of q and k
  * S^2 in the activation dtype: SDPA turns the boolean mask into an additive float mask on every
    call and keeps it for backward (on GPU the memory-efficient kernel also pads the last dim to a
    multiple of 16). It is broadcast over batch and heads, so it does not shrink with b or t; at the
    7 B deep block (S = 33016) it is 2.2 GB per layer, which is why that block needs recompute.
  In bytes, all with the activation dtype (2 for bf16) except the fp32 statistics:
      per_layer = act * S b h (4/t_sp + (6 + 2r)/t) + 4 (4 S b / t_sp + a S b / t) + act (4 S d + S^2)
  Recompute (full, uniform, one layer per checkpoint, megatron's ``recompute_granularity=full``)
  keeps only each layer's input, act * S b h / t_sp, and at the peak of the backward one layer's
  activations are alive again: layers * act S b h / t_sp + per_layer.
  Per stack: + the boolean mask S^2 (1 byte) and RoPE angles (S d). Per flow block, outside its
  stack (replicated over TP, full sequence of video slots n): final norm in fp32 and proj_out's
  input, 8 n b h + act n b h, and the head's elementwise ops on [n, 2C], about 12 n b C * act.

Sequence of each stack, per sample of a T x H x W token grid with a text prefix of L tokens:
shallow blocks S = H*W with b = T sequences (one per frame); deep block and denoiser
S = L + T*H*W with b = 1.

Pipeline (parallel.pipeline): stages own whole flow blocks (balanced default split); with 1F1B
stage s keeps the activations of min(P - s, M) micro-batches in flight (M = micro-batches per
step, assumed >= P), the denoiser sits on stage 0 and runs after the flow's backward (its
activations replace the flow's, so stage 0 peaks at the larger of the two). The per-GPU figure
is the maximum over stages (TP ranks of a stage are equal).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from megatron_starflow.config import Config

GiB = 1024**3
GB = 1e9


@dataclass
class Stack:
    name: str
    width: int
    layers: int
    seq_len: int
    sequences: int  # per sample
    heads: int
    head_dim: int
    mlp_ratio: int
    head_slots: int = 0  # video slots the flow head reads (0 = no flow head, e.g. a denoiser head)
    head_channels: int = 0
    masks: int = 1  # boolean [S, S] masks the stack holds (the denoiser: 2 with first-layer look-ahead)


def layer_activation_bytes(s: Stack, micro_batch: int, act: int, tp: int = 1, sp: bool = False) -> float:
    """Saved-for-backward bytes of one layer (formula in the module docstring)."""
    b = micro_batch * s.sequences
    t_sp = tp if sp else 1
    sbh = s.seq_len * b * s.width
    return (act * sbh * (4 / t_sp + (6 + 2 * s.mlp_ratio) / tp)
            + 4 * (4 * s.seq_len * b / t_sp + s.heads * s.seq_len * b / tp)
            + act * 4 * s.seq_len * s.head_dim
            + act * s.seq_len**2)


def stack_activation_bytes(s: Stack, micro_batch: int, act: int, tp: int = 1, sp: bool = False,
                           recompute: bool = False, peak: bool = True) -> float:
    """Peak activation bytes of one stack (and its flow head) for one micro-batch; with recompute,
    ``peak=False`` gives what is saved at the end of the forward (without the one layer that the
    backward recomputes at a time)."""
    b = micro_batch * s.sequences
    t_sp = tp if sp else 1
    layer = layer_activation_bytes(s, micro_batch, act, tp, sp)
    if recompute:
        body = s.layers * act * s.seq_len * b * s.width / t_sp + (layer if peak else 0.0)
    else:
        body = s.layers * layer
    shared = s.masks * s.seq_len**2 + act * s.seq_len * s.head_dim
    head = 0.0
    if s.head_slots:
        n = s.head_slots * micro_batch
        head = n * s.width * (8 + act) + 12 * n * s.head_channels * act
    return body + shared + head


def model_stacks(cfg: Config, grid: tuple[int, int, int] | None = None) -> dict[int | str, list[Stack]]:
    """Stacks by flow block index (and ``"denoiser"``), with their per-sample sequences."""
    from megatron_starflow.parallel.state import latent_grid

    m = cfg.model
    t, h, w = grid or latent_grid(cfg)
    hw, n, L, c = h * w, t * h * w, m.text_length, m.token_channels
    out: dict[int | str, list[Stack]] = {}
    for i in range(m.num_blocks - 1):
        out[i] = [Stack(f"shallow{i}", m.shallow_width, m.shallow_layers, hw, t,
                        m.shallow_width // m.head_dim, m.head_dim, m.mlp_ratio, n, c)]
    out[m.num_blocks - 1] = [Stack("deep", m.deep_width, m.deep_layers, L + n, 1,
                                   m.deep_width // m.head_dim, m.head_dim, m.mlp_ratio, n, c)]
    if m.use_denoiser:
        wd = m.resolved_denoiser_width
        out["denoiser"] = [Stack("denoiser", wd, m.denoiser_layers, L + n, 1, wd // m.head_dim,
                                 m.head_dim, m.mlp_ratio, n, c // 2,
                                 masks=2 if m.denoiser_lookahead == "first_layer" else 1)]
    return out


def activation_bytes(cfg: Config, blocks, micro_batch: int = 1, act: int = 2, tp: int = 1,
                     sp: bool = False, recompute: bool = False, grid=None, peak: bool = True,
                     in_flight: int = 1, denoiser: bool = False) -> float:
    """Activations of ``in_flight`` micro-batches through the flow blocks ``blocks`` (or of the
    denoiser), all saved at once (the forward's saved tensors at the start of the backward). With
    recompute and ``peak``, plus the one layer the backward recomputes at a time (the largest)."""
    stacks = model_stacks(cfg, grid)
    chosen = stacks.get("denoiser", []) if denoiser else [s for i in blocks for s in stacks[i]]
    if not chosen:
        return 0.0
    saved = in_flight * sum(stack_activation_bytes(s, micro_batch, act, tp, sp, recompute, peak=False)
                            for s in chosen)
    if recompute and peak:
        saved += max(layer_activation_bytes(s, micro_batch, act, tp, sp) for s in chosen)
    return saved


def denoiser_activation_bytes(cfg: Config, micro_batch: int = 1, act: int = 2, tp: int = 1,
                              sp: bool = False, recompute: bool = False, grid=None,
                              peak: bool = True) -> float:
    return activation_bytes(cfg, (), micro_batch, act, tp, sp, recompute, grid, peak, denoiser=True)


# ------------------------------------------------------------------------------ parameters

@dataclass
class ParamInventory:
    """Per flow block (denoiser counted with block 0): (TP-sharded numel, replicated numel)."""

    sharded: dict[int, int]
    replicated: dict[int, int]
    total: int


def param_inventory(cfg: Config) -> ParamInventory:
    """Build the model on the meta device (no memory) and sort its parameters by flow block and
    by whether megatron shards them over TP."""
    import torch

    from megatron_starflow.models.starflow import StarFlowV
    from megatron_starflow.parallel.state import ensure_single_process

    ensure_single_process()
    with torch.device("meta"):
        model = StarFlowV(cfg.model)
    sharded = {i: 0 for i in range(cfg.model.num_blocks)}
    replicated = dict(sharded)
    total = 0
    for name, p in model.named_parameters():
        block = int(name.split(".")[1]) if name.startswith("blocks.") else 0
        total += p.numel()
        if getattr(p, "tensor_model_parallel", False):
            sharded[block] += p.numel()
        else:
            replicated[block] += p.numel()
    return ParamInventory(sharded, replicated, total)


def static_bytes_per_param(dp: int, distributed_optimizer: bool, bf16: bool = True) -> dict[str, float]:
    if bf16:
        weights, grads, master, adam = 2.0, 4.0, 4.0, 8.0
    else:
        weights, grads, master, adam = 4.0, 4.0, 0.0, 8.0
    shard = dp if distributed_optimizer else 1
    return {"params": weights + master / shard, "grads": grads, "optimizer": adam / shard}


def checkpoint_bytes_per_rank(params_per_rank: float, dp: int, bf16: bool = True) -> dict[str, float]:
    """Bytes a rank writes into a sharded checkpoint (training/checkpointing.py), holding
    ``params_per_rank`` parameters (its TP shard of its pipeline stage): its rows of the fp32
    master weights and both Adam moments (12 B per parameter over the ``dp`` (x cp) ranks that
    split them), and on average its share of the model weights in their training dtype, which
    are replicated over DP and written once (torch.distributed.checkpoint's deduplication
    spreads them over the replicas)."""
    weights = params_per_rank * (2.0 if bf16 else 4.0) / dp
    optimizer = params_per_rank * 12.0 / dp
    return {"checkpoint_weights": weights, "checkpoint_optimizer": optimizer,
            "checkpoint_total": weights + optimizer}


# ------------------------------------------------------------------------------ layouts

@dataclass
class Layout:
    tp: int
    pp: int
    dp: int
    sp: bool = True
    recompute: bool = False
    distributed_optimizer: bool = True
    micro_batch: int = 1


def estimate(cfg: Config, layout: Layout, inventory: ParamInventory | None = None,
             split=None) -> dict:
    """Per-stage memory (bytes) of ``layout`` and the maximum over stages."""
    from megatron_starflow.parallel.pipeline import split_blocks

    inventory = inventory or param_inventory(cfg)
    bf16 = cfg.train.dtype == "bfloat16"
    act = 2 if bf16 else (8 if cfg.train.dtype == "float64" else 4)
    sp = layout.sp and layout.tp > 1
    per_param = static_bytes_per_param(layout.dp, layout.distributed_optimizer, bf16)
    stages = split_blocks(cfg.model, layout.pp, split)
    rows = []
    for s, blocks in enumerate(stages):
        params = sum(inventory.sharded[i] / layout.tp + inventory.replicated[i] for i in blocks)
        inflight = layout.pp - s
        kw = dict(micro_batch=layout.micro_batch, act=act, tp=layout.tp, sp=sp,
                  recompute=layout.recompute)
        flow = activation_bytes(cfg, blocks, in_flight=inflight, **kw)
        den = denoiser_activation_bytes(cfg, **kw) if s == 0 else 0.0
        row = {"stage": s, "blocks": list(blocks), "params_per_rank": params,
               "in_flight_microbatches": inflight,
               **{k: params * v for k, v in per_param.items()},
               "activations": max(flow, den)}
        row["total"] = row["params"] + row["grads"] + row["optimizer"] + row["activations"]
        row.update(checkpoint_bytes_per_rank(params, layout.dp, bf16))
        rows.append(row)
    worst = max(rows, key=lambda r: r["total"])
    return {"layout": layout.__dict__, "stages": rows, "max_stage": worst["stage"],
            "max_total": worst["total"], "max_row": worst}


def candidate_layouts(cfg: Config, gpus: int, tps=(1, 2, 4, 8), micro_batch: int = 1,
                      distributed_optimizer: bool = True) -> list[Layout]:
    """Every (tp, pp, dp) with tp*pp*dp = gpus that ``validate_parallel`` accepts (SP on)."""
    from megatron_starflow.config import ConfigError
    from megatron_starflow.parallel.state import validate_parallel

    out = []
    for tp in tps:
        for pp in range(1, cfg.model.num_blocks + 1):
            if gpus % (tp * pp):
                continue
            trial = copy.deepcopy(cfg)
            trial.parallel.tp, trial.parallel.pp, trial.parallel.sp = tp, pp, tp > 1
            trial.parallel.dp = -1
            try:
                dp = validate_parallel(trial, gpus)
            except ConfigError:
                continue
            for recompute in (False, True):
                out.append(Layout(tp, pp, dp, tp > 1, recompute, distributed_optimizer, micro_batch))
    return out


def recommend(results: list[dict], budget_bytes: float) -> dict | None:
    """The rule: among layouts under the budget, prefer no recompute (it costs ~1/3 more compute),
    then the smallest model-parallel size tp*pp (the most data parallelism: no pipeline bubble, the
    least TP communication), then fewer pipeline stages."""
    fitting = [r for r in results if r["max_total"] <= budget_bytes]
    if not fitting:
        return None
    return min(fitting, key=lambda r: (r["layout"]["recompute"], r["layout"]["tp"] * r["layout"]["pp"],
                                       r["layout"]["pp"], r["max_total"]))
