"""Import of the authors' checkpoint layout (apple/ml-starflow), checked against an independent
float64 forward written here from METHOD.md section 9 / docs/reference_facts.md (their layer:
pre-LN attention with a [q | k | v] split, interleaved RoPE with their dim split [head_dim/2 - 8, 8]
pairs and coordinates, plain causal mask over [text; video], proj_txt prepended, sos in input space
before proj_in, final RMSNorm with (1 + w), proj_out, soft clip on both halves, a = first half,
sigma = softplus(a + log(e - 1)), z = (x - b) / sigma, blocks 0, 2 flip inside each frame, shallow
blocks per frame with time coordinate 0; denoiser: non-causal, one frame of look-ahead, output
rescaled by -1/w). Random weights at tiny sizes with their key names and shapes."""

import math

import pytest
import torch
import torch.nn.functional as F
import yaml

TOL = 1e-10  # float64: z, summed log-det and denoiser output vs the independent forward

# Their tiny model: 4 blocks (3 shallow + deep; an even count keeps their deep block un-flipped),
# widths 48 / 72 with head_dim 24 (2 / 3 heads; their RoPE needs head_dim >= 20), deep 2 layers,
# denoiser 1 layer, text 4 x 8.
C, SHALLOW, DEEP, HEAD, TXT_LEN, TXT_DIM, PT = 3, 48, 72, 24, 4, 8, 4
LAYERS = [1, 1, 1, 2]
DEN_LAYERS, DEN_WINDOW = 1, 2
NOISE = 0.5
THEIR_YAML = {"arguments": [
    {"img_size": 64}, {"txt_size": TXT_LEN}, {"vid_size": "9:16"}, {"fps_cond": 1},
    {"channel_size": C}, {"patch_size": 1}, {"channels": SHALLOW}, {"top_block_channels": DEEP},
    {"blocks": 4}, {"layers_per_block": " ".join(map(str, LAYERS))}, {"head_dim": HEAD},
    {"noise_std": NOISE}, {"lr": "5e-5"}, {"min_lr": "1e-6"}, {"nvp": 1}, {"rope": 1}, {"adaln": 0},
    {"sos": 1}, {"seq_order": "L2R"}, {"pt_seq_len": PT}, {"mix_aspect": 1}, {"use_softplus": 1},
    {"cond_top_only": 1}, {"use_final_norm": 1}, {"learnable_self_denoiser": 1},
    {"conditional_denoiser": 1}, {"denoiser_window": DEN_WINDOW}, {"cond_noise_level": 1},
    {"temporal_causal": 2}, {"shallow_block_local": 1}, {"gradient_checkpoint": 1},
    {"vae": "Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6"}, {"finetuned_vae": "none"},
    {"text": "tiny-t5-for-tests"}, {"cfg": 2.5}, {"drop_label": 0.1}, {"soft_clip": 4},
]}


