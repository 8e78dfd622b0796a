"""What a ``launch.py sample`` command line asks for and writes: its prompts, the given frames of
I2V / V2V, the mp4s / grid and the JSON record (shared by one-process and context-parallel
sampling)."""

from __future__ import annotations


def prompts_of(args) -> list[str]:
    """``--prompt`` (repeatable) and ``--prompts FILE``, checked."""
    from megatron_starflow.sampling.generate import check_prompts
    from megatron_starflow.sampling.prompts import read_prompts

    prompts = read_prompts(args.prompt, args.prompts)
    check_prompts(prompts)
    return prompts


def conditioning_of(args):
    """The given frames of ``--task i2v`` / ``v2v`` as a uint8 tensor ``[F, H, W, 3]`` (None for
    t2v)."""
    import torch

    from megatron_starflow.sampling.video_io import conditioning_frames

    frames = conditioning_frames(args.task, args.image, args.video, args.context_frames)
    return None if frames is None else torch.from_numpy(frames)


def write_samples(args, out, fps: int, step: int, prompts: list[str], solver: str) -> dict:
    """Write one mp4 per prompt (and the optional PNG grid); return the JSON record of the call."""
    from megatron_starflow.sampling.video_io import write_videos

    paths = write_videos(out.video.numpy(), args.out, fps, args.grid)
    return {"task": args.task, "prompts": prompts, "outputs": paths, "grid": args.grid,
            "checkpoint_step": step, "solver": solver, "cfg": args.cfg, "seed": args.seed,
            "seconds": {k: round(v, 3) for k, v in out.seconds.items()},
            "deep_network_evals": out.deep.network_evals,
            "shallow_network_evals": out.shallow.network_evals,
            "jacobi_iterations": out.deep.iterations}
