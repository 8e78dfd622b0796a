"""Configuration: dataclasses, presets, YAML loading and ``key=value`` overrides.

Config is data: a run is fully described by one ``Config`` which is saved (resolved) with every run
folder and checkpoint. Every field has a default, presets override some of them, a YAML file
overrides a preset, and command-line ``section.key=value`` strings override the YAML. Invalid values
fail at load time with a ``ConfigError`` that names the offending key.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the key."""


@dataclass
class ModelConfig:
    """Shapes and options of the STARFlow-V flow (METHOD.md sections 2-4 and 9)."""

    latent_channels: int = 12  # C of one token as the codec delivers it (before patch folding)
    patch_size: int = 1  # p: folds p x p latent pixels into one token, channel order (p1, p2, c)
    num_blocks: int = 3  # K: K-1 shallow blocks + 1 deep block
    shallow_width: int = 64
    shallow_layers: int = 2
    deep_width: int = 128
    deep_layers: int = 4
    head_dim: int = 32
    mlp_ratio: int = 4
    text_width: int = 64  # width of the text encoder's output (2048 for flan-t5-xl)
    text_length: int = 16  # L: text tokens prepended to the deep block
    soft_clip: float = 4.0  # c in c * tanh(h / c), applied to all 2C flow-head outputs
    noise_std: float = 0.1  # sigma of the noise augmentation x~ = x + sigma * eps
    pt_seq_len: float = 8.0  # reference grid that RoPE coordinates are normalised to
    rope_base: float = 10000.0
    # Share of a head's dims that rotate with time (the rest split evenly between row and column).
    # The authors' code (misc/pe.py) uses 1/4 (row 3d/8, col 3d/8, time d/4); METHOD.md's text says 1/2.
    rope_time_fraction: float = 0.25
    attn_window: int = 0  # deep block: frames of look-back (0 = full causal attention)
    reverse_even_blocks: bool = True  # blocks 0, 2, 4 reverse the in-frame raster order
    use_denoiser: bool = True
    denoiser_layers: int = 2
    denoiser_width: int = 0  # 0 = shallow_width (as in the reference)
    denoiser_window: int = 10  # frames of look-back of the denoiser
    # first_layer: only layer 1 looks one frame ahead (output of frame n depends on frames <= n+1);
    # every_layer: the authors' mask in every layer (L layers see L frames ahead)
    denoiser_lookahead: str = "first_layer"
    # Constant factor on the denoiser's output. 1.0 for models trained here; the importer of the
    # authors' checkpoints sets their -0.3 / noise_std (with cond_noise_level) so that their
    # weights load bit for bit (their D regresses w * sigma * grad NLL, ours -sigma * grad NLL).
    denoiser_output_scale: float = 1.0
    fsm_weight: float = 1.0
    init_std: float = 0.02
    recompute: bool = False  # activation recomputation (full, per layer) in every stack

    @property
    def token_channels(self) -> int:
        return self.latent_channels * self.patch_size**2

    @property
    def resolved_denoiser_width(self) -> int:
        return self.denoiser_width or self.shallow_width


@dataclass
class TextConfig:
    encoder: str = "sentencepiece"  # sentencepiece | t5
    path: str = ""  # t5: local folder; sentencepiece: .model file ("" = train one in the run dir)
    vocab_size: int = 128
    width: int = 64  # sentencepiece encoder width (t5: taken from the checkpoint)
    layers: int = 2
    heads: int = 4
    caption_dropout: float = 0.1  # classifier-free guidance training
    template: str = "{caption}"  # the reference: "Noise Level {noise}:\nA video with {fps} fps:\n{caption}\n"


# The synthetic renderer's largest half-extent is 0.22 of the frame side: 2.27x still fits.
OBJECT_SCALE_MAX = 0.5 / 0.22


