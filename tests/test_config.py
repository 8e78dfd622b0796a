"""Config: presets, YAML + ``section.key=value`` overrides with type coercion, errors that name the
offending key, save/load round trip, and the 7B preset's parameter count (built on the meta
device: METHOD.md section 3 gives about 6.9 B)."""

import json

import pytest
import torch

from megatron_starflow.config import (PRESETS, Config, ConfigError, config_from_dict, from_preset,
                                      load_config, parse_overrides, save_config, validate)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_load_and_validate(name):
    cfg = load_config(preset=name)
    assert cfg.preset == name
    validate(cfg)
    for section, values in PRESETS[name].items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value


def test_default_is_tiny():
    assert load_config() == from_preset("tiny") == Config(preset="tiny")


def test_7b_preset_values():
    m = from_preset("7b").model
    assert (m.shallow_width, m.deep_width, m.head_dim, m.deep_layers, m.shallow_layers) == \
        (3072, 4096, 64, 24, 2)
    assert (m.num_blocks, m.latent_channels, m.text_length, m.noise_std, m.soft_clip) == \
        (6, 48, 256, 0.5, 4.0)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: small\n"
                    "model:\n  deep_layers: 3\n  noise_std: 0.2\n  recompute: yes\n"
                    "train:\n  lr: 5e-5\n  steps: 40\n  warmup_steps: 4\n")
    cfg = load_config(str(path), ["model.noise_std=0.25", "train.steps=50", "model.attn_window=2",
                                  "train.out_dir=runs/x", "model.reverse_even_blocks=false",
                                  "train.min_lr=1e-6", "model.soft_clip=3"])
    assert cfg.preset == "small"
    assert cfg.model.deep_width == 256  # from the preset
    assert cfg.model.deep_layers == 3 and cfg.model.recompute is True  # from the file
    assert cfg.train.lr == 5e-5 and isinstance(cfg.train.lr, float)  # "5e-5" parsed as float
    assert cfg.model.noise_std == 0.25 and cfg.train.steps == 50  # overrides beat the file
    assert isinstance(cfg.train.steps, int) and isinstance(cfg.model.attn_window, int)
    assert cfg.model.soft_clip == 3.0 and isinstance(cfg.model.soft_clip, float)  # int -> float
    assert cfg.train.out_dir == "runs/x" and cfg.model.reverse_even_blocks is False
    assert cfg.train.min_lr == 1e-6
    # the preset argument wins over the file's preset key
    assert load_config(str(path), preset="tiny").model.deep_width == from_preset("tiny").model.deep_width


@pytest.mark.parametrize("text,value", [("true", True), ("True", True), ("1", True), ("yes", True),
                                        ("on", True), ("false", False), ("0", False), ("no", False),
                                        ("OFF", False)])
def test_bool_parsing(text, value):
    assert load_config(overrides=[f"model.recompute={text}"]).model.recompute is value


@pytest.mark.parametrize("override,key", [
    ("model.bogus=1", "model.bogus"),
    ("model.recompute=maybe", "model.recompute"),
    ("model.deep_layers=abc", "model.deep_layers"),
    ("model.deep_layers=1.5", "model.deep_layers"),
    ("model.noise_std=abc", "model.noise_std"),
    ("model.deep_width=-1", "model.deep_width"),
    ("model.deep_width=100", "model.deep_width"),  # not divisible by head_dim 32
    ("model.shallow_width=48", "model.shallow_width"),
    ("model.latent_channels=5", "model.latent_channels"),  # s2d codec makes 12 channels
    ("model.head_dim=12", "model.head_dim"),
    ("train.dtype=float16", "train.dtype"),
])
def test_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


def test_unknown_section_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="unknown config section 'bogus'"):
        load_config(overrides=["bogus.x=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(overrides=["deep_layers=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["model.deep_layers"])
    assert parse_overrides(["model.a=1", "train.b=x=y"]) == {"model": {"a": "1"}, "train": {"b": "x=y"}}


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  bogus: 3\n")
    with pytest.raises(ConfigError, match=r"model\.bogus"):
        load_config(str(bad))
    bad.write_text("nothing: {}\n")
    with pytest.raises(ConfigError, match="unknown config section 'nothing'"):
        load_config(str(bad))
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="huge")


def test_s2d_latent_channels_mismatch():
    with pytest.raises(ConfigError, match=r"model\.latent_channels=12 .*= 48"):
        load_config(overrides=["data.s2d_patch=4"])
    cfg = load_config(overrides=["data.s2d_patch=4", "model.latent_channels=48"])
    assert cfg.model.latent_channels == 48


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(preset="small", overrides=["model.attn_window=3", "train.lr=3e-4",
                                                 "text.template=Noise {noise}: {caption}"])
    path = tmp_path / "config.json"
    save_config(cfg, str(path))
    data = json.loads(path.read_text())
    assert data["preset"] == "small" and data["model"]["attn_window"] == 3
    again = config_from_dict(data)
    assert again == cfg
    assert not list(tmp_path.glob("*.tmp*"))  # the temporary file was renamed away
    with pytest.raises(ConfigError, match=r"model\.bogus"):
        config_from_dict({**data, "model": {**data["model"], "bogus": 1}})


def test_7b_parameter_count_on_meta(megatron_ready):
    from megatron_starflow.models.starflow import StarFlowV, count_parameters

    cfg = from_preset("7b")
    with torch.device("meta"):
        model = StarFlowV(cfg.model)
    assert all(p.device.type == "meta" for p in model.parameters())
    parts = count_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    assert parts["total"] == total
    assert abs(total - 6.9e9) <= 0.03 * 6.9e9, total
    # METHOD.md's breakdown: 24*12*4096^2 deep, 10*12*3072^2 shallow, 8*12*3072^2 denoiser
    assert abs(parts["deep"] - 24 * 12 * 4096**2) < 0.01 * parts["deep"]
    assert abs(parts["shallow"] - 10 * 12 * 3072**2) < 0.01 * parts["shallow"]
    assert abs(parts["denoiser"] - 8 * 12 * 3072**2) < 0.01 * parts["denoiser"]
