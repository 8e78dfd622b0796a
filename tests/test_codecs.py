"""Codec tests: exact s2d inversion and channel order, dequantisation bound, Wan VAE wrapper shapes/errors."""
import math
import os

import pytest
import torch
from helpers_codecs import TINY_Z_DIM, make_tiny_wan_vae

from megatron_starflow.models.codecs import (
    LatentCodec, SpaceToDepthCodec, WanVAECodec, build_codec, pixels_to_float)


def _rand_video(b=2, t=4, h=8, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t, h, w, 3), generator=g, dtype=torch.uint8)


# ---------------------------------------------------------------- space-to-depth

@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("deq", [False, True])
def test_s2d_round_trip(k, deq):
    codec = SpaceToDepthCodec(patch=2, frames_per_token=k)
    x = _rand_video()
    z = codec.encode(x, generator=torch.Generator().manual_seed(1), dequantize=deq)
    assert tuple(z.shape[1:]) == codec.latent_shape(4, 8, 6) == (4 // k, 4, 3, 12 * k)
    y = codec.decode(z)
    assert torch.equal(codec.to_uint8(y), x)
    # The fold itself is exact on floats too.
    assert torch.equal(codec.encode(y), z)
    if not deq:
        assert torch.equal(y, (x.float() + 0.5) / 128 - 1)


def test_dequantisation_noise_edge_values():
    # u just below 1 on the top pixel value must not spill into the next bin.
    x = torch.full((1, 1, 2, 2, 3), 255, dtype=torch.uint8)
    x[..., 0] = 0
    u = torch.full(x.shape, 1.0 - 2 ** -24)
    y = pixels_to_float(x, u)
    assert torch.equal(LatentCodec.to_uint8(y), x) and y.max() < 1.0
    codec = SpaceToDepthCodec()
    z = codec.encode(_rand_video(), noise=torch.full((2, 4, 8, 6, 3), 1.0 - 2 ** -24))
    assert torch.equal(codec.to_uint8(codec.decode(z)), _rand_video())
    # Exhaustive: every pixel value with u at 0 and at the largest values torch.rand can return.
    allx = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16, 1).expand(1, 1, 16, 16, 3).contiguous()
    for u in (0.0, 1.0 - 2 ** -23, 1.0 - 2 ** -24):
        y = pixels_to_float(allx, torch.full(allx.shape, u))
        assert torch.equal(LatentCodec.to_uint8(y), allx) and y.min() >= -1 and y.max() < 1


