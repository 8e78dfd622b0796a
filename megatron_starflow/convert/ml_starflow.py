"""Import the authors' published checkpoint (apple/ml-starflow) into our inference folder.

Their checkpoint is ``torch.save(model.state_dict())`` of their bare ``Model``: flat, unprefixed keys
(docs/reference_facts.md section 7). Their YAML is ``arguments: [{key: value}, ...]``, turned into
train.py flags; keys it does not set take train.py's argparse defaults (``THEIR_DEFAULTS``).

Name map (theirs -> ours), inside ``blocks.{i}.`` and ``learnable_self_denoiser.``:

    attn_blocks.{j}.attention.norm  -> transformer.block.layers.{j}.input_layernorm
    attn_blocks.{j}.attention.qkv   -> transformer.block.layers.{j}.self_attention.linear_qkv  (rows regrouped)
    attn_blocks.{j}.attention.proj  -> transformer.block.layers.{j}.self_attention.linear_proj
    attn_blocks.{j}.mlp.norm        -> transformer.block.layers.{j}.pre_mlp_layernorm
    attn_blocks.{j}.mlp.main.0 / .2 -> transformer.block.layers.{j}.mlp.linear_fc1 / linear_fc2
    sos_embed, proj_in, proj_txt, final_norm, proj_out: same names

* qkv rows: theirs are [q (all heads) | k | v], head h at rows h*d..h*d+d-1 of each third; megatron's
  ``linear_qkv`` groups rows per query group (one group per head here, no GQA):
  [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] (``SelfAttention.get_query_key_value_tensors``).
* Dropped constants: ``blocks.{i}.attn_mask`` (an unused tril), ``var`` (deprecated ones),
  ``feat_rope.freqs_cos/sin`` (zero placeholders).
* Denoiser output: theirs D is trained on ``w * sigma * grad NLL`` (w = noise_std / 0.3 with
  cond_noise_level, else 1) and used as ``x - 0.3 * D``; ours s on ``-sigma * grad NLL`` and used as
  ``x + sigma * s``. So s = -D / w, and both denoise the same way when w = sigma / 0.3. The factor
  -1/w is folded into ``learnable_self_denoiser.proj_out`` (weight and bias) only when that fold is
  exactly reversible at the stored precision (``fold_is_exact``: always for a power-of-two factor
  such as cond_noise_level 0, and for the float64 head that our exporter writes); otherwise their
  weights are kept bit for bit and ``model.denoiser_output_scale`` = -1/w multiplies the output.
  Either way ``convert/ml_starflow_export.py`` gives their tensors back bit for bit.

Architecture choices of theirs that change numbers are our config options, set here:
``rope_time_fraction`` = 16 / head_dim (misc/pe.py: dim_split = [head_dim/2 - 8, 8] pairs, the time
axis always gets 8 pairs), ``pt_seq_len``, ``soft_clip``, ``noise_std``, ``reverse_even_blocks``,
``denoiser_window``, the caption ``template`` (fps, noise level, aspect ratio) and
``data.later_frames_scale`` (the ``:0.6`` of their VAE string). Options of theirs we do not implement
fail with a ``ConfigError`` naming the key.
"""

from __future__ import annotations

import math
import os
import re

import torch
import yaml

from megatron_starflow.config import Config, ConfigError, from_preset, validate

# train.py get_tarflow_parser defaults of the keys the model, its text and its data depend on.
THEIR_DEFAULTS = dict(
    sos=0, seq_order="R2L", patch_size=4, channels=512, top_block_channels=None, blocks=4,
    layers_per_block=[8], rope=0, pt_seq_len=None, adaln=0, nvp=1, use_softplus=0, cond_top_only=0,
    head_dim=64, num_heads=None, num_kv_heads=None, use_swiglu=0, use_qk_norm=0, use_post_norm=0,
    use_final_norm=0, use_bias=1, norm_type="layer_norm", use_pretrained_lm=None, use_mm_attn=0,
    soft_clip=0.0, learnable_self_denoiser=0, conditional_denoiser=0, noise_embed_denoiser=0,
    temporal_causal=0, shallow_block_local=0, denoiser_window=None, local_attn_window=None,
    noise_std=0.3, noise_type="gaussian", cond_noise_level=0, txt_size=0, channel_size=3,
    img_size=32, vid_size=None, fps_cond=0, mix_aspect=0, text=None, vae=None, drop_label=0.0,
    lr=1e-4, min_lr=1e-6, grad_clip=0.0, gradient_checkpoint=0, last_frame_cond=0,
    video_to_video=0, latent_norm_regularization=0.0, cfg=0.0, drop_image=0.0,
)