def _their_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return torch.randn(shape, generator=g, dtype=torch.float64) * std

    sd = {}

    def stack(prefix, width, layers):
        for j in range(layers):
            p = f"{prefix}.attn_blocks.{j}."
            for norm in ("attention.norm", "mlp.norm"):
                sd[p + norm + ".weight"] = 1 + rnd(width, std=0.1)
                sd[p + norm + ".bias"] = rnd(width, std=0.1)
            sd[p + "attention.qkv.weight"] = rnd(3 * width, width, std=width ** -0.5)
            sd[p + "attention.qkv.bias"] = rnd(3 * width, std=0.1)
            sd[p + "attention.proj.weight"] = rnd(width, width, std=width ** -0.5)
            sd[p + "attention.proj.bias"] = rnd(width, std=0.1)
            sd[p + "mlp.main.0.weight"] = rnd(4 * width, width, std=width ** -0.5)
            sd[p + "mlp.main.0.bias"] = rnd(4 * width, std=0.1)
            sd[p + "mlp.main.2.weight"] = rnd(width, 4 * width, std=(4 * width) ** -0.5)
            sd[p + "mlp.main.2.bias"] = rnd(width, std=0.1)

    for i, layers in enumerate(LAYERS):
        width = DEEP if i == len(LAYERS) - 1 else SHALLOW
        p = f"blocks.{i}."
        sd[p + "proj_in.weight"], sd[p + "proj_in.bias"] = rnd(width, C), rnd(width, std=0.1)
        sd[p + "proj_out.weight"] = rnd(2 * C, width, std=0.3 * width ** -0.5)
        sd[p + "proj_out.bias"] = rnd(2 * C, std=0.1)
        sd[p + "sos_embed"] = rnd(1, 1, C)
        if i == len(LAYERS) - 1:
            sd[p + "proj_txt.weight"] = rnd(width, TXT_DIM, std=TXT_DIM ** -0.5)
            sd[p + "proj_txt.bias"] = rnd(width, std=0.1)
        stack(f"blocks.{i}", width, layers)
        sd[p + "final_norm.weight"] = rnd(width, std=0.2)
        sd[p + "attn_mask"] = torch.tril(torch.ones(PT ** 2 + TXT_LEN, PT ** 2 + TXT_LEN))
    p = "learnable_self_denoiser."
    sd[p + "proj_in.weight"], sd[p + "proj_in.bias"] = rnd(SHALLOW, C), rnd(SHALLOW, std=0.1)
    sd[p + "proj_txt.weight"], sd[p + "proj_txt.bias"] = rnd(SHALLOW, TXT_DIM, std=TXT_DIM ** -0.5), rnd(SHALLOW, std=0.1)
    stack("learnable_self_denoiser", SHALLOW, DEN_LAYERS)
    sd[p + "final_norm.weight"] = rnd(SHALLOW, std=0.2)
    sd[p + "proj_out.weight"] = rnd(C, SHALLOW, std=SHALLOW ** -0.5)
    sd[p + "proj_out.bias"] = rnd(C, std=0.1)
    sd["var"] = torch.ones(PT ** 2, C)
    sd["feat_rope.freqs_cos"] = torch.zeros(TXT_LEN + PT ** 2, HEAD)
    sd["feat_rope.freqs_sin"] = torch.zeros(TXT_LEN + PT ** 2, HEAD)
    return sd


# ------------------------------------------------------------------ independent reference forward

def ref_positions(h, w, frames, txt):
    """[S, 3] (row, col, time): rows/cols scaled by PT / sqrt(h w); frames 0 = one frame at time 0;
    text l at (0, 0, l * PT / txt) in front."""
    mean = math.sqrt(h * w)
    px = torch.arange(h, dtype=torch.float64) / mean * PT
    py = torch.arange(w, dtype=torch.float64) / mean * PT
    px, py = (t.reshape(-1) for t in torch.meshgrid(px, py, indexing="ij"))
    n = max(frames, 1)
    pos = torch.stack([px.repeat(n), py.repeat(n),
                       torch.arange(n, dtype=torch.float64).repeat_interleave(h * w)
                       if frames else torch.zeros(h * w, dtype=torch.float64)], -1)
    if txt:
        pt = torch.arange(txt, dtype=torch.float64) / txt * PT
        pos = torch.cat([torch.stack([torch.zeros(txt), torch.zeros(txt), pt], -1).double(), pos])
    return pos


def ref_angles(pos):
    half = HEAD // 2
    rc = half - 8
    f_rc = 1.0 / 10000 ** (torch.arange(0, rc, 2, dtype=torch.float64) / rc)
    f_t = 1.0 / 10000 ** (torch.arange(0, 8, dtype=torch.float64) / 8)
    freqs = torch.cat([pos[:, :1] * f_rc, pos[:, 1:2] * f_rc, pos[:, 2:] * f_t], -1)
    return freqs.repeat_interleave(2, -1)  # adjacent pairs share an angle


def ref_rope(x, ang):
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rot = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(x.shape)
    return x * ang.cos() + rot * ang.sin()


