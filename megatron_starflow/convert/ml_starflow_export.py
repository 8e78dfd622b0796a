"""Export our checkpoints in the authors' layout (apple/ml-starflow): the inverse of ``ml_starflow``.

    DIR/model.pth          torch.save of a flat state dict with their key names (their sample.py:
                           ``--checkpoint_path DIR/model.pth``; loaded with load_state_dict(strict=False))
    DIR/config.yaml        ``arguments: [{key: value}, ...]`` for their train.py / sample.py parser
                           (``--model_config_path DIR/config.yaml``)
    DIR/export_notes.txt   the warnings and notes of the export: what their format does not carry

Weights (ours -> theirs, the inverse of ``ml_starflow.map_their_state_dict``):

* layer names: ``transformer.block.layers.{j}.{input_layernorm, self_attention.linear_qkv,
  self_attention.linear_proj, pre_mlp_layernorm, mlp.linear_fc1, mlp.linear_fc2}`` ->
  ``attn_blocks.{j}.{attention.norm, attention.qkv, attention.proj, mlp.norm, mlp.main.0,
  mlp.main.2}``; qkv rows from megatron's per-head [q_h k_h v_h] groups back to [q | k | v];
  ``sos_embed``, ``proj_in``, ``proj_txt``, ``final_norm``, ``proj_out`` keep their names.
* denoiser head: their D = our s / c with c = -1/w the factor of ``ml_starflow.denoiser_output_scale``
  (w = noise_std / 0.3 when the caption carries the noise level, else 1). With our output scale
  s0 (``model.denoiser_output_scale``) the head is multiplied by s0 / c: not at all for a model
  imported from theirs (s0 = c: their tensors come back bit for bit), exactly (a power of two) for
  c = -1, and otherwise in float64 and stored as float64 so that the importer's inverse gives our
  fp32 tensors back bit for bit (their loader casts it to its own dtype).
* constants their modules register (``load_state_dict`` checks their shapes even with
  strict=False): ``blocks.{i}.attn_mask`` = tril(ones(P^2 + L)) in every flow block, ``var`` =
  ones(P^2, C), ``feat_rope.freqs_cos`` / ``freqs_sin`` = zeros(L + P^2, head_dim); float32.

What their format cannot express is either refused (``NotExpressible``, listing every item with its
fix) or written with a warning, per item:

refused: a sentencepiece text encoder (their code loads a T5 by Hugging Face id; ours is trained
  and has no place there); a text model name their ``setup_encoder`` does not load as T5 (fix:
  ``--text-model google/...``); the s2d codec, or a Wan latent that is not Wan2.2's 48 channels
  (their ``vae`` entry loads a VAE by name); a RoPE time share other than 16 dims of head_dim, a
  RoPE base other than 10000, a head_dim their split cannot take; an MLP ratio other than 4; an
  odd number of blocks (their L2R order then flips the deep block); ``reverse_even_blocks``
  false; a non-integer ``pt_seq_len``; a denoiser that is not 8 layers at the shallow width
  (their NonCausalBlock; fix: ``--drop-denoiser``).
written with a warning: the first-layer-only denoiser look-ahead (their mask looks one frame
  ahead in every layer, so their denoiser output differs; the flow is exact; ``--drop-denoiser``
  lets their sampler use its score-gradient fallback instead); a deep-block ``attn_window`` (their
  training-time forward has none; their sampler windows via ``--target_length``); a caption
  template their ``preprocess_text`` does not produce; a frame size ``img_size`` cannot express; a
  noise level whose caption number differs (int(1000 sigma) in theirs, round in ours).
"""

from __future__ import annotations

import math
import os
import re
import shutil

import torch
import yaml

from megatron_starflow.config import Config
from megatron_starflow.convert.ml_starflow import (
    DENOISER_HEAD, LAYER_MAP, T5_WIDTHS, denoiser_output_scale, fold_is_exact, same_bits,
    scale_tensor, their_image_size, their_template, ungroup_qkv)