# Hidden size of T5 encoders by name, to cross-check the text width of the weights.
T5_WIDTHS = {"t5-small": 512, "t5-base": 768, "t5-large": 1024, "t5-3b": 1024, "t5-11b": 1024,
             "flan-t5-small": 512, "flan-t5-base": 768, "flan-t5-large": 1024, "flan-t5-xl": 2048,
             "flan-t5-xxl": 4096, "t5-v1_1-xl": 2048, "t5-v1_1-xxl": 4096}

DROPPED = re.compile(r"^(blocks\.\d+\.attn_mask|var|feat_rope(_gen)?\.freqs_(cos|sin))$")
LAYER_MAP = {
    "attention.norm": "input_layernorm",
    "attention.qkv": "self_attention.linear_qkv",
    "attention.proj": "self_attention.linear_proj",
    "mlp.norm": "pre_mlp_layernorm",
    "mlp.main.0": "mlp.linear_fc1",
    "mlp.main.2": "mlp.linear_fc2",
}
_THEIR_LAYER = re.compile(r"^(blocks\.\d+|learnable_self_denoiser)\.attn_blocks\.(\d+)\.(.+)\.(weight|bias)$")
_DIRECT = re.compile(r"^(blocks\.\d+|learnable_self_denoiser)\."
                     r"(sos_embed|(proj_in|proj_out|proj_txt)\.(weight|bias)|final_norm\.weight)$")


# ------------------------------------------------------------------------------ config

