"""Export in the authors' layout (apple/ml-starflow): `tools/convert_checkpoint.py export --format
ml-starflow`, megatron_starflow/convert/ml_starflow_export.py.

* ours -> theirs -> ours (the importer): every tensor bit for bit in fp32, with the denoiser head
  scaled by a non-power-of-two factor (w = 0.5 / 0.3) and by -1 (no noise level in the caption),
  and the same config;
* theirs -> ours -> theirs: every tensor they use bit for bit (constants regenerated), and the
  same YAML arguments except what our config cannot hold (guidance ``cfg``, ``grad_clip`` 0);
* an exported float64 model evaluated by an independent forward written here from the files alone
  (their key names, their YAML, METHOD.md section 9 and docs/reference_facts.md sections 1-4):
  z, summed log-det and the denoiser output against ours within 1e-10;
* refusals (one error listing every item with its fix), warnings, --drop-denoiser, the CLI on an
  inference folder (load_system) and its error exit.
"""

import argparse
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-10
NOISE_TEMPLATE = "Noise Level {noise}:\nA video with {fps} fps:\n{caption}\n\n in a 16:9 aspect ratio.\n"
FPS_TEMPLATE = "A video with {fps} fps:\n{caption}\n"
TEXT_MODEL = "google/tiny-t5-for-tests"
C, SHALLOW, DEEP, HEAD, TXT_LEN, TXT_DIM, PT = 48, 48, 72, 24, 4, 8, 4

pytestmark = pytest.mark.usefixtures("one_thread")


def exportable_config(template=NOISE_TEMPLATE, height=48, width=80, **model):
    """A tiny config their format can express: Wan2.2 latents (48 channels), T5 text, 4 blocks,
    head_dim 24 with their RoPE split (time 16 dims), an 8-layer denoiser with their mask."""
    from megatron_starflow.config import from_preset, validate

    cfg = from_preset("tiny")
    values = dict(latent_channels=C, patch_size=1, num_blocks=4, shallow_width=SHALLOW, shallow_layers=1,
                  deep_width=DEEP, deep_layers=2, head_dim=HEAD, rope_time_fraction=16 / HEAD,
                  text_width=TXT_DIM, text_length=TXT_LEN, denoiser_layers=8, denoiser_window=2,
                  denoiser_lookahead="every_layer", pt_seq_len=float(PT), noise_std=0.5, soft_clip=4.0,
                  attn_window=0, recompute=True)
    values.update(model)
    for key, value in values.items():
        setattr(cfg.model, key, value)
    cfg.text.encoder, cfg.text.path, cfg.text.template = "t5", "", template
    cfg.text.caption_dropout = 0.1
    d = cfg.data
    d.codec, d.codec_path, d.s2d_patch, d.later_frames_scale = "wan", "", 1, 0.6
    d.frames, d.fps, d.height, d.width = 9, 16, height, width
    cfg.train.lr, cfg.train.min_lr, cfg.train.grad_clip = 5e-5, 1e-6, 1.0
    validate(cfg)
    return cfg


