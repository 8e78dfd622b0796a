"""Noise-augmented NLL and flow-score matching (METHOD.md section 4): the FSM target equals
-sigma * grad of each sample's summed NLL (computed independently), the FSM loss is the MSE to it,
the flow gets no gradient from the FSM loss while the denoiser does, and bits/dim is the exact
Gaussian NLL per dimension in bits."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_starflow.models.noise import add_noise
from megatron_starflow.training import losses


def _inputs(model, batch=2, t=3, h=2, w=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, t, h, w, model.cfg.token_channels, generator=g, dtype=torch.float64)
    noisy = add_noise(x, model.cfg.noise_std, torch.Generator().manual_seed(seed + 1))
    text = torch.randn(batch, model.cfg.text_length, model.cfg.text_width, generator=g,
                       dtype=torch.float64)
    return noisy, text


def _independent_target(model, noisy, text):
    """-sigma * d(NLL_b)/dx_b, one sample at a time, NLL_b = nll_per_dim * D
    (= 0.5 ||z||^2 - sum logdet)."""
    rows = []
    for b in range(noisy.shape[0]):
        xb = noisy[b:b + 1].clone().requires_grad_(True)
        out = model(xb, text[b:b + 1])
        nll_sum = out.nll_per_dim() * out.dims
        direct = 0.5 * out.z.pow(2).sum() - torch.stack(out.logdets).sum()
        assert abs(nll_sum.item() - direct.item()) < 1e-9 * max(1.0, abs(direct.item()))
        (grad,) = torch.autograd.grad(nll_sum.sum(), xb)
        rows.append(-model.cfg.noise_std * grad)
    return torch.cat(rows)


def _flow_params(model):
    return {n: p for n, p in model.named_parameters() if not n.startswith("learnable_self_denoiser")}


def _denoiser_params(model):
    return dict(model.learnable_self_denoiser.named_parameters())


@pytest.mark.parametrize("loss_scale", [1.0, 0.25])
def test_fsm_target_is_scaled_score_of_summed_nll(make_model, monkeypatch, loss_scale):
    model = make_model()
    noisy, text = _inputs(model)
    captured = []
    original = losses.fsm_target

    def spy(*args, **kwargs):
        captured.append(original(*args, **kwargs))
        return captured[-1]

    monkeypatch.setattr(losses, "fsm_target", spy)
    model.zero_grad(set_to_none=True)
    step = losses.flow_and_fsm_backward(model, noisy, text, fsm_weight=1.0, loss_scale=loss_scale)
    assert len(captured) == 1
    target = captured[0]
    expected = _independent_target(model, noisy, text)
    assert expected.abs().max() > 1e-2
    assert ((target - expected).abs().max() / expected.abs().max()).item() < 1e-11
    # the reported FSM loss is the MSE between the denoiser's output and that target
    with torch.no_grad():
        pred = model.denoise_score(noisy, text)
    assert abs(step.fsm.item() - F.mse_loss(pred, expected).item()) < 1e-9 * step.fsm.item()
    # the reported flow loss is the batch mean of the per-dim NLL
    with torch.no_grad():
        out = model(noisy, text)
    assert abs(step.flow.item() - out.nll_per_dim().mean().item()) < 1e-12


def test_flow_gets_no_gradient_from_fsm(make_model, monkeypatch):
    model = make_model()
    noisy, text = _inputs(model, seed=3)
    flow, den = _flow_params(model), _denoiser_params(model)

    # reference: the flow loss alone
    model.zero_grad(set_to_none=True)
    model(noisy, text).nll_per_dim().mean().backward()
    ref = {n: p.grad.clone() for n, p in flow.items()}
    assert all(g.abs().max() > 0 for g in ref.values())
    assert all(p.grad is None for p in den.values())  # the flow loss does not reach the denoiser

    # snapshot of the flow's grads at the moment the denoiser runs (after the flow backward)
    snapshots = []
    original = model.denoise_score

    def spy(*args, **kwargs):
        snapshots.append({n: p.grad.clone() for n, p in flow.items()})
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "denoise_score", spy)
    grads = {}
    for weight in (0.0, 1e3):
        model.zero_grad(set_to_none=True)
        losses.flow_and_fsm_backward(model, noisy, text, fsm_weight=weight)
        grads[weight] = ({n: p.grad.clone() for n, p in flow.items()},
                         {n: None if p.grad is None else p.grad.clone() for n, p in den.items()})
    assert len(snapshots) == 2
    for weight, (flow_grads, den_grads) in grads.items():
        for n in flow:
            # unchanged by the denoiser's backward, and equal to the flow-only gradient
            assert torch.equal(flow_grads[n], snapshots[0 if weight == 0.0 else 1][n]), n
            assert torch.allclose(flow_grads[n], ref[n], rtol=1e-12, atol=1e-15), n
    # the denoiser learns from the FSM loss only: every one of its parameters gets a gradient
    for n, g in grads[1e3][1].items():
        assert g is not None and g.abs().max() > 0, n
    for n, g in grads[0.0][1].items():
        assert g is None or g.abs().max() == 0, n


def test_nll_and_bits_per_dim(make_model):
    model = make_model()
    noisy, text = _inputs(model, seed=5)
    with torch.no_grad():
        out = model(noisy, text)
    d = out.dims
    assert d == noisy[0].numel()
    logdet = torch.stack(out.logdets).sum(0)
    nll = 0.5 * out.z.flatten(1).pow(2).sum(1) - logdet
    assert torch.allclose(out.nll_per_dim() * d, nll, rtol=1e-12, atol=1e-12)
    bpd = out.bits_per_dim()
    assert torch.allclose(bpd, (out.nll_per_dim() + 0.5 * math.log(2 * math.pi)) / math.log(2),
                          rtol=1e-12, atol=1e-12)
    # exact change-of-variables NLL with the full Gaussian log-density
    log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(out.z).flatten(1).sum(1)
    exact_bits = -(log_pz + logdet) / (d * math.log(2))
    assert torch.allclose(bpd, exact_bits, rtol=1e-12, atol=1e-12)
    step = losses.flow_and_fsm_backward(model, noisy, text)
    assert abs(step.bits_per_dim.item() - bpd.mean().item()) < 1e-12


def test_add_noise_and_fsm_target_scale():
    x = torch.zeros(4, 2, 3, dtype=torch.float64)
    noisy = add_noise(x, 0.5, torch.Generator().manual_seed(0))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(noisy, 0.5 * eps)
    g = torch.randn(4, 2, 3, dtype=torch.float64)
    assert torch.equal(losses.fsm_target(g, 10.0, 0.5), -0.5 * g * 10.0)