def read_their_yaml(path: str) -> dict:
    """Their YAML -> {key: value} with train.py defaults filled in, values as argparse types."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    items = data.get("arguments", data) if isinstance(data, dict) else data
    raw: dict = {}
    if isinstance(items, list):
        for entry in items:
            if not isinstance(entry, dict):
                raise ConfigError(f"{path}: 'arguments' entries must be 'key: value' mappings, got {entry!r}")
            raw.update(entry)
    elif isinstance(items, dict):
        raw.update(items)
    else:
        raise ConfigError(f"{path}: expected 'arguments: [{{key: value}}, ...]' (apple/ml-starflow configs)")
    args = dict(THEIR_DEFAULTS)
    for key, value in raw.items():
        default = THEIR_DEFAULTS.get(key)
        if key == "layers_per_block":
            value = [int(v) for v in (value.split() if isinstance(value, str) else
                                      value if isinstance(value, list) else [value])]
        elif isinstance(value, str) and value.lower() in ("none", "null"):
            value = None
        elif isinstance(default, bool) or isinstance(default, int) and value is not None:
            value = int(value)
        elif isinstance(default, float) and value is not None:
            value = float(value)
        args[key] = value
    args["_set_keys"] = sorted(raw)
    return args


def _need(args: dict, key: str, ok, what: str) -> None:
    if not ok(args[key]):
        raise ConfigError(f"their config key {key}={args[key]!r}: {what}")


def their_rope_time_fraction(head_dim: int) -> float:
    """misc/pe.py: half = head_dim/2 frequency pairs split [half - 8, 8]: row and column share the
    first (half - 8) pairs, time has 8 -> time dims = 16 of head_dim."""
    if head_dim % 4 or head_dim < 20:
        raise ConfigError(f"their config key head_dim={head_dim}: their RoPE gives the time axis 16 dims "
                          f"and row/column (head_dim - 16)/2 each; with head_dim={head_dim} that is not a "
                          f"positive even split (need head_dim >= 20, divisible by 4)")
    return 16.0 / head_dim


def their_image_size(img_size: int, aspect: str | None, multiple: int) -> tuple[int, int]:
    """dataset.aspect_ratio_to_image_size: same area as img_size^2, sides rounded to `multiple`."""
    if not aspect:
        return img_size, img_size
    rw, rh = (int(v) for v in aspect.split(":"))
    ratio = rw / rh
    area = img_size ** 2
    return (int(round(math.sqrt(area / ratio) / multiple)) * multiple,
            int(round(math.sqrt(area * ratio) / multiple)) * multiple)


def their_template(args: dict, aspect: str | None) -> str:
    """utils/common.py preprocess_text, in its order: fps line, noise prefix, aspect suffix.
    {caption}, {fps}, {noise} are filled by our format_caption (noise = int(1000 sigma))."""
    text = "A video with {fps} fps:\n{caption}\n" if args["fps_cond"] else "{caption}"
    if args["cond_noise_level"]:
        text = "Noise Level {noise}:\n" + text
    if args["mix_aspect"] and aspect:
        text = text + f"\n in a {aspect} aspect ratio.\n"
    return text


def config_from_theirs(args: dict, state: dict, t5_path: str = "", vae_path: str = "",
                       aspect: str = "16:9") -> tuple[Config, list[str]]:
    """Their args (``read_their_yaml``) + their state dict -> (our Config, notes for the user)."""
    notes = []
    unsupported = [
        ("adaln", lambda v: not v, "adaLN modulation is not implemented"),
        ("use_swiglu", lambda v: not v, "SwiGLU MLPs are not implemented (ours: GELU MLP)"),
        ("use_qk_norm", lambda v: not v, "query/key RMSNorm is not implemented"),
        ("use_post_norm", lambda v: not v, "post-norms are not implemented"),
        ("use_bias", lambda v: v == 1, "bias-free linears are not implemented"),
        ("norm_type", lambda v: v == "layer_norm", "only layer_norm is implemented"),
        ("num_kv_heads", lambda v: v is None, "grouped-query attention is not implemented"),
        ("use_pretrained_lm", lambda v: v is None, "a pretrained-LM deep block is not implemented"),
        ("use_mm_attn", lambda v: not v, "multimodal attention is not implemented"),
        ("rope", lambda v: v == 1, "learned position embeddings (rope 0) are not implemented"),
        ("sos", lambda v: v == 1, "blocks without a start token (sos 0) are not implemented"),
        ("use_softplus", lambda v: v == 1, "the exp scale (use_softplus 0) is not implemented"),
        ("use_final_norm", lambda v: v == 1, "blocks without the final RMSNorm are not implemented"),
        ("soft_clip", lambda v: v is not None and v > 0, "unclipped heads (soft_clip 0) are not implemented"),
        ("cond_top_only", lambda v: v == 1, "text in the shallow blocks is not implemented"),
        ("shallow_block_local", lambda v: v == 1, "shallow blocks over the whole video are not implemented"),
        ("temporal_causal", lambda v: v == 2, "only temporal_causal 2 (flip inside each frame) is implemented"),
        ("seq_order", lambda v: v == "L2R", "only L2R is implemented (blocks 0, 2, 4 flip)"),
        ("noise_embed_denoiser", lambda v: not v, "a noise-embedding denoiser is not implemented"),
        ("vid_size", lambda v: v is not None, "image-only models (no vid_size) are not supported"),
        ("text", lambda v: v is not None and "t5" in str(v).lower(),
         "only T5 text encoders are supported (text.encoder=t5)"),
    ]
    for key, ok, what in unsupported:
        _need(args, key, ok, what)
    layers = list(args["layers_per_block"])
    blocks = args["blocks"] if len(layers) == 1 else len(layers)
    if len(layers) == 1:
        layers = layers * blocks
    if blocks < 2:
        raise ConfigError(f"their config key blocks={blocks}: need shallow blocks and a deep block")
    if blocks % 2:
        raise ConfigError(f"their config key blocks={blocks}: with an odd number of blocks their deep "
                          f"block flips the in-frame order (L2R permutations[blocks % 2]); ours never does")
    if any(n == 0 for n in layers):
        raise ConfigError(f"their config key layers_per_block={layers}: identity blocks (0 layers) are not "
                          f"implemented")
    shallow = set(layers[:-1])
    if len(shallow) != 1:
        raise ConfigError(f"their config key layers_per_block={layers}: shallow blocks of different depths "
                          f"are not implemented (model.shallow_layers is one number)")
    head_dim = int(args["head_dim"])
    channels = int(args["channels"])
    if args["num_heads"] is not None and int(args["num_heads"]) * head_dim != channels:
        raise ConfigError(f"their config key num_heads={args['num_heads']}: ours uses width / head_dim = "
                          f"{channels // head_dim} heads")
    if args["vae"] is None or "wan" not in str(args["vae"]).lower():
        raise ConfigError(f"their config key vae={args['vae']!r}: only the Wan VAEs are supported "
                          f"(data.codec=wan)")
    vae_name, _, vae_scale = str(args["vae"]).partition(":")
    frames, _, fps = str(args["vid_size"]).partition(":")
    fps = int(fps.split(":")[0]) if fps else 16

    deep = f"blocks.{blocks - 1}"
    txt_key = f"{deep}.proj_txt.weight"
    if txt_key not in state:
        raise ConfigError(f"the weights hold no {txt_key}: the deep block must be text-conditioned")
    text_width = int(state[txt_key].shape[1])
    t5_name = str(args["text"]).split("/")[-1].lower()
    if t5_path:
        cfg_path = os.path.join(t5_path, "config.json")
        if os.path.isfile(cfg_path):
            import json

            with open(cfg_path) as f:
                d_model = json.load(f).get("d_model")
            if d_model is not None and int(d_model) != text_width:
                raise ConfigError(f"--t5 {t5_path} has d_model={d_model} but {txt_key} has shape "
                                  f"{list(state[txt_key].shape)} (text width {text_width})")
    elif t5_name in T5_WIDTHS and T5_WIDTHS[t5_name] != text_width:
        raise ConfigError(f"their config key text={args['text']!r} ({T5_WIDTHS[t5_name]} wide) but {txt_key} "
                          f"has shape {list(state[txt_key].shape)}")
    den_layers = len({m.group(1) for k in state
                      if (m := re.match(r"^learnable_self_denoiser\.attn_blocks\.(\d+)\.", k))})
    if args["learnable_self_denoiser"] and not args["conditional_denoiser"]:
        raise ConfigError("their config key conditional_denoiser=0: our denoiser always reads the text")
    if bool(args["learnable_self_denoiser"]) != (den_layers > 0):
        raise ConfigError(f"their config key learnable_self_denoiser={args['learnable_self_denoiser']} but "
                          f"the weights hold {den_layers} learnable_self_denoiser layer(s)")
    patch = int(args["patch_size"])
    spatial = 16  # Wan2.x VAE: 16x spatial (2.2), the multiple sample.py rounds to is 16 * patch
    height, width = their_image_size(int(args["img_size"]), aspect if args["mix_aspect"] else None,
                                     spatial * patch)
    pt_seq_len = args["pt_seq_len"] or (int(args["img_size"]) // spatial) // patch

    cfg = from_preset("7b")
    m = cfg.model
    m.latent_channels, m.patch_size = int(args["channel_size"]), patch
    m.num_blocks, m.shallow_width, m.shallow_layers = blocks, channels, layers[0]
    m.deep_width = int(args["top_block_channels"] or channels)
    m.deep_layers, m.head_dim, m.mlp_ratio = layers[-1], head_dim, 4
    m.text_width, m.text_length = text_width, int(args["txt_size"])
    m.soft_clip, m.noise_std = float(args["soft_clip"]), float(args["noise_std"])
    m.pt_seq_len = float(pt_seq_len)
    m.rope_base, m.rope_time_fraction = 10000.0, their_rope_time_fraction(head_dim)
    m.attn_window, m.reverse_even_blocks = 0, True
    m.use_denoiser = den_layers > 0
    m.denoiser_layers = max(den_layers, 1)
    m.denoiser_width = 0
    # Their denoiser mask with window None is unlimited look-back.
    m.denoiser_window = int(args["denoiser_window"]) if args["denoiser_window"] else 1_000_000
    m.denoiser_lookahead = "every_layer"  # their mask is the same in every layer
    m.recompute = bool(args["gradient_checkpoint"])
    cfg.text.encoder, cfg.text.path = "t5", os.path.abspath(t5_path) if t5_path else ""
    cfg.text.caption_dropout = float(args["drop_label"])
    cfg.text.template = their_template(args, aspect)
    d = cfg.data
    d.frames, d.fps, d.height, d.width = int(frames), fps, height, width
    d.codec, d.codec_path, d.s2d_patch = "wan", os.path.abspath(vae_path) if vae_path else "", 1
    d.later_frames_scale = float(vae_scale) if vae_scale else 1.0
    tr = cfg.train
    tr.lr, tr.min_lr = float(args["lr"]), float(args["min_lr"])
    tr.grad_clip = float(args["grad_clip"]) or tr.grad_clip
    if tr.min_lr > tr.lr:
        tr.min_lr = tr.lr
    validate(cfg)

    notes.append(f"text template {cfg.text.template!r} (fps {fps}, noise level "
                 f"{int(round(1000 * m.noise_std))}, aspect {aspect if args['mix_aspect'] else 'none'})")
    m.denoiser_output_scale = denoiser_output_scale(args) if m.use_denoiser else 1.0
    if m.use_denoiser:
        notes.append(f"denoiser: model.denoiser_output_scale = {m.denoiser_output_scale:.6g} "
                     f"(their D -> our s = -D/w), weights unchanged")
    if args["local_attn_window"]:
        notes.append(f"local_attn_window={args['local_attn_window']}: theirs acts only at sampling "
                     f"(KV-cache length); use `launch.py sample --frames N --long-context C`")
    if args["cfg"]:
        notes.append(f"their cfg={args['cfg']}: pass `launch.py sample --cfg {args['cfg']}` (their "
                     f"scripts use 3.5 for video)")
    for key in ("noise_type", "last_frame_cond", "video_to_video", "latent_norm_regularization",
                "drop_image"):
        if args[key] not in (THEIR_DEFAULTS[key],):
            notes.append(f"training-only setting {key}={args[key]!r} is not reproduced by our "
                         f"training loop (irrelevant for sampling)")
    if vae_scale:
        notes.append(f"VAE {vae_name}: latent frames 1.. scaled by {vae_scale} "
                     f"(data.later_frames_scale); our codec encodes the posterior mean, theirs "
                     f"adds a posterior sample (affects I2V/V2V conditioning only)")
    return cfg, notes


def denoiser_output_scale(args: dict) -> float:
    w = float(args["noise_std"]) / 0.3 if args["cond_noise_level"] else 1.0
    return -1.0 / w


DENOISER_HEAD = ("learnable_self_denoiser.proj_out.weight", "learnable_self_denoiser.proj_out.bias")


def scale_tensor(value: torch.Tensor, factor: float) -> torch.Tensor:
    """``value * factor`` computed in float64 (one rounding when cast back)."""
    return value.double() * factor


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (dtype, shape and every bit, so -0.0 != 0.0 and NaN payloads count)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def fold_is_exact(tensors: list[torch.Tensor], factor: float, dtype: torch.dtype | None = None) -> bool:
    """Whether folding ``factor`` into these tensors and storing them in ``dtype`` can be undone bit
    for bit by multiplying with ``1 / factor`` and casting back to each tensor's own dtype."""
    for t in tensors:
        folded = scale_tensor(t, factor).to(t.dtype).to(dtype or t.dtype)
        if not same_bits(scale_tensor(folded, 1.0 / factor).to(t.dtype), t):
            return False
    return True


