"""What a training run builds from its config and layout, each piece on the run's device: the
tokenizer, the system (flow + text encoder + codec), this rank's pipeline stage, the step, the
named parameter groups, the optimizer and the data."""

from __future__ import annotations

import torch

from megatron_starflow.config import Config
from megatron_starflow.training.layout import ProcessLayout


def prepare_tokenizer(cfg: Config, run_dir: str, layout: ProcessLayout) -> str | None:
    """The sentencepiece model of the run (rank 0 trains it once, the others wait and read it);
    None for a T5 encoder."""
    if cfg.text.encoder != "sentencepiece":
        return None
    from megatron_starflow.data.tokenizer import ensure_tokenizer, tokenizer_path

    if layout.rank == 0:
        ensure_tokenizer(cfg, run_dir)
    layout.barrier()
    return tokenizer_path(cfg, run_dir)


def system_on_device(cfg: Config, run_dir: str, device: torch.device, dtype: torch.dtype):
    """The system with its trainable parts in ``dtype`` (bf16 parameters under
    ``train.dtype=bfloat16``: fp32 master weights live in the optimizer), all on ``device``.
    ``data.source=latent_shards`` builds neither the codec nor the text encoder."""
    from megatron_starflow.models.system import StarFlowSystem

    stored = cfg.data.source == "latent_shards"  # latents and text embeddings come from the shards
    system = StarFlowSystem(cfg, run_dir, with_codec=not stored, with_text_encoder=not stored)
    return system.to(device=device, dtype=dtype)


def stage_model(system, cfg: Config, layout: ProcessLayout):
    """The module this rank trains: the whole flow, or its pipeline stage (whole blocks; the
    denoiser on the first stage), sharing parameters with ``system.model``."""
    if layout.pp_size == 1:
        return system.model
    from megatron_starflow.parallel.pipeline import FlowPipelineStage, split_blocks

    blocks = split_blocks(cfg.model, layout.pp_size)[layout.pp_rank]
    return FlowPipelineStage(system.model, blocks, layout.pp_rank, layout.pp_size,
                             dtype=next(system.model.parameters()).dtype)


def step_runner(model, cfg: Config, layout: ProcessLayout):
    from megatron_starflow.training.step import build_step

    return build_step(model, cfg, layout)


def named_param_groups(system, layout: ProcessLayout) -> list[dict]:
    """``[{"name": "flow", "params": [(fqn, p), ...]}, {"name": "denoiser", ...}]`` with the
    names of ``system.trainable_state_dict()``: the denoiser has its own clip and skip test, as in
    the reference's separate optimizer. A trainable text encoder belongs to the first pipeline
    stage (the only one that reads its output)."""
    flow, den = [], []
    for name, p in system.model.named_parameters():
        if not p.requires_grad:
            continue
        (den if name.startswith("learnable_self_denoiser.") else flow).append((f"model.{name}", p))
    if system.text_trainable and layout.first_stage:
        flow += [(f"text_encoder.{n}", p) for n, p in system.text_encoder.named_parameters()
                 if p.requires_grad]
    groups = [{"name": "flow", "params": flow}]
    if den:
        groups.append({"name": "denoiser", "params": den})
    return groups


def optimizer(cfg: Config, groups: list[dict], layout: ProcessLayout):
    from megatron_starflow.training.optimizer import build_optimizer

    return build_optimizer(cfg, groups, layout)


def datasets(cfg: Config):
    from megatron_starflow.data.datasets import make_datasets

    return make_datasets(cfg)


def train_loader(cfg: Config, run_dir: str, data, layout: ProcessLayout):
    """Batches of this rank's data-parallel replica (every TP, PP and CP rank of a replica reads
    the same batch), ``data.batch_size`` samples each; the position is in ``data/sampler.py``."""
    if cfg.data.source in ("shards", "latent_shards"):
        from megatron_starflow.data.loader import build_train_iterator

        return build_train_iterator(cfg, run_dir, layout.dp_rank, layout.dp_size,
                                    device=layout.device)
    from megatron_starflow.data.synthetic_loader import SyntheticBatchIterator

    return SyntheticBatchIterator(data.train, cfg.data.batch_size, cfg.train.seed, layout.dp_rank,
                                  layout.dp_size)