@dataclass
class DataConfig:
    # synthetic (in-memory clips) | shards (tar shards of video files / pre-decoded clips) |
    # latent_shards (stored Wan latents + T5 embeddings of prepare_data.py --latents: the loop builds
    # neither the VAE nor the text encoder)
    source: str = "synthetic"
    frames: int = 8
    height: int = 16
    width: int = 16
    fps: int = 16
    num_train_clips: int = 2048
    num_heldout_clips: int = 64
    # source=synthetic: every object's size times this (captions unchanged; at most
    # OBJECT_SCALE_MAX so the largest shape still fits the frame); 1.0 = the original task
    object_scale: float = 1.0
    batch_size: int = 8
    codec: str = "s2d"  # s2d (lossless space-to-depth) | wan (Wan 3-D causal VAE)
    codec_path: str = ""  # wan: local diffusers folder
    s2d_patch: int = 2
    s2d_frames: int = 1
    num_workers: int = 0  # shard sources: decode in this many worker processes (0 = in the loop)
    # Latent frames 1.. are multiplied by this after encoding and divided by it before decoding
    # (frame 0 is left alone): the authors' Wan2.2 setting "vae: ...:0.6" (docs/reference_facts.md
    # section 7). 1.0 = off.
    later_frames_scale: float = 1.0
    # source=shards (megatron_starflow/data/video.py; make shards with tools/prepare_data.py)
    shards: str = ""  # training shards: a folder of *.tar, a glob, or a comma-separated list
    heldout_shards: str = ""  # "" = evaluate on the synthetic held-out split
    video_backend: str = "auto"  # auto (DALI where it can decode the codec, else PyAV) | dali | pyav
    sample_fps: float = 0.0  # resample clips to this frame rate (0 = the file's own rate)
    frame_stride: int = 1  # take every n-th frame (at sample_fps)
    crop: str = "center"  # center | random (after resizing to cover height x width)
    clip_start: str = "random"  # random | first (first frame of the clip in the file)
    max_bad_fraction: float = 0.05  # abort when more bad (skipped) samples than this fraction
    bad_data_log: str = ""  # JSONL of skipped samples ("" = <run dir>/bad_data.jsonl)


@dataclass
class TrainConfig:
    steps: int = 300
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_steps: int = 30
    weight_decay: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # Skip rule of the reference: after warm-up, an update whose gradient norm is not finite or
    # exceeds skip_factor * grad_clip is dropped (counted, logged) instead of applied.
    skip_factor: float = 50.0
    # Guard for long runs: this many skipped steps in a row (non-finite loss or gradient, or the
    # skip rule above) stop the run with a message naming the last checkpoint from before the
    # streak (no checkpoint is written during a streak). 0 = never stop.
    max_consecutive_skips: int = 50
    seed: int = 0
    out_dir: str = "runs/tiny"
    ckpt_every: int = 100
    eval_every: int = 100
    log_every: int = 10
    eval_batches: int = 4
    keep_checkpoints: int = 2
    # float32 | bfloat16 (bf16 parameters and compute; fp32 main params, grads and Adam state,
    # sharded over data-parallel ranks as megatron's distributed optimizer) | float64 (tests)
    dtype: str = "float32"
    device: str = "auto"  # auto (cuda:LOCAL_RANK when CUDA is present, else cpu) | cpu | cuda
    # EMA of the flow and denoiser weights, updated after every applied step (0 = off); eval and
    # sample use it by default when a checkpoint holds one.
    ema_decay: float = 0.0
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "megatron_starflow"
    threads: int = 0  # torch CPU threads, 0 = torch default
    # Peak dense TFLOP/s of one device (bf16: ~989 for an H100 SXM); 0 = MFU is not logged.
    peak_tflops: float = 0.0


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    sp: bool = False
    dp: int = -1  # -1: derived from the world size
    cp: int = 1
    # Pipeline micro-batches per step (parallel.pp > 1): data.batch_size must divide by it;
    # 0 = parallel.pp (the fewest that keep every stage busy in 1F1B's steady state).
    micro_batches: int = 0
    spec: str = "local"  # local (pure torch) | te (Transformer Engine)
    fp8: str = "none"  # none | hybrid | e4m3 (Transformer Engine FP8 GEMMs; needs spec=te)
    fp8_recipe: str = "delayed"  # delayed | tensorwise | blockwise | mxfp8 (megatron's fp8_recipe)


@dataclass
class Config:
    preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = ("model", "text", "data", "train", "parallel")