# ------------------------------------------------------------------------------ weights

def regroup_qkv(tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows [q_all | k_all | v_all] (head h at h*d..h*d+d-1 of each) -> megatron's per-head groups
    [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]. Works for the weight [3W, W] and the bias [3W]."""
    rows = tensor.shape[0]
    if rows % (3 * head_dim):
        raise ValueError(f"qkv has {rows} rows, not a multiple of 3 * head_dim = {3 * head_dim}")
    heads = rows // (3 * head_dim)
    rest = tensor.shape[1:]
    return tensor.reshape(3, heads, head_dim, *rest).transpose(0, 1).reshape(rows, *rest)


def ungroup_qkv(tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of ``regroup_qkv``."""
    rows = tensor.shape[0]
    heads = rows // (3 * head_dim)
    rest = tensor.shape[1:]
    return tensor.reshape(heads, 3, head_dim, *rest).transpose(0, 1).reshape(rows, *rest)


def load_their_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip-format file: no mmap
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and len(state) == 1 and next(iter(state)) in ("model", "state_dict"):
        state = next(iter(state.values()))
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (torch.save(model.state_dict())), got {type(state)}")
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def map_their_state_dict(state: dict[str, torch.Tensor], head_dim: int,
                         denoiser_scale: float = 1.0) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """-> (our state dict, dropped constant keys, keys we could not place). Values are kept in their
    dtype (the caller casts)."""
    ours, dropped, unknown = {}, [], []
    for key, value in state.items():
        if DROPPED.match(key):
            dropped.append(key)
            continue
        m = _THEIR_LAYER.match(key)
        if m:
            prefix, layer, part, kind = m.groups()
            if part not in LAYER_MAP:
                unknown.append(key)
                continue
            if part == "attention.qkv":
                value = regroup_qkv(value, head_dim)
            ours[f"{prefix}.transformer.block.layers.{layer}.{LAYER_MAP[part]}.{kind}"] = value
            continue
        if _DIRECT.match(key):
            if key.startswith("learnable_self_denoiser.proj_out.") and denoiser_scale != 1.0:
                value = scale_tensor(value, denoiser_scale).to(value.dtype)
            ours[key] = value
            continue
        unknown.append(key)
    return ours, dropped, unknown


def import_ml_starflow(checkpoint: str, config: str, out_dir: str, t5_path: str = "",
                       vae_path: str = "", aspect: str = "16:9", dtype: str = "bf16",
                       max_shard_size: str | None = "5GB") -> dict:
    """Their .pth + YAML -> our inference folder. Every problem (unmapped keys, missing keys, wrong
    shapes, config fields that disagree with the weights) is listed in one error."""
    from megatron_starflow.convert.checks import (StateDictMismatch, check_config_against_weights,
                                                  check_shapes, expected_shapes)
    from megatron_starflow.convert.inference import DTYPES, save_inference_folder

    args = read_their_yaml(config)
    theirs = load_their_state_dict(checkpoint)
    cfg, notes = config_from_theirs(args, theirs, t5_path, vae_path, aspect)
    scale = cfg.model.denoiser_output_scale
    heads = [theirs[k] for k in DENOISER_HEAD if k in theirs]
    fold = scale != 1.0 and len(heads) == len(DENOISER_HEAD) and fold_is_exact(heads, scale, DTYPES.get(dtype))
    if fold:
        cfg.model.denoiser_output_scale = 1.0
        notes = [n for n in notes if not n.startswith("denoiser:")]
        notes.append(f"denoiser: proj_out scaled by {scale:.6g} (their D -> our s = -D/w; exactly "
                     f"reversible at this precision), model.denoiser_output_scale = 1")
    ours, dropped, unknown = map_their_state_dict(theirs, cfg.model.head_dim, scale if fold else 1.0)
    check_config_against_weights(cfg.model, ours, f"{config} (as mapped to our config)")
    what = f"{checkpoint} (mapped to our names; unexpected keys in their names)"
    try:
        check_shapes(expected_shapes(cfg.model), ours, what)
    except StateDictMismatch as exc:
        raise StateDictMismatch(what, exc.missing, unknown + exc.unexpected, exc.shapes) from None
    if unknown:
        raise StateDictMismatch(what, [], unknown, [])
    files = save_inference_folder(out_dir, cfg, ours, dtype, max_shard_size,
                                  metadata={"step": 0, "source": os.path.abspath(checkpoint),
                                            "imported_from": "apple/ml-starflow"})
    return {"out": os.path.abspath(out_dir), "files": files, "tensors": len(ours),
            "dropped_constants": dropped, "notes": notes}