def ref_layers(sd, prefix, layers, seq, ang, allowed, width):
    b, s, _ = seq.shape
    heads = width // HEAD
    for j in range(layers):
        p = f"{prefix}.attn_blocks.{j}."
        a = F.layer_norm(seq, (width,), sd[p + "attention.norm.weight"], sd[p + "attention.norm.bias"], 1e-5)
        qkv = a @ sd[p + "attention.qkv.weight"].T + sd[p + "attention.qkv.bias"]
        q, k, v = (t.reshape(b, s, heads, HEAD).transpose(1, 2) for t in qkv.split(width, -1))
        q, k = ref_rope(q, ang), ref_rope(k, ang)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(HEAD)
        scores = scores.masked_fill(~allowed, float("-inf"))
        o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, width)
        seq = seq + o @ sd[p + "attention.proj.weight"].T + sd[p + "attention.proj.bias"]
        m = F.layer_norm(seq, (width,), sd[p + "mlp.norm.weight"], sd[p + "mlp.norm.bias"], 1e-5)
        hdn = F.gelu(m @ sd[p + "mlp.main.0.weight"].T + sd[p + "mlp.main.0.bias"])  # exact erf
        seq = seq + hdn @ sd[p + "mlp.main.2.weight"].T + sd[p + "mlp.main.2.bias"]
    return seq


def ref_rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + w)


def ref_block(sd, i, x, h, w, frames, text, flip):
    """x [B, N, C] in natural order -> z [B, N, C] (natural order), log-det summed per sample."""
    b, n, c = x.shape
    width = DEEP if i == len(LAYERS) - 1 else SHALLOW
    if flip:
        x = x.reshape(b, -1, h * w, c).flip(2).reshape(b, n, c)
    x_in = x
    inp = torch.cat([sd[f"blocks.{i}.sos_embed"].expand(b, 1, c), x[:, :-1]], 1)
    seq = inp @ sd[f"blocks.{i}.proj_in.weight"].T + sd[f"blocks.{i}.proj_in.bias"]
    L = 0
    if text is not None:
        y = text @ sd[f"blocks.{i}.proj_txt.weight"].T + sd[f"blocks.{i}.proj_txt.bias"]
        seq, L = torch.cat([y, seq], 1), text.shape[1]
    s = seq.shape[1]
    allowed = torch.tril(torch.ones(s, s, dtype=torch.bool))
    ang = ref_angles(ref_positions(h, w, frames, L))
    seq = ref_layers(sd, f"blocks.{i}", LAYERS[i], seq, ang, allowed, width)
    seq = ref_rms(seq, sd[f"blocks.{i}.final_norm.weight"])
    out = seq[:, L:] @ sd[f"blocks.{i}.proj_out.weight"].T + sd[f"blocks.{i}.proj_out.bias"]
    out = 4 * torch.tanh(out / 4)
    a, bb = out.chunk(2, -1)
    sigma = F.softplus(a + math.log(math.e - 1))
    z = (x_in - bb) / sigma
    if flip:
        z = z.reshape(b, -1, h * w, c).flip(2).reshape(b, n, c)
    return z, -torch.log(sigma).sum((1, 2))


def ref_model(sd, x, text):
    b, t, h, w, c = x.shape
    u, total = x, torch.zeros(b, dtype=torch.float64)
    for i in range(len(LAYERS) - 1):  # shallow: every frame its own sequence, no text
        z, ld = ref_block(sd, i, u.reshape(b * t, h * w, c), h, w, 0, None, flip=i % 2 == 0)
        u, total = z.reshape(b, t, h, w, c), total + ld.reshape(b, t).sum(1)
    z, ld = ref_block(sd, len(LAYERS) - 1, u.reshape(b, t * h * w, c), h, w, t, text, flip=False)
    return z.reshape(b, t, h, w, c), total + ld


def ref_denoiser(sd, x, text):
    """Their NonCausalBlock: mask (k < L) | frame(k) in [frame(q) + A - 1 - G, relu-frame(q) + A - 1]."""
    b, t, h, w, c = x.shape
    p = "learnable_self_denoiser."
    seq = torch.cat([text @ sd[p + "proj_txt.weight"].T + sd[p + "proj_txt.bias"],
                     x.reshape(b, -1, c) @ sd[p + "proj_in.weight"].T + sd[p + "proj_in.bias"]], 1)
    L, B, A, G = text.shape[1], h * w, 2, DEN_WINDOW
    q = torch.arange(seq.shape[1])[:, None]
    k = torch.arange(seq.shape[1])[None, :]
    allowed = (k < L) | ((torch.div(k - L, B, rounding_mode="floor") >= torch.div(q - L, B, rounding_mode="floor") + A - 1 - G)
                         & (torch.div(k - L, B, rounding_mode="floor") <= torch.div(torch.relu(q - L), B, rounding_mode="floor") + A - 1))
    ang = ref_angles(ref_positions(h, w, t, L))
    seq = ref_layers(sd, "learnable_self_denoiser", DEN_LAYERS, seq, ang, allowed, SHALLOW)
    seq = ref_rms(seq, sd[p + "final_norm.weight"])
    out = seq[:, L:] @ sd[p + "proj_out.weight"].T + sd[p + "proj_out.bias"]
    return out.reshape(b, t, h, w, c)


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def their_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ml_starflow")
    sd = _their_state_dict()
    torch.save(sd, root / "their.pth")
    with open(root / "their.yaml", "w") as f:
        yaml.safe_dump(THEIR_YAML, f)
    return root, sd