WEIGHTS, YAML_NAME, NOTES = "model.pth", "config.yaml", "export_notes.txt"
WAN22 = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"  # their VAE entry for the 48-channel Wan2.2 VAE
WAN22_CHANNELS = 48
THEIR_DENOISER_LAYERS = 8  # transformer_flow.Model builds NonCausalBlock(num_layers=8)
THEIR_TIME_DIMS = 16  # misc/pe.py: the third RoPE axis always has 8 frequency pairs
THEIR_UNLIMITED_WINDOW = 10000  # NonCausalBlock: window None -> 10000 frames of look-back
SPATIAL = 16  # Wan2.2: 16x spatial; their frame sizes are multiples of 16 * patch_size
THEIR_LAYER = {ours: theirs for theirs, ours in LAYER_MAP.items()}
_OUR_LAYER = re.compile(r"^(blocks\.\d+|learnable_self_denoiser)\.transformer\.block\.layers\.(\d+)\."
                        r"(.+)\.(weight|bias)$")
_OUR_DIRECT = re.compile(r"^(blocks\.\d+|learnable_self_denoiser)\."
                         r"(sos_embed|(proj_in|proj_out|proj_txt)\.(weight|bias)|final_norm\.weight)$")
_ASPECT = re.compile(r"\n in a (\d+:\d+) aspect ratio\.\n$")
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                 "fp64": torch.float64}
NOT_CARRIED = [
    "training state (optimizer, step, RNG, EMA) and every train.* / data.* setting except lr, "
    "min_lr, grad_clip, caption dropout (drop_label), frames, fps and frame size",
    "text.path and data.codec_path: their code loads the T5 by its Hugging Face id ('text') and "
    "downloads the Wan2.2 VAE itself",
    "model.init_std and model.fsm_weight (training only)",
    "sampling options (guidance weight, Jacobi settings, long-video context): pass them to their "
    "sample.py (e.g. --cfg 3.5 --jacobi 1)",
    "their sample.py's --finetuned_vae default (px82zaheuu) overrides the config's 'none': pass "
    "--finetuned_vae none, or their sampler skips the learnable denoiser and looks for a "
    "fine-tuned VAE",
]


class NotExpressible(ValueError):
    """Our checkpoint uses something the authors' format cannot express; one line per item."""

    def __init__(self, items: list[tuple[str, str, str]]):
        self.items = items
        lines = ["cannot export to the apple/ml-starflow layout:"]
        lines += [f"  - {what}: {why}. Fix: {fix}" for what, why, fix in items]
        super().__init__("\n".join(lines))


# ------------------------------------------------------------------------------ config -> YAML

def their_text_model(cfg: Config, text_model: str | None) -> str | None:
    """The Hugging Face id for their ``text`` key: given, or the id of the known T5 that
    text.path's folder is named after (google/flan-t5-xl, google/t5-v1_1-xl, google-t5/t5-base)."""
    if text_model:
        return text_model
    base = os.path.basename(os.path.normpath(cfg.text.path)).lower() if cfg.text.path else ""
    if base not in T5_WIDTHS:
        return None
    return f"google-t5/{base}" if base.startswith("t5-") and not base.startswith("t5-v1_1") else f"google/{base}"


def _match_template(template: str) -> tuple[int, int, str | None] | None:
    """(fps_cond, cond_noise_level, aspect) whose caption template (their preprocess_text,
    ``ml_starflow.their_template``) is exactly ``template``; None when none is."""
    m = _ASPECT.search(template)
    aspects = [None] + ([m.group(1)] if m else [])
    for aspect in aspects:
        for fps_cond in (1, 0):
            for noise in (1, 0):
                args = {"fps_cond": fps_cond, "cond_noise_level": noise, "mix_aspect": int(bool(aspect))}
                if their_template(args, aspect) == template:
                    return fps_cond, noise, aspect
    return None


