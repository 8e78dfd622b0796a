"""``python tests/fault_launch.py [--fault-nan-steps 3-9] [--fault-step-sleep 0.4]
[--fault-save-sleep STEP:SECONDS] <launch.py arguments>``: ``launch.py`` with fault hooks, for
tests that kill, slow down or poison a real training run (also under torchrun and submitit)."""

import argparse
import sys

from helpers_faults import FaultHooks, parse_steps

from megatron_starflow.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--fault-nan-steps", default="")
    parser.add_argument("--fault-step-sleep", type=float, default=0.0)
    parser.add_argument("--fault-save-sleep", default="")
    parser.add_argument("--fault-requeue-marker", default="")
    faults, rest = parser.parse_known_args()
    save = None
    if faults.fault_save_sleep:
        step, seconds = faults.fault_save_sleep.split(":")
        save = (int(step), float(seconds))
    hooks = FaultHooks(parse_steps(faults.fault_nan_steps), faults.fault_step_sleep, save,
                       faults.fault_requeue_marker)
    sys.exit(main(rest, hooks=hooks))