@pytest.fixture(scope="module")
def imported(their_files, megatron_ready):
    from megatron_starflow.convert.inference import load_inference_model
    from megatron_starflow.convert.ml_starflow import import_ml_starflow

    root, sd = their_files
    report = import_ml_starflow(str(root / "their.pth"), str(root / "their.yaml"), str(root / "ours"),
                                dtype="fp64", max_shard_size=None)
    cfg, model, _ = load_inference_model(str(root / "ours"), torch.float64)
    return report, cfg, model, sd


def _inputs(t=3, h=2, w=3, batch=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, t, h, w, C, generator=g, dtype=torch.float64)
    text = torch.randn(batch, TXT_LEN, TXT_DIM, generator=g, dtype=torch.float64)
    text[0, -1] = 0  # a padded (masked-to-zero) T5 row, still attended
    return x, text


# ------------------------------------------------------------------ tests

def test_imported_config(imported):
    report, cfg, model, _ = imported
    m = cfg.model
    assert (m.num_blocks, m.shallow_width, m.deep_width, m.shallow_layers, m.deep_layers) == (4, 48, 72, 1, 2)
    assert (m.head_dim, m.text_width, m.text_length, m.denoiser_layers, m.denoiser_window) == (24, 8, 4, 1, 2)
    assert m.rope_time_fraction == pytest.approx(16 / 24) and m.pt_seq_len == PT and m.soft_clip == 4
    assert m.noise_std == NOISE and m.reverse_even_blocks and m.attn_window == 0
    assert cfg.text.encoder == "t5"
    assert cfg.text.template == "Noise Level {noise}:\nA video with {fps} fps:\n{caption}\n\n in a 16:9 aspect ratio.\n"
    assert (cfg.data.frames, cfg.data.fps, cfg.data.later_frames_scale) == (9, 16, 0.6)
    assert (cfg.data.height, cfg.data.width) == (48, 80)  # 64^2 area at 16:9, multiples of 16
    assert sorted(report["dropped_constants"]) == sorted(
        ["var", "feat_rope.freqs_cos", "feat_rope.freqs_sin"] + [f"blocks.{i}.attn_mask" for i in range(4)])


def test_forward_matches_independent_reference(imported):
    _, _, model, sd = imported
    x, text = _inputs()
    with torch.no_grad():
        ours = model(x, text)
    z_ref, logdet_ref = ref_model(sd, x, text)
    assert (ours.z - z_ref).abs().max().item() < TOL
    assert (torch.stack(ours.logdets).sum(0) - logdet_ref).abs().max().item() < TOL
    assert z_ref.sub(x).abs().max() > 0.1 and logdet_ref.abs().min() > 0.1  # far from identity


def test_denoiser_matches_independent_reference(imported):
    _, _, model, sd = imported
    x, text = _inputs(t=4)
    with torch.no_grad():
        ours = model.denoise_score(x, text)
    their = ref_denoiser(sd, x, text)
    w = NOISE / 0.3  # their D regresses w * sigma * grad NLL; ours -sigma * grad NLL
    assert (ours - (-their / w)).abs().max().item() < TOL
    # Same denoised latent: ours x + sigma * s, theirs x - 0.3 * D.
    assert ((x + NOISE * ours) - (x - 0.3 * their)).abs().max().item() < TOL


