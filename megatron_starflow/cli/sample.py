"""``launch.py sample``: videos from a checkpoint on one process, or (``--cp N``) on N
context-parallel ranks (cli/sample_cp.py)."""

from __future__ import annotations

import json


def cmd_sample(args) -> int:
    if getattr(args, "cp", 1) != 1:  # context-parallel: N ranks share the frames
        if getattr(args, "candidates", 1) != 1:
            raise ValueError(f"--candidates {args.candidates} with --cp {args.cp}: best-of-N "
                             f"sampling runs on one process; drop one of the two")
        from megatron_starflow.cli.sample_cp import cmd_sample_cp

        return cmd_sample_cp(args)
    from megatron_starflow.cli.sample_args import (check_against_model, check_outputs,
                                                   conditioning_of, prompts_of, write_samples)
    from megatron_starflow.convert.loading import load_system
    from megatron_starflow.sampling.jacobi import SolverOptions
    from megatron_starflow.sampling.rerank import generate_best_of

    prompts = prompts_of(args)
    check_outputs(args, len(prompts))
    prefix = conditioning_of(args)
    system, step, _ = load_system(args.checkpoint, getattr(args, "device", None),
                                  getattr(args, "weights", "auto"))
    check_against_model(args, system, prompts, None if prefix is None else prefix.shape[0])
    opts = SolverOptions(solver=args.solver, first_block=args.block_size[0],
                         later_block=args.block_size[-1], tau=args.tau, guidance=args.cfg)
    out = generate_best_of(system, prompts, args.candidates, seed=args.seed, frames=args.frames,
                           opts=opts, prefix_video=prefix, context_frames=args.long_context,
                           temperature=args.temperature)
    print(json.dumps(write_samples(args, out, system.cfg.data.fps, step, prompts, args.solver)))
    return 0
