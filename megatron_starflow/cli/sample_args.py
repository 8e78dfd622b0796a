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


def check_outputs(args, count: int) -> None:
    """``--out`` (one mp4 per prompt) and ``--grid``: not folders, not existing without
    ``--overwrite``, in writable folders; checked before anything is computed."""
    from megatron_starflow.cli import checks
    from megatron_starflow.sampling.video_io import output_paths

    for path in output_paths(args.out, count):
        checks.check_output_file("--out", path, args.overwrite)
    if args.grid:
        checks.check_output_file("--grid", args.grid, args.overwrite)


def check_against_model(args, system, prompts: list[str], given: int | None,
                        warn: bool = True) -> None:
    """The inputs that depend on the checkpoint: --frames the codec can make, --long-context
    below the training length, and prompts longer than the text length (truncated to it, with a
    warning per prompt). ``given``: pixel frames of --image / --video (None for t2v); ``warn``: print the truncation warnings (rank 0)."""
    from megatron_starflow.cli import checks
    from megatron_starflow.models.system import format_captions

    d = system.cfg.data
    frames = args.frames or d.frames
    try:
        latent_t = system.codec.latent_shape(frames, d.height, d.width)[0]
    except ValueError as exc:
        raise ValueError(f"--frames {frames}: {exc}") from None
    train_t = system.codec.latent_shape(d.frames, d.height, d.width)[0]
    if args.long_context and latent_t > train_t and not args.long_context < train_t:
        raise ValueError(f"--long-context {args.long_context} must be below the training length "
                         f"of {train_t} latent frames (0: {max(1, train_t - max(1, train_t // 4))})")
    if given is not None and given >= frames:
        flag = "--image" if args.task == "i2v" else "--video / --context-frames"
        raise ValueError(f"{flag} gives {given} frames; --frames {frames} must be more (the given "
                         f"frames are part of the video)")
    limit = system.cfg.model.text_length
    encoder = system.text_encoder
    for i, text in enumerate(format_captions(system.cfg, prompts)):
        n = encoder.count_tokens(text)
        if n > limit and warn:
            checks.warn(f"prompt {i} is {n} tokens; the model reads the first {limit} "
                        f"(model.text_length), the rest is ignored")


def conditioning_of(args):
    """The given frames of ``--task i2v`` / ``v2v`` as a uint8 tensor ``[F, H, W, 3]`` (None for
    t2v)."""
    import torch

    from megatron_starflow.sampling.video_io import conditioning_frames

    frames = conditioning_frames(args.task, args.image, args.video, args.context_frames)
    if args.task == "v2v" and args.context_frames > len(frames):
        raise ValueError(f"--context-frames {args.context_frames} but --video {args.video} has "
                         f"{len(frames)} frames; give at most {len(frames)} (0: all)")
    return None if frames is None else torch.from_numpy(frames)


def write_samples(args, out, fps: int, step: int, prompts: list[str], solver: str) -> dict:
    """Write one mp4 per prompt (and the optional PNG grid); return the JSON record of the call."""
    from megatron_starflow.sampling.video_io import write_videos

    paths = write_videos(out.video.numpy(), args.out, fps, args.grid)
    return {"task": args.task, "prompts": prompts, "outputs": paths, "grid": args.grid,
            "checkpoint_step": step, "solver": solver, "cfg": args.cfg, "seed": args.seed,
            "temperature": args.temperature, "candidates": getattr(args, "candidates", 1),
            "seconds": {k: round(v, 3) for k, v in out.seconds.items()},
            "deep_network_evals": out.deep.network_evals,
            "shallow_network_evals": out.shallow.network_evals,
            "jacobi_iterations": out.deep.iterations}