# Presets only list what differs from the dataclass defaults (which are the `tiny` CPU model).
_WAN = dict(codec="wan", codec_path="", s2d_patch=1)
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {},
    "small": {
        "model": dict(shallow_width=128, deep_width=256, deep_layers=6, head_dim=32,
                      denoiser_layers=2, text_length=16, text_width=128),
        "text": dict(width=128),
        "data": dict(frames=8, height=32, width=32),
    },
    "100m": {
        "model": dict(latent_channels=48, num_blocks=4, shallow_width=512, deep_width=1024,
                      deep_layers=6, head_dim=64, denoiser_layers=4, text_length=256,
                      text_width=2048, noise_std=0.5, pt_seq_len=16, soft_clip=4.0),
        "text": dict(encoder="t5"),
        "data": dict(frames=17, height=256, width=256, **_WAN),
    },
    "1b": {
        "model": dict(latent_channels=48, num_blocks=6, shallow_width=1024, deep_width=2048,
                      deep_layers=16, head_dim=64, denoiser_layers=8, text_length=256,
                      text_width=2048, noise_std=0.5, pt_seq_len=24),
        "text": dict(encoder="t5"),
        "data": dict(frames=49, height=480, width=832, **_WAN),
    },
    "3b": {
        "model": dict(latent_channels=48, num_blocks=6, shallow_width=2048, deep_width=3072,
                      deep_layers=24, head_dim=64, denoiser_layers=8, text_length=256,
                      text_width=2048, noise_std=0.5, pt_seq_len=32),
        "text": dict(encoder="t5"),
        "data": dict(frames=81, height=480, width=832, **_WAN),
    },
    # METHOD.md section 3: apple/ml-starflow configs/starflow-v_7B_t2v_caus_480p.yaml
    "7b": {
        "model": dict(latent_channels=48, patch_size=1, num_blocks=6, shallow_width=3072,
                      shallow_layers=2, deep_width=4096, deep_layers=24, head_dim=64,
                      denoiser_layers=8, denoiser_window=10, text_length=256, text_width=2048,
                      noise_std=0.5, soft_clip=4.0, pt_seq_len=32, recompute=True),
        "text": dict(encoder="t5", caption_dropout=0.1,
                     template="Noise Level {noise}:\nA video with {fps} fps:\n{caption}\n"),
        "data": dict(frames=81, height=480, width=832, fps=16, batch_size=2, **_WAN),
        "train": dict(lr=5e-5, min_lr=1e-6, grad_clip=1.0, skip_factor=1.0, dtype="bfloat16",
                      warmup_steps=1000, steps=100000, weight_decay=1e-4),
    },
}


def rope_axis_dims(head_dim: int, time_fraction: float) -> tuple[int, int, int]:
    """(row, col, time) RoPE dims of a head (models/rope.py); each must be a positive even
    number."""
    time = round(head_dim * time_fraction)
    side = (head_dim - time) // 2
    dims = (side, side, time)
    if sum(dims) != head_dim or any(d <= 0 or d % 2 for d in dims):
        raise ValueError(f"head_dim={head_dim} with time fraction {time_fraction} gives row/col/time "
                         f"dims {dims}; each must be even and positive and they must add up to "
                         f"head_dim (use a head_dim divisible by 8)")
    return dims


def _section_fields(section: str) -> dict[str, dataclasses.Field]:
    cls = type(getattr(Config(), section))
    return {f.name: f for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, current: Any) -> Any:
    """Convert a YAML/CLI value to the type of the field's default, or fail naming the key."""
    kind = type(current)
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: cannot parse {value!r}: {exc}") from None
        if kind is float and isinstance(value, str):
            # YAML 1.1 (PyYAML) reads exponent literals without a dot ("1e-3") as strings.
            try:
                value = float(value)
            except ValueError:
                pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if kind in (int, float, str) and not isinstance(value, kind):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _apply(cfg: Config, section: str, values: dict, origin: str) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r} (from {origin}); "
                          f"valid sections: {', '.join(SECTIONS)}")
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a mapping of keys (from {origin}), got {values!r}")
    fields = _section_fields(section)
    target = getattr(cfg, section)
    for key, value in values.items():
        if key not in fields:
            hint = (" (a config.json from another version of megatron_starflow: delete the key "
                    "to load it with this version's defaults)" if origin == "saved config" else "")
            raise ConfigError(f"unknown config key {section}.{key} (from {origin}){hint}; "
                              f"valid keys of {section}: {', '.join(sorted(fields))}")
        setattr(target, key, _coerce(f"{section}.{key}", value, getattr(target, key)))


def from_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    cfg = Config(preset=name)
    for section, values in PRESETS[name].items():
        _apply(cfg, section, values, f"preset {name}")
    return cfg