def test_dequantisation_is_random_and_reproducible():
    codec = SpaceToDepthCodec(dequantize=True)
    x = _rand_video()
    a = codec.encode(x, generator=torch.Generator().manual_seed(3))
    b = codec.encode(x, generator=torch.Generator().manual_seed(3))
    c = codec.encode(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_s2d_channel_order():
    # Pixel value encodes its own (t, h, w, rgb) coordinates so each channel can be identified.
    t, h, w = 2, 2, 2
    vid = torch.zeros(1, t, h, w, 3)
    for ti in range(t):
        for hi in range(h):
            for wi in range(w):
                for c in range(3):
                    vid[0, ti, hi, wi, c] = 1000 * ti + 100 * hi + 10 * wi + c
    z = SpaceToDepthCodec(patch=2, frames_per_token=2).encode(vid)
    assert z.shape == (1, 1, 1, 1, 24)
    expected = [1000 * kt + 100 * p1 + 10 * p2 + c
                for kt in range(2) for p1 in range(2) for p2 in range(2) for c in range(3)]
    assert z.flatten().tolist() == expected
    # Tokens: raster order over (h', w') with w' fastest is just the latent layout.
    vid2 = torch.arange(4 * 4 * 3, dtype=torch.float32).reshape(1, 1, 4, 4, 3)
    z2 = SpaceToDepthCodec(patch=2).encode(vid2)
    assert z2[0, 0, 0, 1, :3].tolist() == vid2[0, 0, 0, 2].tolist()
    assert z2[0, 0, 1, 0, :3].tolist() == vid2[0, 0, 2, 0].tolist()


def test_s2d_latent_shape_errors():
    codec = SpaceToDepthCodec(patch=4, frames_per_token=2)
    with pytest.raises(ValueError, match="frames=3"):
        codec.latent_shape(3, 8, 8)
    with pytest.raises(ValueError, match="height=6.*multiple of the spatial factor 4"):
        codec.latent_shape(2, 6, 8)
    with pytest.raises(ValueError, match="width=10"):
        codec.latent_shape(2, 8, 10)
    with pytest.raises(ValueError):
        codec.encode(torch.zeros(1, 2, 8, 10, 3, dtype=torch.uint8))


def test_bits_per_dim_offset_and_bound():
    off = SpaceToDepthCodec.bits_per_dim_offset()
    assert off == pytest.approx(math.log2(128)) and off == pytest.approx(7.0)
    assert SpaceToDepthCodec.log_det_per_dim() == pytest.approx(-off * math.log(2))
    # Uniform density on [-1, 1]: continuous NLL = log2(2) = 1 bit/dim, bound = 8 = exact for uniform pixels.
    assert 1.0 + off == pytest.approx(math.log2(256))
    # Gaussian density on y: exact discrete bin mass vs. E_u[-log2 p(y)] + 7, for every pixel value.
    mu, s = 0.1, 0.3
    x = torch.arange(256, dtype=torch.float64)
    a, b = x / 128 - 1, (x + 1) / 128 - 1
    cdf = lambda v: 0.5 * (1 + torch.erf((v - mu) / (s * math.sqrt(2))))  # noqa: E731
    discrete = -torch.log2(cdf(b) - cdf(a))
    # E over y ~ U[a, b] of (y - mu)^2 = ((b-mu)^3 - (a-mu)^3) / (3 (b - a)).
    e_sq = ((b - mu) ** 3 - (a - mu) ** 3) / (3 * (b - a))
    continuous = (e_sq / (2 * s * s) + math.log(s * math.sqrt(2 * math.pi))) / math.log(2)
    assert torch.all(discrete <= continuous + off + 1e-9)
    # Tight where the density is nearly flat over a bin (the middle of the range).
    assert (continuous + off - discrete)[140] < 1e-3


def test_build_codec():
    assert isinstance(build_codec("s2d", patch=1), SpaceToDepthCodec)
    with pytest.raises(ValueError, match="unknown codec kind 'vqgan'.*s2d.*wan"):
        build_codec("vqgan")


# ---------------------------------------------------------------- Wan VAE

@pytest.fixture(scope="module")
def tiny_wan_dir(tmp_path_factory):
    return make_tiny_wan_vae(tmp_path_factory.mktemp("tiny_wan") / "vae")


def test_wan_codec_shapes(tiny_wan_dir):
    codec = build_codec("wan", path=tiny_wan_dir)
    assert (codec.temporal_factor, codec.spatial_factor, codec.channels) == (4, 4, TINY_Z_DIM)
    assert codec.lossless is False
    assert not any(p.requires_grad for p in codec.parameters())
    codec.train()
    assert not codec.vae.training
    x = _rand_video(b=2, t=5, h=16, w=16)
    z = codec.encode(x)
    assert tuple(z.shape) == (2, *codec.latent_shape(5, 16, 16)) == (2, 2, 4, 4, TINY_Z_DIM)
    assert torch.equal(z, codec.encode(x))  # posterior mean: deterministic
    y = codec.decode(z)
    assert y.shape == (2, 5, 16, 16, 3) and y.min() >= -1 and y.max() <= 1
    assert codec.to_uint8(y).dtype == torch.uint8


def test_wan_normalisation_matches_raw_vae(tiny_wan_dir):
    codec = WanVAECodec(tiny_wan_dir)
    x = torch.rand(1, 5, 8, 8, 3) * 2 - 1
    raw = codec.vae.encode(x.permute(0, 4, 1, 2, 3)).latent_dist.mean.permute(0, 2, 3, 4, 1)
    mean = torch.tensor(codec.vae.config.latents_mean)
    std = torch.tensor(codec.vae.config.latents_std)
    torch.testing.assert_close(codec.encode(x), (raw - mean) / std)
    dec = codec.vae.decode(raw.permute(0, 4, 1, 2, 3)).sample.permute(0, 2, 3, 4, 1)
    torch.testing.assert_close(codec.decode(codec.encode(x)), dec, atol=1e-5, rtol=1e-5)


def test_wan_pipeline_root_accepted(tiny_wan_dir):
    root = os.path.dirname(tiny_wan_dir)  # .../tiny_wanN/ containing vae/
    assert WanVAECodec(root).channels == TINY_Z_DIM


def test_wan_errors(tiny_wan_dir, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope.*config.json"):
        WanVAECodec(missing)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        WanVAECodec(str(tmp_path))
    codec = WanVAECodec(tiny_wan_dir)
    with pytest.raises(ValueError, match="frames=4.*1 mod 4"):
        codec.latent_shape(4, 16, 16)
    with pytest.raises(ValueError, match="frames=6"):
        codec.encode(torch.zeros(1, 6, 16, 16, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="height=10.*spatial factor 4"):
        codec.latent_shape(5, 10, 16)