def randomize_all(model, seed=0):
    """Every parameter random at a scale that keeps activations O(1) (init_std 0.02 would leave
    attention nearly uniform and hide a RoPE or qkv-order mistake)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if name.endswith(("layernorm.weight", "layer_norm_weight")):
                value = 1 + 0.1 * noise
            elif p.dim() == 2:
                value = noise * p.shape[1] ** -0.5 * (0.3 if ".proj_out." in name else 1.0)
            elif name.endswith("sos_embed"):
                value = noise
            else:
                value = 0.1 * noise if not name.endswith("final_norm.weight") else 0.2 * noise
            p.copy_(value.to(p.dtype))


def our_model(cfg, dtype=torch.float64, seed=0):
    from megatron_starflow.models.starflow import StarFlowV

    torch.manual_seed(seed)
    model = StarFlowV(cfg.model).to(dtype).eval()
    randomize_all(model, seed)
    return model


def tensors(model):
    """The model's tensors (megatron's ``_extra_state`` entries are not weights)."""
    return {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}


def same_bits(a, b):
    from megatron_starflow.convert.ml_starflow import same_bits as bits

    return bits(a, b)


# ------------------------------------------------------------------ their files, read independently

# The argparse types of their train.py options that an export writes (docs/reference_facts.md
# section 6; their loader turns each YAML entry into "--key value" and splits at whitespace).
THEIR_TYPES = dict(
    img_size=int, txt_size=int, vid_size=str, fps_cond=int, channel_size=int, patch_size=int,
    channels=int, top_block_channels=int, blocks=int, layers_per_block=int, head_dim=int,
    noise_std=float, lr=float, min_lr=float, nvp=int, rope=int, adaln=int, sos=int, seq_order=str,
    pt_seq_len=int, mix_aspect=int, use_softplus=int, cond_top_only=int, use_final_norm=int,
    learnable_self_denoiser=int, conditional_denoiser=int, denoiser_window=int,
    cond_noise_level=int, temporal_causal=int, shallow_block_local=int, gradient_checkpoint=int,
    vae=str, finetuned_vae=str, text=str, drop_label=float, grad_clip=float, soft_clip=float,
)


def parse_like_theirs(path):
    """Their YAML -> argparse Namespace, the way their utils/common.load_model_config feeds it to
    their parser (one '--key value' per entry, split at whitespace)."""
    parser = argparse.ArgumentParser()
    for key, kind in THEIR_TYPES.items():
        parser.add_argument(f"--{key}", type=kind, nargs="*" if key == "layers_per_block" else None,
                            choices=["R2L", "L2R"] if key == "seq_order" else None)
    with open(path) as f:
        entries = yaml.safe_load(f)["arguments"]
    tokens = " ".join(f"--{k} {v}" for entry in entries for k, v in entry.items()).split()
    return parser.parse_args(tokens)


def their_expected_keys(args, with_denoiser):
    """Their module layout (METHOD.md section 9, reference_facts section 7)."""
    layers = args.layers_per_block
    keys = {"var", "feat_rope.freqs_cos", "feat_rope.freqs_sin"}
    stack = [f"attn_blocks.{{j}}.{m}.{k}" for m in ("attention.norm", "attention.qkv", "attention.proj",
                                                  "mlp.norm", "mlp.main.0", "mlp.main.2")
             for k in ("weight", "bias")]
    for i, n in enumerate(layers):
        p = f"blocks.{i}."
        keys |= {p + k for k in ("sos_embed", "attn_mask", "final_norm.weight", "proj_in.weight",
                                 "proj_in.bias", "proj_out.weight", "proj_out.bias")}
        if i == len(layers) - 1:
            keys |= {p + "proj_txt.weight", p + "proj_txt.bias"}
        keys |= {p + s.format(j=j) for j in range(n) for s in stack}
    if with_denoiser:
        p = "learnable_self_denoiser."
        keys |= {p + k for k in ("proj_in.weight", "proj_in.bias", "proj_txt.weight", "proj_txt.bias",
                                 "final_norm.weight", "proj_out.weight", "proj_out.bias")}
        keys |= {p + s.format(j=j) for j in range(8) for s in stack}
    return keys


class TheirForward:
    """Independent float64 forward of their model from their state dict and parsed YAML."""

    def __init__(self, sd, args):
        self.sd = {k: v.double() for k, v in sd.items()}
        self.layers = list(args.layers_per_block)
        self.widths = [args.channels] * (len(self.layers) - 1) + [args.top_block_channels]
        self.hd, self.pt, self.clip = args.head_dim, args.pt_seq_len, args.soft_clip
        self.window = args.denoiser_window or 10000
        assert args.seq_order == "L2R" and args.temporal_causal == 2 and args.sos == 1

    def positions(self, h, w, frames, text_len):
        """(row, col, time) per sequence slot: text first at (0, 0, l * pt / L); video tokens in
        raster order, rows and columns scaled by pt / sqrt(h w), time = frame (0 per frame)."""
        rows, cols = [], []
        scale = self.pt / math.sqrt(h * w)
        out = [[0.0, 0.0, l * self.pt / text_len] for l in range(text_len)]
        for f in range(max(frames, 1)):
            for r in range(h):
                for c in range(w):
                    out.append([r * scale, c * scale, float(f) if frames else 0.0])
        return torch.tensor(out, dtype=torch.float64)

    def rotate(self, x, pos):
        """Interleaved pairs; [row | col] pairs use 10000^(-2k/m) over their m = hd/2 - 8 dims each,
        the last 8 pairs (16 dims) rotate with time at 10000^(-j/8)."""
        m = self.hd // 2 - 8
        f_side = 10000.0 ** (-torch.arange(0, m, 2, dtype=torch.float64) / m)
        f_time = 10000.0 ** (-torch.arange(0, 8, dtype=torch.float64) / 8)
        ang = torch.cat([pos[:, :1] * f_side, pos[:, 1:2] * f_side, pos[:, 2:] * f_time], -1)
        cos, sin = ang.cos(), ang.sin()
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).flatten(-2)

    def transformer(self, prefix, n_layers, seq, pos, allowed):
        sd, b, s, width = self.sd, seq.shape[0], seq.shape[1], seq.shape[2]
        heads = width // self.hd
        for j in range(n_layers):
            p = f"{prefix}.attn_blocks.{j}."
            a = F.layer_norm(seq, (width,), sd[p + "attention.norm.weight"], sd[p + "attention.norm.bias"], 1e-5)
            qkv = F.linear(a, sd[p + "attention.qkv.weight"], sd[p + "attention.qkv.bias"])
            q, k, v = (t.reshape(b, s, heads, self.hd).transpose(1, 2) for t in qkv.chunk(3, -1))
            q, k = self.rotate(q, pos), self.rotate(k, pos)
            att = (q @ k.transpose(-1, -2)) * self.hd ** -0.5
            att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
            o = (att @ v).transpose(1, 2).reshape(b, s, width)
            seq = seq + F.linear(o, sd[p + "attention.proj.weight"], sd[p + "attention.proj.bias"])
            m = F.layer_norm(seq, (width,), sd[p + "mlp.norm.weight"], sd[p + "mlp.norm.bias"], 1e-5)
            hid = F.gelu(F.linear(m, sd[p + "mlp.main.0.weight"], sd[p + "mlp.main.0.bias"]))
            seq = seq + F.linear(hid, sd[p + "mlp.main.2.weight"], sd[p + "mlp.main.2.bias"])
        return seq

    def final_norm(self, prefix, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.sd[f"{prefix}.final_norm.weight"])

    def block(self, i, x, h, w, frames, text):
        """x [B, N, C] natural order -> z (natural order), log-det per sample."""
        sd, p = self.sd, f"blocks.{i}"
        b, n, c = x.shape
        flip = i % 2 == 0 and i < len(self.layers) - 1
        if flip:
            x = x.reshape(b, -1, h * w, c).flip(2).reshape(b, n, c)
        shifted = torch.cat([sd[f"{p}.sos_embed"].expand(b, 1, c), x[:, :-1]], 1)
        seq = F.linear(shifted, sd[f"{p}.proj_in.weight"], sd[f"{p}.proj_in.bias"])
        text_len = 0
        if text is not None:
            seq = torch.cat([F.linear(text, sd[f"{p}.proj_txt.weight"], sd[f"{p}.proj_txt.bias"]), seq], 1)
            text_len = text.shape[1]
        s = seq.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        seq = self.transformer(p, self.layers[i], seq, self.positions(h, w, frames, text_len), causal)
        out = F.linear(self.final_norm(p, seq)[:, text_len:], sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"])
        out = self.clip * torch.tanh(out / self.clip)
        a, shift = out[..., :c], out[..., c:]
        sigma = F.softplus(a + math.log(math.e - 1))
        z = (x - shift) / sigma
        if flip:
            z = z.reshape(b, -1, h * w, c).flip(2).reshape(b, n, c)
        return z, -sigma.log().sum((1, 2))

    def flow(self, x, text):
        b, t, h, w, c = x.shape
        u, logdet = x, torch.zeros(b, dtype=torch.float64)
        for i in range(len(self.layers) - 1):
            z, ld = self.block(i, u.reshape(b * t, h * w, c), h, w, 0, None)
            u, logdet = z.reshape(b, t, h, w, c), logdet + ld.reshape(b, t).sum(1)
        z, ld = self.block(len(self.layers) - 1, u.reshape(b, t * h * w, c), h, w, t, text)
        return z.reshape(b, t, h, w, c), logdet + ld

    def denoiser(self, x, text):
        """Non-causal; every query sees all text; a video query in frame f sees frames
        f - window + 1 .. f + 1, a text query frames 0 .. 1; same mask in every layer."""
        sd, p = self.sd, "learnable_self_denoiser"
        b, t, h, w, c = x.shape
        L = text.shape[1]
        seq = torch.cat([F.linear(text, sd[f"{p}.proj_txt.weight"], sd[f"{p}.proj_txt.bias"]),
                         F.linear(x.reshape(b, -1, c), sd[f"{p}.proj_in.weight"], sd[f"{p}.proj_in.bias"])], 1)
        frame = [None] * L + [j // (h * w) for j in range(t * h * w)]
        s = len(frame)
        allowed = torch.zeros(s, s, dtype=torch.bool)
        for q in range(s):
            for k in range(s):
                if frame[k] is None:
                    allowed[q, k] = True
                elif frame[q] is None:
                    allowed[q, k] = frame[k] <= 1
                else:
                    allowed[q, k] = frame[q] - self.window + 1 <= frame[k] <= frame[q] + 1
        seq = self.transformer(p, 8, seq, self.positions(h, w, t, L), allowed)
        out = F.linear(self.final_norm(p, seq)[:, L:], sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"])
        return out.reshape(b, t, h, w, c)


def _inputs(t=3, h=2, w=3, batch=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, t, h, w, C, generator=g, dtype=torch.float64)
    text = torch.randn(batch, TXT_LEN, TXT_DIM, generator=g, dtype=torch.float64)
    text[0, -1] = 0  # a padded T5 row, still attended
    return x, text


# ------------------------------------------------------------------ ours -> theirs -> ours

@pytest.mark.parametrize("template,height,width,scale", [
    (NOISE_TEMPLATE, 48, 80, -0.3 / 0.5),  # w = 0.5 / 0.3: head stored in float64
    (FPS_TEMPLATE, 64, 64, -1.0),  # no noise level: w = 1, the head is negated in fp32
])
def test_ours_theirs_ours_bit_for_bit(template, height, width, scale, tmp_path, megatron_ready):
    from megatron_starflow.convert.inference import read_config, read_tensors
    from megatron_starflow.convert.ml_starflow import (denoiser_output_scale, import_ml_starflow,
                                                       read_their_yaml)
    from megatron_starflow.convert.ml_starflow_export import export_state

    cfg = exportable_config(template, height, width)
    model = our_model(cfg, torch.float32)
    ours = tensors(model)
    report = export_state(cfg, ours, str(tmp_path / "theirs"), "fp32", TEXT_MODEL, verify=True)
    assert report["warnings"] == [] and report["verify"]["bitwise"]
    assert denoiser_output_scale(read_their_yaml(str(tmp_path / "theirs" / "config.yaml"))) == pytest.approx(scale)
    sd = torch.load(tmp_path / "theirs" / "model.pth", weights_only=True)
    head_dtype = sd["learnable_self_denoiser.proj_out.weight"].dtype
    assert head_dtype == (torch.float64 if scale != -1.0 else torch.float32)
    assert all(v.dtype == torch.float32 for k, v in sd.items() if "learnable_self_denoiser.proj_out" not in k)

    import_ml_starflow(str(tmp_path / "theirs" / "model.pth"), str(tmp_path / "theirs" / "config.yaml"),
                       str(tmp_path / "back"), dtype="fp32", max_shard_size=None)
    back, _ = read_tensors(str(tmp_path / "back"))
    assert set(back) == set(ours)
    differing = [k for k, v in ours.items() if not same_bits(v, back[k])]
    assert differing == []
    # The YAML round trip gives the same config: the whole model section (denoiser_output_scale
    # back at 1, the factor folded out of the float64 / negated head), text and data fields.
    got = read_config(str(tmp_path / "back"))
    assert got.model == cfg.model
    assert (got.text.encoder, got.text.template, got.text.caption_dropout) == ("t5", template, 0.1)
    d, e = got.data, cfg.data
    assert (d.frames, d.fps, d.height, d.width, d.codec, d.later_frames_scale) == \
        (e.frames, e.fps, e.height, e.width, "wan", 0.6)
    assert (got.train.lr, got.train.min_lr, got.train.grad_clip) == (5e-5, 1e-6, 1.0)


def test_export_layout_and_their_parser(tmp_path, megatron_ready):
    from megatron_starflow.convert.ml_starflow import regroup_qkv
    from megatron_starflow.convert.ml_starflow_export import export_state

    cfg = exportable_config()
    model = our_model(cfg, torch.float32)
    report = export_state(cfg, model.state_dict(), str(tmp_path / "out"), "bf16", TEXT_MODEL)
    assert sorted(os.listdir(tmp_path / "out")) == ["config.yaml", "export_notes.txt", "model.pth"]
    args = parse_like_theirs(tmp_path / "out" / "config.yaml")
    assert vars(args) == dict(
        img_size=64, txt_size=TXT_LEN, vid_size="9:16", fps_cond=1, channel_size=C, patch_size=1,
        channels=SHALLOW, top_block_channels=DEEP, blocks=4, layers_per_block=[1, 1, 1, 2], head_dim=HEAD,
        noise_std=0.5, lr=5e-5, min_lr=1e-6, nvp=1, rope=1, adaln=0, sos=1, seq_order="L2R", pt_seq_len=PT,
        mix_aspect=1, use_softplus=1, cond_top_only=1, use_final_norm=1, learnable_self_denoiser=1,
        conditional_denoiser=1, denoiser_window=2, cond_noise_level=1, temporal_causal=2,
        shallow_block_local=1, gradient_checkpoint=1, vae="Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6",
        finetuned_vae="none", text=TEXT_MODEL, drop_label=0.1, grad_clip=1.0, soft_clip=4.0)
    sd = torch.load(tmp_path / "out" / "model.pth", weights_only=True)
    assert set(sd) == their_expected_keys(args, with_denoiser=True)
    assert report["tensors"] == len(sd)
    # their [q | k | v] rows, bf16 like every learned tensor but the float64 denoiser head
    ours_qkv = model.state_dict()["blocks.3.transformer.block.layers.1.self_attention.linear_qkv.weight"]
    theirs_qkv = sd["blocks.3.attn_blocks.1.attention.qkv.weight"]
    assert theirs_qkv.dtype == torch.bfloat16
    assert torch.equal(regroup_qkv(theirs_qkv, HEAD), ours_qkv.to(torch.bfloat16))
    q_head1 = ours_qkv[3 * HEAD:4 * HEAD]  # megatron group 1 = [q_1 k_1 v_1]
    assert torch.equal(theirs_qkv[HEAD:2 * HEAD], q_head1.to(torch.bfloat16))
    assert sd["learnable_self_denoiser.proj_out.weight"].dtype == torch.float64
    # constants with the shapes their modules register
    n = PT * PT + TXT_LEN
    for i in range(4):
        assert torch.equal(sd[f"blocks.{i}.attn_mask"], torch.ones(n, n).tril())
    assert torch.equal(sd["var"], torch.ones(PT * PT, C))
    for key in ("feat_rope.freqs_cos", "feat_rope.freqs_sin"):
        assert torch.equal(sd[key], torch.zeros(TXT_LEN + PT * PT, HEAD))
    notes = (tmp_path / "out" / "export_notes.txt").read_text()
    assert "--finetuned_vae none" in notes and "--aspect_ratio 16:9" in notes


# ------------------------------------------------------------------ theirs -> ours -> theirs

@pytest.fixture(scope="module")
def theirs(tmp_path_factory):
    """The importer test's synthetic state dict of theirs at C = 48 channels (their Wan2.2) and
    their 8 denoiser layers, in fp32 like a published checkpoint, and its YAML."""
    import test_import_ml_starflow as their_test

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(their_test, "C", C)
        mp.setattr(their_test, "DEN_LAYERS", 8)
        sd = {k: v.float() for k, v in their_test._their_state_dict(seed=3).items()}
    entries = []
    for entry in their_test.THEIR_YAML["arguments"]:
        key, value = next(iter(entry.items()))
        entries.append({key: {"channel_size": C, "text": TEXT_MODEL}.get(key, value)})
    assert their_test.SHALLOW == SHALLOW and their_test.DEEP == DEEP and their_test.HEAD == HEAD
    return sd, entries


@pytest.mark.parametrize("cond_noise_level", [1, 0])
def test_theirs_ours_theirs_bit_for_bit(theirs, cond_noise_level, tmp_path, megatron_ready):
    from megatron_starflow.convert.inference import load_inference_model
    from megatron_starflow.convert.ml_starflow import import_ml_starflow, read_their_yaml
    from megatron_starflow.convert.ml_starflow_export import export_state

    sd, entries = theirs
    entries = [{k: (cond_noise_level if k == "cond_noise_level" else v) for k, v in e.items()} for e in entries]
    torch.save(sd, tmp_path / "their.pth")
    with open(tmp_path / "their.yaml", "w") as f:
        yaml.safe_dump({"arguments": entries}, f)
    import_ml_starflow(str(tmp_path / "their.pth"), str(tmp_path / "their.yaml"), str(tmp_path / "ours"),
                       dtype="fp32", max_shard_size=None)
    cfg, model, _ = load_inference_model(str(tmp_path / "ours"), torch.float32)
    # w = 0.5/0.3 cannot be folded exactly: their head stays, the factor is a config value;
    # w = 1 folds exactly (a sign flip).
    assert cfg.model.denoiser_output_scale == (-0.3 / 0.5 if cond_noise_level else 1.0)
    report = export_state(cfg, model.state_dict(), str(tmp_path / "again"), "fp32", TEXT_MODEL)
    assert report["warnings"] == []
    again = torch.load(tmp_path / "again" / "model.pth", weights_only=True)
    assert set(again) == set(sd)
    constants = {k for k in sd if k.endswith("attn_mask") or k in ("var", "feat_rope.freqs_cos", "feat_rope.freqs_sin")}
    differing = [k for k in sd if k not in constants and not same_bits(sd[k], again[k])]
    assert differing == []
    assert all(torch.equal(sd[k], again[k]) for k in constants)  # regenerated, same values
    # YAML: the same arguments except guidance (cfg: a sampling option, not in our config) and
    # grad_clip (theirs 0 = off; ours always clips, the 7B recipe's 1.0)
    before = read_their_yaml(str(tmp_path / "their.yaml"))
    after = read_their_yaml(str(tmp_path / "again" / "config.yaml"))
    changed = {k for k in set(before) | set(after) if k != "_set_keys" and before.get(k) != after.get(k)}
    assert changed == {"cfg", "grad_clip"}
    assert (before["cfg"], after["cfg"], before["grad_clip"], after["grad_clip"]) == (2.5, 0.0, 0.0, 1.0)


# ------------------------------------------------------------------ independent float64 forward

def test_exported_model_matches_independent_float64_forward(tmp_path, megatron_ready):
    from megatron_starflow.convert.ml_starflow_export import export_state

    cfg = exportable_config()
    model = our_model(cfg, torch.float64, seed=7)
    export_state(cfg, model.state_dict(), str(tmp_path / "out"), "fp64", TEXT_MODEL)
    args = parse_like_theirs(tmp_path / "out" / "config.yaml")
    ref = TheirForward(torch.load(tmp_path / "out" / "model.pth", weights_only=True), args)
    x, text = _inputs()
    with torch.no_grad():
        flow = model(x, text)
        ours_s = model.denoise_score(x, text)
    z, logdet = ref.flow(x, text)
    dz = (flow.z - z).abs().max().item()
    dld = (torch.stack(flow.logdets).sum(0) - logdet).abs().max().item()
    assert dz < TOL and dld < TOL, (dz, dld)
    assert (z - x).abs().max() > 0.5 and logdet.abs().min() > 0.5  # far from the identity
    # their denoiser D regresses w * sigma * grad NLL (w = noise_std / 0.3 with the noise level in
    # the caption); ours s = -D / w; both denoise to the same latent
    their_d = ref.denoiser(x, text)
    w = args.noise_std / 0.3
    dd = (ours_s - (-their_d / w)).abs().max().item()
    assert dd < TOL and their_d.abs().max() > 0.1, dd
    assert ((x + cfg.model.noise_std * ours_s) - (x - 0.3 * their_d)).abs().max().item() < TOL


# ------------------------------------------------------------------ refusals and warnings

def test_refusals_list_every_item_with_its_fix(megatron_ready):
    from megatron_starflow.config import from_preset
    from megatron_starflow.convert.ml_starflow_export import NotExpressible, their_arguments

    cfg = from_preset("tiny")  # sentencepiece, s2d, head_dim 32 with a time share of 1/4, 3 blocks
    cfg.model.mlp_ratio, cfg.model.rope_base, cfg.model.pt_seq_len = 2, 500.0, 4.5
    with pytest.raises(NotExpressible) as info:
        their_arguments(cfg)
    items = [what for what, _, _ in info.value.items]
    assert items == ["text.encoder=sentencepiece", "data.codec=s2d",
                     "model.rope_time_fraction=0.25 (row/col/time dims (12, 12, 8))", "model.rope_base=500",
                     "model.mlp_ratio=2", "model.num_blocks=3", "model.pt_seq_len=4.5",
                     "model.denoiser_layers=2"]
    text = str(info.value)
    assert text.count("Fix:") == len(items)
    assert "model.rope_time_fraction=0.5 (16 / head_dim)" in text and "--drop-denoiser" in text
    # a T5 path that names no known T5 needs --text-model; a known one must match the width
    cfg = exportable_config()
    cfg.text.path = "/models/my-encoder"
    with pytest.raises(NotExpressible, match="pass --text-model google/<name>"):
        their_arguments(cfg)
    cfg.text.path = "/models/flan-t5-xl"
    with pytest.raises(NotExpressible, match="it is 2048 wide but model.text_width=8"):
        their_arguments(cfg)
    with pytest.raises(NotExpressible, match="starting with 'google'"):
        their_arguments(cfg, text_model="my/t5")
    cfg = exportable_config(latent_channels=16)
    with pytest.raises(NotExpressible, match="48-channel Wan2.2"):
        their_arguments(cfg, text_model=TEXT_MODEL)


def test_warnings_and_drop_denoiser(tmp_path, megatron_ready):
    from megatron_starflow.convert.ml_starflow_export import export_state, their_arguments

    cfg = exportable_config("{caption} ({fps} fps)", 48, 80, denoiser_lookahead="first_layer", attn_window=3)
    _, warnings, _ = their_arguments(cfg, TEXT_MODEL)
    assert [w.split(":")[0].split("=")[0] for w in warnings] == [
        "model.denoiser_lookahead", "model.attn_window", "text.template", "frame size 48x80"]
    model = our_model(cfg, torch.float32)
    report = export_state(cfg, model.state_dict(), str(tmp_path / "out"), "fp32", TEXT_MODEL, drop_denoiser=True)
    assert not any("denoiser_lookahead" in w for w in report["warnings"])
    args = parse_like_theirs(tmp_path / "out" / "config.yaml")
    assert (args.learnable_self_denoiser, args.conditional_denoiser, args.denoiser_window) == (0, 0, None)
    assert (args.fps_cond, args.cond_noise_level, args.mix_aspect, args.img_size) == (1, 0, 0, 64)
    sd = torch.load(tmp_path / "out" / "model.pth", weights_only=True)
    assert set(sd) == their_expected_keys(args, with_denoiser=False)
    assert "frame size 48x80" in (tmp_path / "out" / "export_notes.txt").read_text()


# ------------------------------------------------------------------ the CLI (load_system)

def test_cli_export_from_inference_folder(tmp_path, megatron_ready):
    """`convert_checkpoint.py export --format ml-starflow` on a folder load_system reads (tiny T5
    and a 48-channel Wan VAE built here), then the importer gives the weights back bit for bit."""
    from diffusers import AutoencoderKLWan
    from helpers_text import build_tiny_t5

    from megatron_starflow.convert.inference import read_tensors, save_inference_folder
    from megatron_starflow.convert.ml_starflow import import_ml_starflow

    from helpers_scripts import load_script

    main = load_script("tools/convert_checkpoint.py").main

    t5 = build_tiny_t5(tmp_path / "t5", d_model=TXT_DIM)
    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=4, z_dim=C, dim_mult=[1, 1, 1], num_res_blocks=1, attn_scales=[],
                     temperal_downsample=[True, True], scale_factor_temporal=4, scale_factor_spatial=4,
                     latents_mean=[0.0] * C, latents_std=[1.0] * C).save_pretrained(str(tmp_path / "vae"))
    cfg = exportable_config()
    cfg.text.path, cfg.data.codec_path = str(t5), str(tmp_path / "vae")
    model = our_model(cfg, torch.float32)
    save_inference_folder(str(tmp_path / "ours"), cfg, model.state_dict(), "fp32")
    out = tmp_path / "theirs"
    rc = main(["export", "--format", "ml-starflow", "--checkpoint", str(tmp_path / "ours"),
               "--out", str(out), "--text-model", TEXT_MODEL, "--verify"])
    assert rc == 0 and sorted(os.listdir(out)) == ["config.yaml", "export_notes.txt", "model.pth"]
    import_ml_starflow(str(out / "model.pth"), str(out / "config.yaml"), str(tmp_path / "back"),
                       dtype="fp32", max_shard_size=None)
    back, _ = read_tensors(str(tmp_path / "back"))
    ours = tensors(model)
    assert set(back) == set(ours) and all(same_bits(v, back[k]) for k, v in ours.items())

    # a model their format cannot express: exit 2, one error listing the items, nothing written
    bad = exportable_config(num_blocks=3, denoiser_layers=2)
    save_inference_folder(str(tmp_path / "bad"), bad, our_model(bad, torch.float32).state_dict(), "fp32")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "export",
                           "--format", "ml-starflow", "--checkpoint", str(tmp_path / "bad"),
                           "--out", str(tmp_path / "bad_out")], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "model.num_blocks=3" in proc.stderr and "model.denoiser_layers=2" in proc.stderr
    assert not (tmp_path / "bad_out").exists()
