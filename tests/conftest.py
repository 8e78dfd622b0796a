"""Shared fixtures: a one-rank megatron process group and tiny float64 STARFlow-V models.

Flow heads (and the denoiser head) start at zero, i.e. as the identity, so ``make_model`` randomises
``proj_out`` and ``final_norm.weight`` of every block and of the denoiser unless told not to:
otherwise invertibility, log-det and causality tests would pass trivially.
"""

import pytest
import torch

# Small enough for Jacobians on 2 CPU cores; head_dim 16 gives RoPE axis dims (6, 6, 4).
TINY_MODEL = dict(latent_channels=3, patch_size=1, num_blocks=3, shallow_width=32, shallow_layers=1,
                  deep_width=32, deep_layers=2, head_dim=16, text_width=8, text_length=3,
                  denoiser_layers=1, denoiser_width=0, denoiser_window=10, pt_seq_len=4.0,
                  noise_std=0.3, attn_window=0)


@pytest.fixture(scope="session")
def megatron_ready():
    from megatron_starflow.parallel.state import ensure_single_process

    ensure_single_process()
    return True


def randomize_heads(model, std: float = 0.2, seed: int = 1234) -> None:
    """Normal(0, std) into proj_out (weight, bias) and final_norm.weight of every block and the
    denoiser, so that the flow is no longer the identity."""
    gen = torch.Generator().manual_seed(seed)
    modules = list(model.blocks)
    if model.learnable_self_denoiser is not None:
        modules.append(model.learnable_self_denoiser)
    with torch.no_grad():
        for module in modules:
            for p in (module.proj_out.weight, module.proj_out.bias, module.final_norm.weight):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * std)


@pytest.fixture
def make_model(megatron_ready):
    """``make_model(seed=0, randomize=True, head_std=0.2, **ModelConfig overrides)`` -> float64
    StarFlowV in eval mode."""
    from megatron_starflow.config import ModelConfig
    from megatron_starflow.models.starflow import StarFlowV

    def build(seed: int = 0, randomize: bool = True, head_std: float = 0.2, **overrides):
        kwargs = dict(TINY_MODEL)
        kwargs.update(overrides)
        torch.manual_seed(seed)
        model = StarFlowV(ModelConfig(**kwargs)).double().eval()
        if randomize:
            randomize_heads(model, head_std, seed + 1234)
        return model

    return build


@pytest.fixture
def randn():
    """``randn(*shape, seed=0)`` -> float64 standard normal tensor from its own generator."""
    def draw(*shape, seed: int = 0):
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    return draw


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are dominated by per-op overhead; two OpenMP threads on a busy 2-core machine
    are up to 100x slower than one. Modules opt in with pytestmark = usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
