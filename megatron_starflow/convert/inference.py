"""The inference folder: what a person who did not train the model needs to sample from it.

    DIR/config.json                      resolved Config (as saved with every checkpoint)
    DIR/model.safetensors                weights, or, above --max-shard-size:
    DIR/model-00001-of-0000N.safetensors + DIR/model.safetensors.index.json
    DIR/tokenizer/spm.model              only for the sentencepiece text encoder

Tensor names are the model's own (``blocks.0.proj_in.weight``, ``learnable_self_denoiser.*``;
the authors' top-level names) plus ``text_encoder.*`` for a trainable text encoder. No optimizer,
no RNG, no torch.distributed state: the folder is the same whatever TP/PP/DP trained the model.
Building the model still needs megatron-core (the stacks are megatron TransformerBlocks); the T5
encoder and the Wan VAE are read from the local folders named in config.json (text.path,
data.codec_path), not copied.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch

from megatron_starflow.config import Config, config_from_dict, save_config

FORMAT = "megatron_starflow-inference-v1"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp64": torch.float64, "float64": torch.float64}  # fp64: exact round trips in tests


def parse_size(text: str | int | None) -> int | None:
    """'5GB', '500MB', '64KB', '1000' (bytes) -> bytes; None / '0' -> no sharding."""
    if text is None:
        return None
    if isinstance(text, int):
        return text or None
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?i?B?)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or 1000000")
    unit = (m.group(2) or "").upper().replace("I", "").rstrip("B")
    factor = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]
    size = int(float(m.group(1)) * factor)
    return size or None


def temp_sibling(out_dir: str) -> str:
    """An empty temporary folder beside ``out_dir`` (same file system): an export is written
    there and renamed to ``out_dir`` when complete, so nothing half-written is ever read."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp_{os.path.basename(out_dir)}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def is_inference_folder(path: str) -> bool:
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))
            and (os.path.isfile(os.path.join(path, SINGLE)) or os.path.isfile(os.path.join(path, INDEX))))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def save_inference_folder(out_dir: str, cfg: Config, tensors: dict[str, torch.Tensor],
                          dtype: str = "fp32", max_shard_size: str | int | None = None,
                          tokenizer_file: str | None = None, metadata: dict | None = None) -> list[str]:
    """Write the folder (atomically: a temporary sibling renamed at the end); -> weight files.
    Floating tensors are cast to ``dtype``; others are kept."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}; valid: fp32, bf16, fp16, fp64")
    target = DTYPES[dtype]
    limit = parse_size(max_shard_size)
    out_dir = os.path.abspath(out_dir)
    tmp = temp_sibling(out_dir)
    prepared = {}
    for name, t in tensors.items():
        if not torch.is_tensor(t):
            continue
        t = t.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(target)
        prepared[name] = t.contiguous().clone()  # own storage: safetensors refuses shared tensors
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in prepared.items():
        if limit and shards[-1] and size + _nbytes(t) > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += _nbytes(t)
    meta = {"format": FORMAT, "dtype": dtype}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    files = []
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, SINGLE), metadata=meta)
        files.append(SINGLE)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, fname), metadata=meta)
            files.append(fname)
            weight_map.update({k: fname for k in shard})
        index = {"metadata": {**meta, "total_size": sum(_nbytes(t) for t in prepared.values())},
                 "weight_map": weight_map}
        with open(os.path.join(tmp, INDEX), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    save_config(cfg, os.path.join(tmp, "config.json"))
    if tokenizer_file:
        os.makedirs(os.path.join(tmp, "tokenizer"))
        shutil.copy(tokenizer_file, os.path.join(tmp, "tokenizer", "spm.model"))
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return files


def read_tensors(folder: str) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors of an inference folder (single file or sharded) and the file metadata."""
    from safetensors import safe_open

    index_path = os.path.join(folder, INDEX)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            index = json.load(f)
        files = sorted(set(index["weight_map"].values()))
        absent = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if absent:
            raise FileNotFoundError(f"{folder}: the index names shard file(s) that are missing: "
                                    f"{', '.join(absent)}")
    else:
        files, index = [SINGLE], None
    tensors, meta = {}, {}
    for fname in files:
        with safe_open(os.path.join(folder, fname), framework="pt") as f:
            meta = f.metadata() or meta
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    if index is not None:
        listed, stored = set(index["weight_map"]), set(tensors)
        if listed != stored:
            raise ValueError(f"{folder}: {INDEX} and the shard files disagree: listed but not stored "
                             f"{sorted(listed - stored)}, stored but not listed {sorted(stored - listed)}")
    return tensors, meta


def read_config(folder: str) -> Config:
    with open(os.path.join(folder, "config.json")) as f:
        cfg = config_from_dict(json.load(f))
    spm = os.path.join(folder, "tokenizer", "spm.model")
    if cfg.text.encoder == "sentencepiece" and os.path.isfile(spm):
        cfg.text.path = spm
    # External folders may be given relative to the inference folder.
    for section, key in (("text", "path"), ("data", "codec_path")):
        value = getattr(getattr(cfg, section), key)
        if value and not os.path.isabs(value) and os.path.exists(os.path.join(folder, value)):
            setattr(getattr(cfg, section), key, os.path.join(folder, value))
    return cfg


def split_state(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """-> (model tensors, text-encoder tensors without their ``text_encoder.`` prefix)."""
    model = {k: v for k, v in tensors.items() if not k.startswith("text_encoder.")}
    text = {k[len("text_encoder."):]: v for k, v in tensors.items() if k.startswith("text_encoder.")}
    return model, text


def load_inference_model(folder: str, dtype: torch.dtype = torch.float32):
    """-> (config, StarFlowV with the folder's weights, metadata): the flow alone, without the text
    encoder and codec (which need their own folders)."""
    from megatron_starflow.convert.checks import check_config_against_weights, load_checked
    from megatron_starflow.models.starflow import StarFlowV
    from megatron_starflow.parallel.state import ensure_single_process

    cfg = read_config(folder)
    tensors, meta = read_tensors(folder)
    model_state, _ = split_state(tensors)
    check_config_against_weights(cfg.model, model_state, folder)
    ensure_single_process()
    model = StarFlowV(cfg.model, parallel=cfg.parallel).to(dtype)
    load_checked(model, {k: v.to(dtype) if v.is_floating_point() else v for k, v in model_state.items()},
                 f"the weights of {folder}")
    model.eval()
    return cfg, model, meta


def load_inference_system(folder: str, dtype: torch.dtype = torch.float32):
    """-> (config, StarFlowSystem in eval mode, metadata). Weights stored in bf16 are cast up to
    ``dtype`` (fp32 by default) when loaded."""
    from megatron_starflow.convert.checks import check_config_against_weights, load_checked
    from megatron_starflow.parallel.state import ensure_single_process
    from megatron_starflow.models.system import StarFlowSystem

    cfg = read_config(folder)
    tensors, meta = read_tensors(folder)
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    model_state, text_state = split_state(tensors)
    check_config_against_weights(cfg.model, model_state, folder)
    ensure_single_process()
    system = StarFlowSystem(cfg, folder).to(dtype)
    load_checked(system.model, model_state, f"the weights of {folder}")
    if system.text_encoder.trainable:
        load_checked(system.text_encoder, text_state,
                     f"the text-encoder weights (text_encoder.*) of {folder}")
    elif text_state:
        raise ValueError(f"{folder} holds text_encoder.* weights but config.json says "
                         f"text.encoder={cfg.text.encoder!r} (frozen, loaded from text.path)")
    system.eval()
    return cfg, system, meta
