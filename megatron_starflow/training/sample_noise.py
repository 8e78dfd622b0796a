"""The random inputs of a training sample — caption dropout, dequantisation noise, Gaussian noise
augmentation — drawn from a generator seeded by (run seed, the sample's global position in the
data order). They do not depend on which rank, or how many ranks, process the sample, so a step
computes the same loss at DP=1 and DP=4, and a run resumed with another layout continues with
the same noise it would have drawn (``data/sampler.py`` gives every sample its position)."""

from __future__ import annotations

import torch

_MIX = 1_000_003  # positions of two seeds never collide for runs shorter than 1e6 * batch epochs


def sample_generator(seed: int, position: int) -> torch.Generator:
    """A CPU generator, whatever the device: draws are made on it and moved to the device, so a
    run draws the same noise on any device (a bf16 GPU run and an fp32 CPU run of one config see
    the same inputs; devices without generators, like the tests' lazy device, need nothing
    else). The draws are small next to a step: one latent (and, for the lossless codec, one
    clip's dequantisation noise) per sample."""
    return torch.Generator().manual_seed(int(seed) * _MIX + int(position) + 1)


def replica_inputs(system, batch: dict, caption_dropout: float, sigma: float, seed: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy tokens ``[B, T, h, w, C]``, text embeddings ``[B, L, width]``) on ``device`` of one
    replica's batch (``batch["position"]``: the global positions of its samples).

    A batch of decoded clips is encoded by the system's codec and its captions (``""`` where
    dropped) by its text encoder. A batch of latent shards (``"latent"``, ``"text"`` and the
    stored ``"null_text"``) takes the same draws from the same generator: the stored latent
    stands in for the codec's output and the null-caption embedding for the encoder's output of
    ``""``, so both sources train on the same inputs."""
    noisy, captions, texts = [], [], []
    stored = "latent" in batch
    for i, position in enumerate(batch["position"]):
        gen = sample_generator(seed, position)
        dropped = bool(torch.rand(1, generator=gen, device=gen.device).item() < caption_dropout)
        if stored:
            texts.append(batch["null_text"] if dropped else batch["text"][i])
            tokens = system.latent_to_tokens(batch["latent"][i:i + 1])
        else:
            captions.append("" if dropped else batch["caption"][i])
            video = batch["video"][i:i + 1].to(device)
            tokens = system.video_to_tokens(video, dequantize=True, generator=gen)
        eps = torch.randn(tokens.shape, generator=gen, device=gen.device, dtype=tokens.dtype)
        noisy.append(tokens + sigma * eps.to(device))
    if stored:
        return torch.cat(noisy), system.batch_text({"text": torch.stack(texts)})
    return torch.cat(noisy), system.encode_text(captions)
