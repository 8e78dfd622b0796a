"""Checks of a state dict against a model and its config, listing every problem (not the first).

``check_config_against_weights`` reads the sizes a state dict implies (in our parameter names) and
names each config field that disagrees, with the tensor that shows it, e.g.
``model.deep_width=4096 but blocks.5.proj_in.weight has shape [3072, 48]``.
``check_state_dict`` then compares names and shapes with a built model: missing keys, unexpected
keys and shape mismatches, all of them.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from megatron_starflow.config import ModelConfig


class StateDictMismatch(ValueError):
    """A state dict does not fit the model: the message lists every missing / unexpected / misshapen
    key; the lists are also attributes."""

    def __init__(self, what: str, missing: list[str], unexpected: list[str],
                 shapes: list[tuple[str, tuple, tuple]]):
        self.missing, self.unexpected, self.shapes = missing, unexpected, shapes
        lines = [f"{what} does not match the model:"]
        if missing:
            lines.append(f"  {len(missing)} missing key(s):")
            lines += [f"    {k}" for k in missing]
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected key(s):")
            lines += [f"    {k}" for k in unexpected]
        if shapes:
            lines.append(f"  {len(shapes)} shape mismatch(es) (weights vs model):")
            lines += [f"    {k}: {list(got)} vs {list(want)}" for k, got, want in shapes]
        super().__init__("\n".join(lines))


class ConfigWeightsMismatch(ValueError):
    """Config fields that disagree with the weights; one line per field."""

    def __init__(self, what: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"the config of {what} disagrees with its weights:\n" +
                         "\n".join(f"  {p}" for p in problems))


def tensor_keys(module: nn.Module) -> dict[str, tuple]:
    """Name -> shape of every tensor in ``module.state_dict()`` (megatron's ``_extra_state``
    entries, None without Transformer Engine, are not tensors and are left out)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if torch.is_tensor(v)}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Name -> shape of every tensor of ``StarFlowV(cfg)`` (TP = 1), computed without building it
    (the 7B model would take 28 GB in fp32). tests/test_import_ml_starflow.py checks it against a
    built model."""
    c = cfg.token_channels
    out: dict[str, tuple] = {}

    def stack(prefix: str, width: int, layers: int) -> None:
        hidden = cfg.mlp_ratio * width
        for j in range(layers):
            p = f"{prefix}.transformer.block.layers.{j}."
            out.update({
                p + "input_layernorm.weight": (width,), p + "input_layernorm.bias": (width,),
                p + "self_attention.linear_proj.weight": (width, width),
                p + "self_attention.linear_proj.bias": (width,),
                p + "self_attention.linear_qkv.weight": (3 * width, width),
                p + "self_attention.linear_qkv.bias": (3 * width,),
                p + "pre_mlp_layernorm.weight": (width,), p + "pre_mlp_layernorm.bias": (width,),
                p + "mlp.linear_fc1.weight": (hidden, width), p + "mlp.linear_fc1.bias": (hidden,),
                p + "mlp.linear_fc2.weight": (width, hidden), p + "mlp.linear_fc2.bias": (width,),
            })

    for i in range(cfg.num_blocks):
        deep = i == cfg.num_blocks - 1
        width = cfg.deep_width if deep else cfg.shallow_width
        p = f"blocks.{i}."
        out[p + "sos_embed"] = (1, 1, c)
        out[p + "proj_in.weight"], out[p + "proj_in.bias"] = (width, c), (width,)
        if deep:
            out[p + "proj_txt.weight"], out[p + "proj_txt.bias"] = (width, cfg.text_width), (width,)
        stack(f"blocks.{i}", width, cfg.deep_layers if deep else cfg.shallow_layers)
        out[p + "final_norm.weight"] = (width,)
        out[p + "proj_out.weight"], out[p + "proj_out.bias"] = (2 * c, width), (2 * c,)
    if cfg.use_denoiser:
        width, p = cfg.resolved_denoiser_width, "learnable_self_denoiser."
        out[p + "proj_in.weight"], out[p + "proj_in.bias"] = (width, c), (width,)
        out[p + "proj_txt.weight"], out[p + "proj_txt.bias"] = (width, cfg.text_width), (width,)
        stack("learnable_self_denoiser", width, cfg.denoiser_layers)
        out[p + "final_norm.weight"] = (width,)
        out[p + "proj_out.weight"], out[p + "proj_out.bias"] = (c, width), (c,)
    return out


def check_shapes(want: dict[str, tuple], state: dict[str, torch.Tensor], what: str) -> None:
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [(k, tuple(state[k].shape), want[k]) for k in want
              if k in state and tuple(state[k].shape) != want[k]]
    if missing or unexpected or shapes:
        raise StateDictMismatch(what, missing, unexpected, shapes)


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    check_shapes(tensor_keys(module), state, what)


def load_checked(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Check names and shapes (all problems at once), then load strictly; non-tensor entries of the
    module's own state dict (megatron ``_extra_state``) are taken from the module."""
    check_state_dict(module, state, what)
    full = dict(state)
    for k, v in module.state_dict().items():
        if not torch.is_tensor(v):
            full[k] = v
    module.load_state_dict(full, strict=True)