def parse_overrides(items: Iterable[str]) -> dict[str, dict[str, str]]:
    """``["model.deep_layers=6", ...]`` -> ``{"model": {"deep_layers": "6"}}``."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.key=value, "
                              f"e.g. model.deep_layers=6")
        key, value = item.split("=", 1)
        section, name = key.strip().split(".", 1)
        out.setdefault(section, {})[name] = value
    return out


def load_config(path: str | None = None, overrides: Iterable[str] = (), preset: str | None = None) -> Config:
    """Preset (from the YAML's ``preset:`` key, the argument, or ``tiny``) <- YAML <- overrides."""
    data: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            what = "is a folder" if os.path.isdir(path) else "does not exist"
            raise ConfigError(f"config file {path!r} {what}; pass an existing YAML such as "
                              f"examples/configs/tiny_cpu.yaml")
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f) or {}
            except UnicodeDecodeError:
                raise ConfigError(f"config file {path!r} is not UTF-8 text; save it as UTF-8") from None
            except yaml.YAMLError as exc:
                message = " ".join(str(exc).split())  # one line
                raise ConfigError(f"config file {path!r} is not valid YAML: {message}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of sections")
    data = copy.deepcopy(data)
    cfg = from_preset(preset or data.pop("preset", None) or "tiny")
    data.pop("preset", None)
    for section, values in data.items():
        _apply(cfg, section, values, path or "dict")
    for section, values in parse_overrides(overrides).items():
        _apply(cfg, section, values, "command line")
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a saved (resolved) config, e.g. from a checkpoint's config.json. A key this version
    does not know is an error naming it; a key the file lacks (written before the key existed)
    takes this version's default."""
    data = copy.deepcopy(data)
    cfg = Config(preset=data.pop("preset", "tiny"))
    for section, values in data.items():
        _apply(cfg, section, values, "saved config")
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as JSON (atomically: temp name, then rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _positive(cfg: Config, names: Iterable[str], allow_zero: Iterable[str] = ()) -> None:
    zero_ok = set(allow_zero)
    for dotted in names:
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value < 0 or (value == 0 and dotted not in zero_ok):
            need = ">= 0" if dotted in zero_ok else "> 0"
            raise ConfigError(f"{dotted} must be {need}, got {value}")


SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


def _finite(cfg: Config) -> None:
    """Every float key is a finite number (NaN passes every < / > check, so test it first)."""
    for section in SECTIONS:
        for key, f in _section_fields(section).items():
            value = getattr(getattr(cfg, section), key)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section}.{key} must be a finite number, got {value}")


