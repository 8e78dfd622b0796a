"""Model FLOPs of one training step, from the config and the batch: matmuls only, counted exactly.

What is counted (2 FLOPs per multiply-add), per sample, for every stack and projection:

* each transformer layer of width W over a sequence of S slots with P attended (query, key) pairs:
  qkv 2*S*W*3W, attention scores 2*P*W and values 2*P*W (all heads together: heads*head_dim = W),
  output projection 2*S*W*W, MLP 2*S*W*(r*W) twice (r = ``model.mlp_ratio``);
* P is the number of allowed pairs of the actual mask, counted in closed form from the layouts:
  shallow blocks are causal within each frame (S = H*W per frame, T frames per sample, P =
  S(S+1)/2); the deep block is causal over text + T*H*W slots, restricted to the last
  ``model.attn_window`` frames when set (text keys stay visible); the denoiser sees all text and
  frames f-window+1 .. f+1 in its first layer and .. f in the others (``masks.lookahead``,
  ``model.denoiser_lookahead=first_layer``; every layer with ``every_layer``). ``attention="dense"`` counts P = S*S instead,
  which is what the kernels execute (SDPA with a boolean mask computes every pair) and what torch's
  FlopCounterMode reports;
* flow-block projections (proj_in on every video slot, proj_txt on the text prefix of the deep
  block, proj_out 2C on video slots), the denoiser's projections;
* the trainable sentencepiece text encoder (a dense bidirectional stack over model.text_length);
  a frozen T5 encoder is left out (forward only, < 0.5 % of the 7 B step).

Not counted: norms, RoPE, softmax, GELU, the flow's elementwise head (O(S*W) each, < 1 %).

A training step is forward + backward = 3 x forward (backward = input grads + weight grads, each
one forward's worth; checked against FlopCounterMode in tests/test_flops_memory.py). This is the
*model* FLOPs convention behind MFU (PaLM, Megatron-LM): activation recomputation is not useful work
and is excluded from ``model_flops_per_step``; ``hardware_flops_per_step`` adds the recomputed
forward of every stack (full, per-layer recomputation) when ``model.recompute`` is on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_starflow.config import Config


# ------------------------------------------------------------------------------ attended pairs

def causal_pairs(text_len: int, frames: int, per_frame: int, window: int = 0) -> int:
    """Allowed (query, key) pairs of ``layout.causal_mask()``: text slots causal among themselves,
    video slot j sees all text and every earlier video slot within the window of frames."""
    total = text_len * (text_len + 1) // 2
    within = per_frame * (per_frame + 1) // 2  # pairs inside one frame (causal)
    for f in range(frames):
        first = max(0, f - window + 1) if window > 0 else 0
        total += per_frame * text_len + per_frame * per_frame * (f - first) + within
    return total


def lookahead_pairs(text_len: int, frames: int, per_frame: int, window: int, ahead: int = 1) -> int:
    """Allowed pairs of ``layout.lookahead_mask(ahead)``: every query sees all text keys and the
    video frames f-window+1 .. f+ahead (text queries are labelled frame 0)."""
    def visible(f: int) -> int:
        lo, hi = max(0, f - window + 1), min(frames - 1, f + ahead)
        return text_len + per_frame * max(0, hi - lo + 1)

    return text_len * visible(0) + sum(per_frame * visible(f) for f in range(frames))


# ------------------------------------------------------------------------------ per stack

@dataclass
class StackFlops:
    """Forward FLOPs of one transformer stack per sample."""

    name: str
    width: int
    layers: int
    seq_len: int  # S of one sequence
    sequences: int  # sequences per sample (frames for shallow blocks)
    pairs: int  # attended pairs per sequence
    mlp_ratio: int

    @property
    def linear(self) -> int:
        per_layer = 2 * self.seq_len * self.width * self.width * (4 + 2 * self.mlp_ratio)
        return self.sequences * self.layers * per_layer

    @property
    def attention(self) -> int:
        return self.sequences * self.layers * 4 * self.pairs * self.width

    @property
    def total(self) -> int:
        return self.linear + self.attention


@dataclass
class ModelFlops:
    """Forward FLOPs per sample by part, and the step totals for a batch."""

    stacks: list[StackFlops]
    projections: dict[str, int]
    batch: int
    recompute: bool
    grid: tuple[int, int, int]
    notes: list[str] = field(default_factory=list)

    @property
    def stack_forward(self) -> int:
        return sum(s.total for s in self.stacks)

    @property
    def forward_per_sample(self) -> int:
        return self.stack_forward + sum(self.projections.values())

    @property
    def forward(self) -> int:
        return self.batch * self.forward_per_sample

    @property
    def model_flops_per_step(self) -> int:
        return 3 * self.forward

    @property
    def hardware_flops_per_step(self) -> int:
        recomputed = self.batch * self.stack_forward if self.recompute else 0
        return self.model_flops_per_step + recomputed

    def breakdown(self) -> dict:
        parts = {s.name: self.batch * s.total for s in self.stacks}
        parts.update({k: self.batch * v for k, v in self.projections.items()})
        return parts

    def summary(self) -> dict:
        return {"model_flops_per_step": self.model_flops_per_step,
                "hardware_flops_per_step": self.hardware_flops_per_step,
                "forward_flops": self.forward, "batch": self.batch, "grid": list(self.grid),
                "attention_share": sum(self.batch * s.attention for s in self.stacks) / max(1, self.forward)}


def model_flops(cfg: Config, batch: int | None = None, grid: tuple[int, int, int] | None = None,
                attention: str = "masked", text_encoder: bool = True,
                recompute: bool | None = None) -> ModelFlops:
    """FLOPs of one step of ``cfg`` on ``batch`` samples (default ``data.batch_size``) of the token
    grid ``(T, H, W)`` (default: what the codec makes of data.frames/height/width)."""
    if attention not in ("masked", "dense"):
        raise ValueError(f"attention={attention!r}; valid: masked, dense")
    from megatron_starflow.parallel.state import latent_grid

    m = cfg.model
    t, h, w = grid or latent_grid(cfg)
    batch = cfg.data.batch_size if batch is None else batch
    c, L, r = m.token_channels, m.text_length, m.mlp_ratio
    hw, n = h * w, t * h * w
    dense = attention == "dense"
    stacks, proj = [], {}

    def pairs(seq: int, exact: int) -> int:
        return seq * seq if dense else exact

    if m.num_blocks > 1:
        stacks.append(StackFlops("shallow", m.shallow_width, m.shallow_layers * (m.num_blocks - 1), hw, t,
                                 pairs(hw, causal_pairs(0, 1, hw)), r))
        proj["shallow_proj"] = (m.num_blocks - 1) * (2 * n * c * m.shallow_width
                                                     + 2 * n * m.shallow_width * 2 * c)
    s_deep = L + n
    stacks.append(StackFlops("deep", m.deep_width, m.deep_layers, s_deep, 1,
                             pairs(s_deep, causal_pairs(L, t, hw, m.attn_window)), r))
    proj["deep_proj"] = 2 * L * m.text_width * m.deep_width + 2 * n * c * m.deep_width \
        + 2 * n * m.deep_width * 2 * c
    if m.use_denoiser:
        wd = m.resolved_denoiser_width
        # first_layer (default): layer 1 looks one frame ahead, later layers are frame-causal
        # (ahead=0); every_layer: the one-frame look-ahead in every layer.
        first_only = getattr(m, "denoiser_lookahead", "every_layer") == "first_layer"
        ahead_layers = 1 if first_only else m.denoiser_layers
        stacks.append(StackFlops("denoiser", wd, ahead_layers, s_deep, 1,
                                 pairs(s_deep, lookahead_pairs(L, t, hw, m.denoiser_window, 1)), r))
        if m.denoiser_layers > ahead_layers:
            stacks.append(StackFlops("denoiser_causal_layers", wd, m.denoiser_layers - ahead_layers,
                                     s_deep, 1, pairs(s_deep, lookahead_pairs(L, t, hw, m.denoiser_window, 0)), r))
        proj["denoiser_proj"] = 2 * L * m.text_width * wd + 2 * n * c * wd + 2 * n * wd * c
    notes = []
    if text_encoder and cfg.text.encoder == "sentencepiece":
        # nn.TransformerEncoder, dense bidirectional attention over the padded text, mlp ratio 4.
        stacks.append(StackFlops("text_encoder", cfg.text.width, cfg.text.layers, L, 1, L * L, 4))
    elif cfg.text.encoder == "t5":
        notes.append("frozen T5 text encoder not counted (forward only, < 0.5 % of a 7B step)")
    return ModelFlops(stacks, proj, batch, m.recompute if recompute is None else recompute,
                      (t, h, w), notes)


def step_metrics(flops: ModelFlops, seconds: float, peak_tflops: float = 0.0,
                 world_size: int = 1) -> dict:
    """``model_flops_per_step``, ``tflops_per_s`` (achieved model TFLOP/s per device) and, when a
    peak per device is given, ``mfu`` (model FLOPs utilisation) and ``hfu`` (with recompute)."""
    out = {"model_flops_per_step": flops.model_flops_per_step}
    if seconds <= 0:
        return out
    per_device = flops.model_flops_per_step / seconds / world_size / 1e12
    out["tflops_per_s"] = per_device
    if peak_tflops > 0:
        out["mfu"] = per_device / peak_tflops
        out["hfu"] = flops.hardware_flops_per_step / seconds / world_size / 1e12 / peak_tflops
    return out