def _their_img_size(height: int, width: int, aspect: str | None, patch: int) -> int | None:
    """An img_size for which their dataset code gives (height, width) pixels; the one closest to
    sqrt(height * width), multiples of 16 * patch first. None when none does."""
    mult = SPATIAL * patch
    centre = math.sqrt(height * width)
    near = sorted(range(max(1, int(centre) - 4 * mult), int(centre) + 4 * mult + 1),
                  key=lambda v: (v % mult != 0, abs(v - centre)))
    for size in near:
        if their_image_size(size, aspect, mult) == (height, width):
            return size
    return None


def their_arguments(cfg: Config, text_model: str | None = None, drop_denoiser: bool = False):
    """Our config -> (their ``arguments`` as an ordered list of (key, value), warnings, notes).
    Raises ``NotExpressible`` listing every refused item."""
    m, t, d, tr = cfg.model, cfg.text, cfg.data, cfg.train
    refused: list[tuple[str, str, str]] = []
    warnings: list[str] = []
    notes: list[str] = []

    name = None
    if t.encoder != "t5":
        refused.append((f"text.encoder={t.encoder}", "their code builds the text encoder from a "
                        "Hugging Face id (a frozen T5); our trained sentencepiece encoder and its "
                        "weights have no place in their format", "train with text.encoder=t5"))
    else:
        name = their_text_model(cfg, text_model)
        if name is None:
            refused.append((f"text.path={t.path!r}", "it does not name a known T5 "
                            f"({', '.join(sorted(T5_WIDTHS))}), so the Hugging Face id for their "
                            "'text' key is unknown", "pass --text-model google/<name>, e.g. "
                            "--text-model google/flan-t5-xl"))
        elif not name.startswith("google") or re.search(r"\s", name):
            refused.append((f"--text-model {name!r}", "their utils/model_setup.setup_encoder loads "
                            "a T5 only for ids starting with 'google' (and their YAML reader splits "
                            "values at spaces)", "pass the Hugging Face id, e.g. google/flan-t5-xl"))
        else:
            known = T5_WIDTHS.get(name.split("/")[-1].lower())
            if known is not None and known != m.text_width:
                refused.append((f"text model {name}", f"it is {known} wide but model.text_width="
                                f"{m.text_width}", "pass the --text-model the model was trained with"))
    if d.codec != "wan":
        refused.append((f"data.codec={d.codec}", "their code always decodes latents with the VAE "
                        "named by 'vae'; the lossless space-to-depth codec has no counterpart",
                        "train on Wan2.2 latents (data.codec=wan)"))
    elif m.latent_channels != WAN22_CHANNELS:
        refused.append((f"model.latent_channels={m.latent_channels} (data.codec=wan)", "their Wan "
                        f"entry '{WAN22}' loads the {WAN22_CHANNELS}-channel Wan2.2 VAE",
                        "only Wan2.2 latents can be exported"))
    hd = m.head_dim
    from megatron_starflow.models.rope import axis_dims

    want = ((hd - THEIR_TIME_DIMS) // 2, (hd - THEIR_TIME_DIMS) // 2, THEIR_TIME_DIMS)
    if hd % 4 or hd < 20:
        refused.append((f"model.head_dim={hd}", "their RoPE gives time 16 dims and row/column "
                        "(head_dim - 16) / 2 each, which needs head_dim >= 20 and divisible by 4",
                        "train with such a head_dim (64 in the 7B model)"))
    elif axis_dims(hd, m.rope_time_fraction) != want:
        refused.append((f"model.rope_time_fraction={m.rope_time_fraction:g} (row/col/time dims "
                        f"{axis_dims(hd, m.rope_time_fraction)})", "their RoPE (misc/pe.py) always "
                        f"gives the time axis {THEIR_TIME_DIMS} of a head's dims, here {want}",
                        f"train with model.rope_time_fraction={THEIR_TIME_DIMS / hd:g} (16 / head_dim)"))
    if m.rope_base != 10000.0:
        refused.append((f"model.rope_base={m.rope_base:g}", "their RoPE base is fixed at 10000",
                        "train with model.rope_base=10000"))
    if m.mlp_ratio != 4:
        refused.append((f"model.mlp_ratio={m.mlp_ratio}", "their MLP expansion is fixed at 4",
                        "train with model.mlp_ratio=4"))
    if m.num_blocks % 2 or m.num_blocks < 2:
        refused.append((f"model.num_blocks={m.num_blocks}", "with their L2R order an odd block count "
                        "flips the in-frame order of the deep block (ours never does)",
                        "train with an even model.num_blocks"))
    if not m.reverse_even_blocks:
        refused.append(("model.reverse_even_blocks=false", "their blocks 0, 2, 4 always flip the "
                        "in-frame order", "train with model.reverse_even_blocks=true"))
    if m.pt_seq_len != int(m.pt_seq_len):
        refused.append((f"model.pt_seq_len={m.pt_seq_len:g}", "their parser reads pt_seq_len as an "
                        "integer", "train with an integer model.pt_seq_len"))
    keep = m.use_denoiser and not drop_denoiser
    if keep:
        fix = ("--drop-denoiser (their sample.py then denoises with its score-gradient fallback), "
               f"or train with model.denoiser_layers={THEIR_DENOISER_LAYERS} and "
               "model.denoiser_width=0")
        if m.denoiser_layers != THEIR_DENOISER_LAYERS:
            refused.append((f"model.denoiser_layers={m.denoiser_layers}", "their NonCausalBlock "
                            f"always has {THEIR_DENOISER_LAYERS} layers; their loader "
                            "(strict=False) would leave the missing layers randomly initialised",
                            fix))
        if m.resolved_denoiser_width != m.shallow_width:
            refused.append((f"model.denoiser_width={m.denoiser_width}", "their denoiser is as wide "
                            f"as the shallow blocks ({m.shallow_width})", fix))
        if m.denoiser_lookahead == "first_layer":
            warnings.append("model.denoiser_lookahead=first_layer: their denoiser mask looks one "
                            "frame ahead in every layer, so their code computes a different "
                            "denoiser output from these weights (the flow is exact); export with "
                            "--drop-denoiser to let their sampler denoise with the flow's own score")
    elif m.use_denoiser:
        notes.append("--drop-denoiser: the denoiser is not exported (learnable_self_denoiser 0)")
    if m.attn_window:
        warnings.append(f"model.attn_window={m.attn_window}: their training-time forward (and "
                        "likelihood) attends to all earlier frames; it agrees with ours on clips "
                        "of at most that many latent frames. Their sampler windows long videos "
                        "itself (sample.py --target_length)")
    if refused:
        raise NotExpressible(refused)

    match = _match_template(t.template)
    if match is None:
        fps_cond, noise_cond, aspect = int("{fps}" in t.template), int("{noise}" in t.template), None
        warnings.append(f"text.template={t.template!r} is not a caption template their "
                        f"preprocess_text produces; wrote fps_cond={fps_cond}, cond_noise_level="
                        f"{noise_cond}, mix_aspect=0, so their captions read "
                        f"{their_template({'fps_cond': fps_cond, 'cond_noise_level': noise_cond, 'mix_aspect': 0}, None)!r}")
    else:
        fps_cond, noise_cond, aspect = match
    if noise_cond and int(m.noise_std * 1000) != int(round(1000 * m.noise_std)):
        warnings.append(f"model.noise_std={m.noise_std!r}: their caption says Noise Level "
                        f"{int(m.noise_std * 1000)}, ours {int(round(1000 * m.noise_std))}")
    img_size = _their_img_size(d.height, d.width, aspect, m.patch_size)
    if img_size is None:
        img_size = max(1, round(math.sqrt(d.height * d.width) / (SPATIAL * m.patch_size))) * SPATIAL * m.patch_size
        warnings.append(f"frame size {d.height}x{d.width}: no img_size gives it in their dataset "
                        f"code{' at aspect ' + aspect if aspect else ' without an aspect-ratio caption (mix_aspect)'}; "
                        f"wrote img_size {img_size} (about the same area)")
    vae = WAN22 + (f":{d.later_frames_scale!r}" if d.later_frames_scale != 1.0 else "")
    layers = [m.shallow_layers] * (m.num_blocks - 1) + [m.deep_layers]
    args = [
        ("img_size", img_size), ("txt_size", m.text_length), ("vid_size", f"{d.frames}:{d.fps}"),
        ("fps_cond", fps_cond), ("channel_size", m.latent_channels), ("patch_size", m.patch_size),
        ("channels", m.shallow_width), ("top_block_channels", m.deep_width),
        ("blocks", m.num_blocks), ("layers_per_block", " ".join(map(str, layers))),
        ("head_dim", hd), ("noise_std", float(m.noise_std)), ("lr", float(tr.lr)),
        ("min_lr", float(tr.min_lr)), ("nvp", 1), ("rope", 1), ("adaln", 0), ("sos", 1),
        ("seq_order", "L2R"), ("pt_seq_len", int(m.pt_seq_len)), ("mix_aspect", int(bool(aspect))),
        ("use_softplus", 1), ("cond_top_only", 1), ("use_final_norm", 1),
        ("learnable_self_denoiser", int(keep)), ("conditional_denoiser", int(keep)),
    ]
    if keep and m.denoiser_window < THEIR_UNLIMITED_WINDOW:
        args.append(("denoiser_window", m.denoiser_window))
    elif keep:
        notes.append(f"model.denoiser_window={m.denoiser_window}: written as unlimited (their "
                     f"default, {THEIR_UNLIMITED_WINDOW} frames)")
    args += [
        ("cond_noise_level", noise_cond), ("temporal_causal", 2), ("shallow_block_local", 1),
        ("gradient_checkpoint", int(m.recompute)), ("vae", vae), ("finetuned_vae", "none"),
        ("text", name), ("drop_label", float(t.caption_dropout)), ("grad_clip", float(tr.grad_clip)),
        ("soft_clip", float(m.soft_clip)),
    ]
    if aspect:
        notes.append(f"aspect ratio {aspect}: pass --aspect_ratio {aspect} to their sample.py")
    return args, warnings, notes


def write_their_yaml(args: list[tuple[str, object]], path: str) -> None:
    """``arguments: [{key: value}, ...]`` in order (their utils/common.load_model_config turns each
    entry into ``--key value``)."""
    text = yaml.safe_dump({"arguments": [{k: v} for k, v in args]}, sort_keys=False,
                          default_flow_style=False)
    with open(path, "w") as f:
        f.write(text)


# ------------------------------------------------------------------------------ weights

def their_constants(cfg: Config) -> dict[str, torch.Tensor]:
    """The buffers their modules register (unused by their forward, but shape-checked on load)."""
    m = cfg.model
    p2, length = int(m.pt_seq_len) ** 2, m.text_length
    mask = torch.tril(torch.ones(p2 + length, p2 + length))
    out = {f"blocks.{i}.attn_mask": mask.clone() for i in range(m.num_blocks)}
    out["var"] = torch.ones(p2, m.token_channels)
    out["feat_rope.freqs_cos"] = torch.zeros(length + p2, m.head_dim)
    out["feat_rope.freqs_sin"] = torch.zeros(length + p2, m.head_dim)
    return out


def their_state_dict(cfg: Config, model_state: dict[str, torch.Tensor], args: list[tuple[str, object]],
                     dtype: str = "fp32") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our model state dict (``StarFlowV.state_dict()`` names, local or TE spec) -> (their flat
    state dict, notes). Floating tensors are cast to ``dtype`` (see the module docstring for the
    denoiser head); constants are float32."""
    from megatron_starflow.convert.checks import check_shapes, expected_shapes
    from megatron_starflow.models.transformer import local_key_map

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype {dtype!r}; valid: {', '.join(EXPORT_DTYPES)}")
    target = EXPORT_DTYPES[dtype]
    state = local_key_map({k: v for k, v in model_state.items() if torch.is_tensor(v)})
    check_shapes(expected_shapes(cfg.model), state, "the model weights to export")
    values = dict(args)
    keep = bool(values["learnable_self_denoiser"])
    head_dim = cfg.model.head_dim
    out: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    for key, value in state.items():
        value = value.detach().to("cpu")
        if key.startswith("learnable_self_denoiser.") and not keep:
            continue
        m = _OUR_LAYER.match(key)
        if m:
            prefix, layer, part, kind = m.groups()
            if part == "self_attention.linear_qkv":
                value = ungroup_qkv(value, head_dim)
            name = f"{prefix}.attn_blocks.{layer}.{THEIR_LAYER[part]}.{kind}"
        elif _OUR_DIRECT.match(key):
            name = key
        else:  # expected_shapes admits nothing else; a new parameter must be mapped here first
            raise ValueError(f"no apple/ml-starflow name for our tensor {key}")
        out[name] = value.to(target).contiguous().clone()
    if keep:
        ours = cfg.model.denoiser_output_scale
        theirs = denoiser_output_scale({"noise_std": values["noise_std"],
                                        "cond_noise_level": values["cond_noise_level"]})
        if ours != theirs:
            factor = ours / theirs
            for key in DENOISER_HEAD:
                exact = scale_tensor(state[key], factor)
                cast = exact.to(target)
                out[key] = cast if same_bits(cast.double(), exact) else exact
            stored = out[DENOISER_HEAD[0]].dtype
            notes.append(f"denoiser head (learnable_self_denoiser.proj_out) multiplied by "
                         f"{factor:.9g} = model.denoiser_output_scale {ours:.6g} / their {theirs:.6g}"
                         + (" and stored in float64 (their loader casts it; our importer gives our "
                            "weights back bit for bit)" if stored == torch.float64 and target != torch.float64 else ""))
        else:
            notes.append(f"denoiser head unchanged (model.denoiser_output_scale = their {theirs:.6g})")
    out.update(their_constants(cfg))
    return out, notes


def check_round_trip(cfg: Config, model_state: dict[str, torch.Tensor], their_state: dict, args,
                     dtype: str) -> dict:
    """Map the export back with the importer's functions: -> {"tensors", "max_abs_diff", "bitwise"}
    against our weights cast to ``dtype`` (``--verify``)."""
    from megatron_starflow.convert.ml_starflow import map_their_state_dict
    from megatron_starflow.models.transformer import local_key_map

    values = dict(args)
    factor = denoiser_output_scale({"noise_std": values["noise_std"],
                                    "cond_noise_level": values["cond_noise_level"]})
    target = EXPORT_DTYPES[dtype]
    heads = [their_state[k] for k in DENOISER_HEAD if k in their_state]
    fold = bool(heads) and factor != 1.0 and fold_is_exact(heads, factor, target)
    imported_scale = 1.0 if fold else factor  # what the importer puts in model.denoiser_output_scale
    back, _, unknown = map_their_state_dict(their_state, cfg.model.head_dim, factor if fold else 1.0)
    if unknown:
        raise ValueError(f"the exported state dict has keys the importer cannot place: {unknown}")
    ours = local_key_map({k: v for k, v in model_state.items() if torch.is_tensor(v)})
    if not values["learnable_self_denoiser"]:
        ours = {k: v for k, v in ours.items() if not k.startswith("learnable_self_denoiser.")}
    if set(back) != set(ours):
        raise ValueError(f"round trip keys differ: {sorted(set(back) ^ set(ours))}")
    ours_scale = cfg.model.denoiser_output_scale
    same_scale = not heads or imported_scale == ours_scale
    worst, bitwise = 0.0, same_scale
    for key, value in ours.items():
        a, b = value.to(target), back[key].to(target)
        if key in DENOISER_HEAD and not same_scale:  # compare the same function
            b = scale_tensor(back[key], imported_scale / ours_scale).to(target)
        bitwise &= same_bits(a, b)
        worst = max(worst, (a.double() - b.double()).abs().max().item())
    return {"tensors": len(ours), "max_abs_diff": worst, "bitwise": bool(bitwise),
            "denoiser_output_scale": imported_scale if heads else None}


# ------------------------------------------------------------------------------ files

def write_export(out_dir: str, their_state: dict, args, warnings: list[str], notes: list[str],
                 source: str = "") -> list[str]:
    """Write model.pth, config.yaml and export_notes.txt into a temporary sibling folder, then
    rename it to ``out_dir`` (an existing folder there is replaced)."""
    from megatron_starflow.convert.inference import temp_sibling

    out_dir = os.path.abspath(out_dir)
    tmp = temp_sibling(out_dir)
    try:
        torch.save(their_state, os.path.join(tmp, WEIGHTS))
        write_their_yaml(args, os.path.join(tmp, YAML_NAME))
        lines = ["apple/ml-starflow export" + (f" of {source}" if source else ""), "",
                 f"python sample.py --model_config_path {YAML_NAME} --checkpoint_path {WEIGHTS} "
                 "--finetuned_vae none --caption '...'", "",
                 "Warnings (written, but their code computes something different from ours):"]
        lines += [f"- {w}" for w in warnings] if warnings else ["- none"]
        lines += ["", "Notes:"] + ([f"- {n}" for n in notes] if notes else ["- none"])
        lines += ["", "Not carried by their format:"] + [f"- {n}" for n in NOT_CARRIED]
        with open(os.path.join(tmp, NOTES), "w") as f:
            f.write("\n".join(lines) + "\n")
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [WEIGHTS, YAML_NAME, NOTES]


def export_state(cfg: Config, model_state: dict[str, torch.Tensor], out_dir: str, dtype: str = "fp32",
                 text_model: str | None = None, drop_denoiser: bool = False, source: str = "",
                 verify: bool = False) -> dict:
    """Our config + model state dict -> the export folder; -> report."""
    args, warnings, notes = their_arguments(cfg, text_model, drop_denoiser)
    their_state, weight_notes = their_state_dict(cfg, model_state, args, dtype)
    notes = notes + weight_notes
    report = {"out": os.path.abspath(out_dir), "tensors": len(their_state), "dtype": dtype,
              "warnings": warnings, "notes": notes}
    if verify:
        report["verify"] = check_round_trip(cfg, model_state, their_state, args, dtype)
    report["files"] = write_export(out_dir, their_state, args, warnings, notes, source)
    return report


def _load_system(checkpoint: str):
    """Our one entry point for reading weights (training checkpoint or inference folder)."""
    from megatron_starflow.convert.loading import load_system

    return load_system(checkpoint)


def export_ml_starflow(checkpoint: str, out_dir: str, dtype: str = "fp32", text_model: str | None = None,
                       drop_denoiser: bool = False, verify: bool = False) -> dict:
    """A training checkpoint (run / checkpoints / step folder) or an inference folder -> the export
    folder in the authors' layout. Refusals are checked before the weights are read."""
    from megatron_starflow.convert.inference import is_inference_folder, read_config

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype {dtype!r}; valid: {', '.join(EXPORT_DTYPES)}")
    if is_inference_folder(checkpoint):  # refuse before building the system (T5, VAE)
        their_arguments(read_config(checkpoint), text_model, drop_denoiser)
    system, step, folder = _load_system(checkpoint)
    report = export_state(system.cfg, system.model.state_dict(), out_dir, dtype, text_model,
                          drop_denoiser, source=str(folder), verify=verify)
    report.update(source=str(folder), step=int(step))
    return report