def validate(cfg: Config) -> None:
    m, d, t, tr, p = cfg.model, cfg.data, cfg.text, cfg.train, cfg.parallel
    _finite(cfg)
    _positive(cfg, [
        "model.latent_channels", "model.patch_size", "model.num_blocks", "model.shallow_width",
        "model.shallow_layers", "model.deep_width", "model.deep_layers", "model.head_dim",
        "model.mlp_ratio", "model.text_width", "model.text_length", "model.soft_clip",
        "model.pt_seq_len", "model.denoiser_layers", "model.denoiser_window", "model.noise_std",
        "data.frames", "data.height", "data.width", "data.fps", "data.num_train_clips",
        "data.num_heldout_clips", "data.batch_size", "data.s2d_patch", "data.s2d_frames",
        "text.vocab_size", "text.width", "text.layers", "text.heads",
        "train.steps", "train.lr", "train.grad_clip", "train.skip_factor", "train.ckpt_every",
        "train.eval_every", "train.log_every", "train.eval_batches", "train.keep_checkpoints",
        "train.max_consecutive_skips", "model.rope_base", "train.min_lr", "train.warmup_steps",
        "train.weight_decay", "train.threads", "data.num_workers", "train.seed",
        "parallel.tp", "parallel.pp", "parallel.vpp", "parallel.cp",
    ], allow_zero=["train.seed", "model.attn_window", "model.denoiser_width", "model.fsm_weight",
                   "train.min_lr", "train.warmup_steps", "train.weight_decay",
                   "data.num_workers", "train.threads", "train.max_consecutive_skips"])
    for name in ("attn_window", "denoiser_width", "fsm_weight", "init_std"):
        if getattr(m, name) < 0:
            raise ConfigError(f"model.{name} must be >= 0, got {getattr(m, name)}")
    if tr.seed > SEED_MAX:
        raise ConfigError(f"train.seed must be in [0, 2^63 - 1], got {tr.seed}")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(tr, key) < 1.0:
            raise ConfigError(f"train.{key} must be in [0, 1), got {getattr(tr, key)}")
    if tr.min_lr > tr.lr:
        raise ConfigError(f"train.min_lr={tr.min_lr} exceeds train.lr={tr.lr}; the schedule decays "
                          f"from lr to min_lr")
    if p.dp != -1 and p.dp < 1:
        raise ConfigError(f"parallel.dp must be >= 1, or -1 (derived from the world size), got {p.dp}")
    try:
        t.template.format(caption="", noise=0, fps=0)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"text.template={t.template!r} is not a format string with the fields "
                          f"{{caption}}, {{noise}}, {{fps}} ({type(exc).__name__}: {exc})") from None
    if "{caption}" not in t.template:
        raise ConfigError(f"text.template={t.template!r} lacks {{caption}}: the model would never "
                          f"see the caption")
    if m.num_blocks < 1:
        raise ConfigError("model.num_blocks must be >= 1 (the deep block)")
    for width_key in ("shallow_width", "deep_width"):
        width = getattr(m, width_key)
        if width % m.head_dim:
            raise ConfigError(f"model.{width_key}={width} is not divisible by model.head_dim="
                              f"{m.head_dim}; choose a multiple of the head dim")
    if m.resolved_denoiser_width % m.head_dim:
        raise ConfigError(f"model.denoiser_width={m.resolved_denoiser_width} is not divisible by "
                          f"model.head_dim={m.head_dim}")
    try:
        rope_axis_dims(m.head_dim, m.rope_time_fraction)
    except ValueError as exc:
        raise ConfigError(f"model.head_dim / model.rope_time_fraction: {exc}") from None
    if not math.isfinite(m.denoiser_output_scale) or m.denoiser_output_scale == 0:
        raise ConfigError(f"model.denoiser_output_scale must be finite and non-zero, got "
                          f"{m.denoiser_output_scale}")
    if m.denoiser_lookahead not in ("first_layer", "every_layer"):
        raise ConfigError(f"model.denoiser_lookahead={m.denoiser_lookahead!r}; valid: first_layer, "
                          f"every_layer")
    if t.width % t.heads:
        raise ConfigError(f"text.width={t.width} is not divisible by text.heads={t.heads}")
    if t.encoder not in ("sentencepiece", "t5"):
        raise ConfigError(f"text.encoder={t.encoder!r}; valid: sentencepiece, t5")
    if t.encoder == "sentencepiece" and m.text_width != t.width:
        raise ConfigError(f"model.text_width={m.text_width} must equal text.width={t.width} for "
                          f"the sentencepiece encoder")
    if not 0.0 <= t.caption_dropout < 1.0:
        raise ConfigError(f"text.caption_dropout must be in [0, 1), got {t.caption_dropout}")
    if d.codec not in ("s2d", "wan"):
        raise ConfigError(f"data.codec={d.codec!r}; valid: s2d, wan")
    if not 0.0 < d.object_scale <= OBJECT_SCALE_MAX:
        raise ConfigError(f"data.object_scale must be in (0, {OBJECT_SCALE_MAX:.3g}] (the largest "
                          f"shape must fit the frame), got {d.object_scale}")
    if d.codec == "wan" and (d.frames - 1) % 4:
        raise ConfigError(f"data.frames={d.frames}: the Wan VAE makes 4k+1 frames (1, 5, 9, ..., "
                          f"17, 81); choose one of those")
    if d.codec == "s2d":
        fold = d.s2d_patch * m.patch_size
        for key in ("height", "width"):
            if getattr(d, key) % fold:
                raise ConfigError(f"data.{key}={getattr(d, key)} is not divisible by "
                                  f"data.s2d_patch * model.patch_size = {fold}")
        if d.frames % d.s2d_frames:
            raise ConfigError(f"data.frames={d.frames} is not divisible by data.s2d_frames="
                              f"{d.s2d_frames}")
        expected = 3 * d.s2d_patch**2 * d.s2d_frames
        if m.latent_channels != expected:
            raise ConfigError(f"model.latent_channels={m.latent_channels} but the s2d codec makes "
                              f"3 * s2d_patch^2 * s2d_frames = {expected} channels; set "
                              f"model.latent_channels={expected}")
    if d.source not in ("synthetic", "shards", "latent_shards"):
        raise ConfigError(f"data.source={d.source!r}; valid: synthetic, shards, latent_shards")
    if d.source == "latent_shards":
        if d.codec != "wan" or t.encoder != "t5":
            raise ConfigError(f"data.source=latent_shards trains from stored Wan latents and T5 "
                              f"embeddings, so it needs data.codec=wan and text.encoder=t5 (got "
                              f"{d.codec}, {t.encoder}); with the s2d codec or a trainable text "
                              f"encoder use data.source=shards (it reads pre-decoded clips too)")
        if not d.shards or not d.heldout_shards:
            raise ConfigError("data.source=latent_shards needs data.shards and data.heldout_shards: "
                              "folders of latent shards made by tools/prepare_data.py --latents "
                              "--config <this config> (the loop has no VAE or text encoder to "
                              "encode other held-out clips)")
    if d.source == "shards" and not d.shards:
        raise ConfigError("data.source=shards needs data.shards: a folder of .tar shards made by "
                          "tools/prepare_data.py (or a glob / comma-separated list)")
    if d.video_backend not in ("auto", "dali", "pyav"):
        raise ConfigError(f"data.video_backend={d.video_backend!r}; valid: auto, dali, pyav")
    if d.crop not in ("center", "random"):
        raise ConfigError(f"data.crop={d.crop!r}; valid: center, random")
    if d.clip_start not in ("random", "first"):
        raise ConfigError(f"data.clip_start={d.clip_start!r}; valid: random, first")
    if d.frame_stride < 1 or d.sample_fps < 0:
        raise ConfigError(f"data.frame_stride must be >= 1 and data.sample_fps >= 0, got "
                          f"{d.frame_stride}, {d.sample_fps}")
    if not 0.0 <= d.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction must be in [0, 1], got {d.max_bad_fraction}")
    if tr.dtype not in ("float32", "bfloat16", "float64"):
        raise ConfigError(f"train.dtype={tr.dtype!r}; valid: float32, bfloat16, float64")
    if not (math.isfinite(tr.ema_decay) and 0.0 <= tr.ema_decay < 1.0):
        raise ConfigError(f"train.ema_decay must be in [0, 1) (0 = no EMA), got {tr.ema_decay}")
    if tr.device.split(":", 1)[0] not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device={tr.device!r}; valid: auto, cpu, cuda (or cuda:N)")
    if p.micro_batches < 0:
        raise ConfigError(f"parallel.micro_batches must be >= 0 (0 = parallel.pp), got {p.micro_batches}")
    if p.pp > 1 and d.batch_size % (p.micro_batches or p.pp):
        raise ConfigError(f"data.batch_size={d.batch_size} is not divisible by the pipeline's "
                          f"micro-batches ({p.micro_batches or p.pp}: parallel.micro_batches, 0 = "
                          f"parallel.pp); change one of them")
    if tr.wandb_mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"train.wandb_mode={tr.wandb_mode!r}; valid: offline, online, disabled")
    if p.spec not in ("local", "te"):
        raise ConfigError(f"parallel.spec={p.spec!r}; valid: local, te")
    if p.fp8 not in ("none", "hybrid", "e4m3"):
        raise ConfigError(f"parallel.fp8={p.fp8!r}; valid: none, hybrid, e4m3")
    if p.fp8_recipe not in ("delayed", "tensorwise", "blockwise", "mxfp8"):
        raise ConfigError(f"parallel.fp8_recipe={p.fp8_recipe!r}; valid: delayed, tensorwise, "
                          f"blockwise, mxfp8")
    if p.fp8 != "none" and p.spec != "te":
        raise ConfigError(f"parallel.fp8={p.fp8} needs parallel.spec=te (FP8 runs in Transformer "
                          f"Engine layers)")
    if tr.peak_tflops < 0:
        raise ConfigError(f"train.peak_tflops must be >= 0 (0 = MFU not logged), got {tr.peak_tflops}")
    if tr.warmup_steps > tr.steps:
        raise ConfigError(f"train.warmup_steps={tr.warmup_steps} exceeds train.steps={tr.steps}")
    if not (math.isfinite(d.later_frames_scale) and d.later_frames_scale > 0):
        raise ConfigError(f"data.later_frames_scale must be a finite number > 0, got {d.later_frames_scale}")
    if not math.isfinite(m.noise_std):
        raise ConfigError("model.noise_std must be finite")
