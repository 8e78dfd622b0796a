"""Held-out evaluation inside the loop. Where the rank holds the whole model (no PP or CP) it is the
full ``evaluation.likelihood.evaluate`` (bits/dim, pixel bits/dim, denoiser PSNR); under pipeline
or context parallelism the model is split, so the loop reports the held-out bits/dim through the
layout's forward-only pass, on the same fixed clips with fixed noise."""

from __future__ import annotations

import torch

from megatron_starflow.config import Config
from megatron_starflow.training.layout import ProcessLayout
from megatron_starflow.training.step import bits_per_dim


@torch.no_grad()
def evaluate_heldout(system, step_runner, dataset, cfg: Config, layout: ProcessLayout,
                     seed: int = 1234) -> dict:
    batches, batch_size = cfg.train.eval_batches, cfg.data.batch_size
    if layout.pp_size == 1 and layout.cp_size == 1:
        from megatron_starflow.evaluation.likelihood import evaluate

        return evaluate(system, dataset, batches=batches, batch_size=batch_size, seed=seed)
    from megatron_starflow.data.collate import collate
    from megatron_starflow.models.noise import add_noise

    was_training = system.training
    system.eval()
    # A CPU generator, as in ``evaluate``: the same held-out noise on any device.
    gen = torch.Generator().manual_seed(seed)
    n = min(len(dataset), batches * batch_size)
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        batch = collate([dataset[i] for i in range(start, min(n, start + batch_size))])
        text = system.batch_text(batch)
        clean = system.batch_tokens(batch, dequantize=False)
        nll = step_runner.nll(add_noise(clean, cfg.model.noise_std, gen), text)
        if nll is not None:
            total += float(nll.double().sum())
            count += nll.shape[0]
    mean = layout.replica_values({"nll": total / count if count else None})["nll"]
    system.train(was_training)
    return {"bits_per_dim": bits_per_dim(mean),
            "bits_per_dim_kind": f"noisy latent tokens (sigma={cfg.model.noise_std}), continuous density",
            "clips": n}