def test_qkv_regroup_roundtrip():
    from megatron_starflow.convert.ml_starflow import regroup_qkv, ungroup_qkv

    w = torch.arange(3 * 4 * 2 * 5, dtype=torch.float64).reshape(3 * 4 * 2, 5)  # 4 heads of dim 2
    g = regroup_qkv(w, 2)
    # megatron group h = [q_h, k_h, v_h]; theirs q_h = rows 2h..2h+1, k_h = 8 + 2h.., v_h = 16 + 2h..
    assert torch.equal(g[6:12], torch.cat([w[2:4], w[10:12], w[18:20]]))
    assert torch.equal(ungroup_qkv(g, 2), w)
    assert torch.equal(ungroup_qkv(regroup_qkv(w[:, 0], 2), 2), w[:, 0])


def test_expected_shapes_match_built_model(make_model):
    from megatron_starflow.config import ModelConfig
    from megatron_starflow.convert.checks import expected_shapes, tensor_keys

    for overrides in ({}, {"use_denoiser": False, "num_blocks": 2, "deep_width": 48}):
        model = make_model(randomize=False, **overrides)
        assert expected_shapes(model.cfg) == tensor_keys(model)
    assert isinstance(expected_shapes(ModelConfig()), dict)


def test_error_lists_missing_unexpected_and_shapes(their_files, tmp_path, megatron_ready):
    from megatron_starflow.convert.checks import StateDictMismatch
    from megatron_starflow.convert.ml_starflow import import_ml_starflow

    root, sd = their_files
    bad = dict(sd)
    del bad["blocks.1.proj_in.bias"]
    del bad["blocks.3.attn_blocks.1.mlp.main.2.weight"]
    bad["blocks.0.attn_blocks.0.attention.gate.weight"] = torch.zeros(3)
    bad["blocks.2.extra_thing"] = torch.zeros(3)
    bad["blocks.2.proj_out.weight"] = torch.zeros(5, SHALLOW)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(StateDictMismatch) as info:
        import_ml_starflow(str(tmp_path / "bad.pth"), str(root / "their.yaml"), str(tmp_path / "out"),
                           dtype="fp64", max_shard_size=None)
    err = info.value
    assert set(err.missing) == {"blocks.1.proj_in.bias",
                                "blocks.3.transformer.block.layers.1.mlp.linear_fc2.weight"}
    assert set(err.unexpected) == {"blocks.0.attn_blocks.0.attention.gate.weight", "blocks.2.extra_thing"}
    assert err.shapes == [("blocks.2.proj_out.weight", (5, SHALLOW), (6, SHALLOW))]
    text = str(err)
    for key in ("blocks.1.proj_in.bias", "blocks.2.extra_thing", "blocks.2.proj_out.weight: [5, 48] vs [6, 48]"):
        assert key in text
    assert not (tmp_path / "out").exists()


def test_config_field_disagreeing_with_weights(their_files, tmp_path, megatron_ready):
    from megatron_starflow.config import ConfigError
    from megatron_starflow.convert.checks import ConfigWeightsMismatch
    from megatron_starflow.convert.ml_starflow import import_ml_starflow

    root, _ = their_files

    def run(changes):
        args = [dict(e) for e in THEIR_YAML["arguments"]]
        for entry in args:
            for key in list(entry):
                if key in changes:
                    entry[key] = changes.pop(key)
        args += [{k: v} for k, v in changes.items()]
        path = tmp_path / "changed.yaml"
        with open(path, "w") as f:
            yaml.safe_dump({"arguments": args}, f)
        import_ml_starflow(str(root / "their.pth"), str(path), str(tmp_path / "out"), dtype="fp64")

    with pytest.raises(ConfigWeightsMismatch) as info:
        run({"top_block_channels": 96, "layers_per_block": "1 1 1 3"})
    msg = str(info.value)
    assert "model.deep_width=96 but blocks.3.proj_in.weight has shape [72, 3]" in msg
    assert "model.deep_layers=3 but blocks.3 has 2 transformer layer(s)" in msg
    for key, value in (("adaln", 1), ("use_swiglu", 1), ("use_qk_norm", 1), ("temporal_causal", 1),
                       ("num_kv_heads", 1), ("blocks", 3)):
        with pytest.raises(ConfigError, match=f"their config key {key}="):
            run({key: value, "layers_per_block": "1"} if key == "blocks" else {key: value})