_LAYER = re.compile(r"^(.*)\.transformer\.block\.layers\.(\d+)\.")


def _layers(state: dict, prefix: str) -> int | None:
    found = [int(m.group(2)) for k in state if (m := _LAYER.match(k)) and m.group(1) == prefix]
    return max(found) + 1 if found else None


def _shape(state: dict, key: str) -> list[int] | None:
    return list(state[key].shape) if key in state else None


def implied_sizes(state: dict[str, torch.Tensor]) -> list[tuple[str, object, str]]:
    """(config field, value the weights imply, evidence) for every size the weights determine."""
    out: list[tuple[str, object, str]] = []
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k))})
    if not blocks:
        return out
    k = blocks[-1] + 1
    out.append(("model.num_blocks", k, f"the weights hold blocks 0..{k - 1}"))
    deep = f"blocks.{k - 1}"

    def shape_of(key, dim, field, transform=lambda v: v):
        s = _shape(state, key)
        if s is not None:
            out.append((field, transform(s[dim]), f"{key} has shape {s}"))

    shape_of("blocks.0.proj_in.weight", 1, "model.latent_channels * model.patch_size^2")
    if k > 1:
        shape_of("blocks.0.proj_in.weight", 0, "model.shallow_width")
        layers = _layers(state, "blocks.0")
        if layers is not None:
            out.append(("model.shallow_layers", layers, f"blocks.0 has {layers} transformer layer(s)"))
        shape_of("blocks.0.transformer.block.layers.0.mlp.linear_fc1.weight", 0, "model.mlp_ratio",
                 lambda v: v // state["blocks.0.proj_in.weight"].shape[0])
    shape_of(f"{deep}.proj_in.weight", 0, "model.deep_width")
    layers = _layers(state, deep)
    if layers is not None:
        out.append(("model.deep_layers", layers, f"{deep} has {layers} transformer layer(s)"))
    shape_of(f"{deep}.proj_txt.weight", 1, "model.text_width")
    has_denoiser = any(key.startswith("learnable_self_denoiser.") for key in state)
    out.append(("model.use_denoiser", has_denoiser,
                "the weights " + ("hold" if has_denoiser else "hold no") + " learnable_self_denoiser.*"))
    if has_denoiser:
        shape_of("learnable_self_denoiser.proj_in.weight", 0, "model.denoiser_width (0 = shallow_width)")
        layers = _layers(state, "learnable_self_denoiser")
        if layers is not None:
            out.append(("model.denoiser_layers", layers,
                        f"learnable_self_denoiser has {layers} transformer layer(s)"))
    return out


def _config_value(cfg: ModelConfig, field: str):
    if field == "model.latent_channels * model.patch_size^2":
        return cfg.token_channels, (f"model.latent_channels * model.patch_size^2 = "
                                    f"{cfg.latent_channels} * {cfg.patch_size}^2 = {cfg.token_channels}")
    if field == "model.denoiser_width (0 = shallow_width)":
        return cfg.resolved_denoiser_width, f"model.denoiser_width={cfg.resolved_denoiser_width}"
    name = field.split(".", 1)[1]
    value = getattr(cfg, name)
    return value, f"{field}={value}"


def check_config_against_weights(cfg: ModelConfig, state: dict[str, torch.Tensor], what: str) -> None:
    problems = []
    for field, implied, evidence in implied_sizes(state):
        value, shown = _config_value(cfg, field)
        if value != implied:
            problems.append(f"{shown} but {evidence}")
    if problems:
        raise ConfigWeightsMismatch(what, problems)
