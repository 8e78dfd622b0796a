"""``launch.py train|eval|sample ... --executor local|debug|slurm``: run the same command line as N
processes, through submitit.

* ``slurm``: one SLURM task per GPU (``--ntasks-per-node = --gpus-per-node``, no torchrun inside);
  every task runs :class:`CommandJob`, which takes its rank, world size and rendezvous from
  ``submitit.JobEnvironment()`` (MASTER_ADDR = the first host of the job, MASTER_PORT derived from
  the job id) and calls the command-line entry it was given (``megatron_starflow.cli.main``) with
  the command line minus the launcher flags. Preemption: sbatch gets ``--signal=USR2@<signal_delay_s>`` (submitit's) and the loop
  also listens to SIGTERM/SIGUSR1; at the next step boundary it checkpoints and lets submitit
  requeue ``CommandJob.checkpoint()`` (the same command, which resumes from ``latest``).
* ``local``: submitit's LocalExecutor: ``nodes * gpus_per_node`` processes on this machine (gloo on
  CPU), the same ``CommandJob`` and the same requeue path (a requeued local job restarts its
  tasks).
* ``debug``: submitit's DebugExecutor: one task, in this process.
* ``--dry-run``: print the sbatch script submitit would submit (rendered by submitit's own
  ``_make_sbatch_string`` from the same parameters) and the resolved config, submit nothing.

Launcher settings come from flags and/or a YAML file (``--slurm-config examples/slurm/*.yaml``,
flags win).
"""

from __future__ import annotations

import os
import re
import signal
import sys
from dataclasses import asdict, dataclass, field

import yaml

LAUNCH_FLAGS = {"--executor": 1, "--nodes": 1, "--gpus-per-node": 1, "--partition": 1, "--time": 1,
                "--account": 1, "--dry-run": 0, "--slurm-config": 1, "--cpus-per-task": 1,
                "--mem": 1, "--qos": 1, "--constraint": 1, "--signal-delay-s": 1, "--job-dir": 1,
                "--job-name": 1}


@dataclass
class LaunchSettings:
    executor: str = "local"
    nodes: int = 1
    gpus_per_node: int = 1
    partition: str = ""
    time: str = ""  # minutes, or [D-]HH:MM[:SS]; "" = 1 day on SLURM, 7 days for local runs
    account: str = ""
    qos: str = ""
    constraint: str = ""
    cpus_per_task: int = 0  # 0: not set (SLURM's default)
    mem: str = ""  # e.g. "0" (all of the node) or "480G"
    signal_delay_s: int = 120  # SLURM signals USR2 this long before the end
    job_name: str = "starflow"
    job_dir: str = ""  # submitit's folder (logs, pickles); default <run>/submitit
    exclusive: bool = True
    setup: list = field(default_factory=list)  # shell lines before srun (modules, env)
    srun_args: list = field(default_factory=list)

    @property
    def tasks(self) -> int:
        return self.nodes * self.gpus_per_node

    def time_minutes(self) -> int:
        if not str(self.time).strip():
            return 10080 if self.executor == "local" else 1440
        return parse_time_minutes(self.time)


def parse_time_minutes(text) -> int:
    """``90`` / ``"90"`` -> 90; ``"HH:MM"``, ``"HH:MM:SS"``, ``"D-HH:MM:SS"`` -> minutes (rounded up)."""
    text = str(text).strip()
    if re.fullmatch(r"\d+", text):
        return int(text)
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    if not 2 <= len(parts) <= 3:
        raise ValueError(f"--time {text!r}: expected minutes, HH:MM, HH:MM:SS or D-HH:MM:SS")
    h, m, s = (parts + [0])[:3]
    return days * 1440 + h * 60 + m + (1 if s else 0)


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher flags, the command line the tasks run)."""
    launcher, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        key = arg.split("=", 1)[0]
        if key in LAUNCH_FLAGS:
            n = 0 if "=" in arg else LAUNCH_FLAGS[key]
            launcher += argv[i:i + 1 + n]
            i += 1 + n
        else:
            rest.append(arg)
            i += 1
    return launcher, rest


def settings_from_args(args) -> LaunchSettings:
    s = LaunchSettings()
    if getattr(args, "slurm_config", None):
        with open(args.slurm_config) as f:
            data = yaml.safe_load(f) or {}
        launcher = data.get("launcher", data)
        for key, value in launcher.items():
            if not hasattr(s, key):
                raise ValueError(f"{args.slurm_config}: unknown launcher key {key!r}; valid: "
                                 f"{', '.join(sorted(asdict(s)))}")
            setattr(s, key, value)
    for key in ("executor", "nodes", "gpus_per_node", "partition", "time", "account", "qos",
                "constraint", "cpus_per_task", "mem", "signal_delay_s", "job_name", "job_dir"):
        value = getattr(args, key, None)
        if value is not None:
            setattr(s, key, value)
    if s.executor not in ("local", "debug", "slurm"):
        raise ValueError(f"--executor {s.executor!r}; valid: local, debug, slurm")
    if s.nodes < 1 or s.gpus_per_node < 1:
        raise ValueError(f"--nodes and --gpus-per-node must be >= 1, got {s.nodes}, {s.gpus_per_node}")
    return s


# ------------------------------------------------------------------------------ inside a task

def master_port(job_id: str) -> int:
    """A rendezvous port every task of a job derives alike: 20000 + (numeric job id mod 20000)."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def distributed_env_from_submitit() -> dict:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from submitit's JobEnvironment,
    exported for ``parallel.state.initialize`` (torch's env:// rendezvous)."""
    import submitit

    env = submitit.JobEnvironment()
    local = env.cluster in ("local", "debug")
    values = {"RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks),
              "LOCAL_RANK": str(env.local_rank),
              "MASTER_ADDR": "127.0.0.1" if local else env.hostnames[0],
              "MASTER_PORT": str(master_port(env.job_id))}
    os.environ.update(values)
    return values


class CommandJob:
    """What every task runs: ``entry(argv)`` (the command line's ``main``, pickled by reference)
    after the rendezvous variables are set from submitit. ``checkpoint()`` is submitit's requeue
    hook: it resubmits the same command, which resumes from the run's ``checkpoints/latest``."""

    def __init__(self, argv: list[str], entry):
        self.argv = list(argv)
        self.entry = entry

    def __call__(self) -> int:
        values = distributed_env_from_submitit()
        code = self.entry(self.argv)
        if code:
            raise RuntimeError(f"task {values['RANK']}: launch.py {' '.join(self.argv)} exited "
                               f"with {code}")
        return code

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(CommandJob(self.argv, self.entry))


# ------------------------------------------------------------------------------ submission side

def _run_dir(command: str, args) -> str:
    if command == "train":
        return args.out or _resolved_config(args).train.out_dir
    return getattr(args, "checkpoint", None) or "runs/launch"


def _resolved_config(args):
    """The config a train command line resolves to (its parsed ``--config`` and overrides)."""
    from megatron_starflow.config import load_config

    return load_config(getattr(args, "config", None), getattr(args, "overrides", []) or [])


def slurm_parameters(s: LaunchSettings, command: str) -> dict:
    """The SlurmExecutor parameters (submitit names) of these settings."""
    tasks_per_node = s.gpus_per_node if command == "train" else 1
    nodes = s.nodes if command == "train" else 1
    params = {"job_name": s.job_name, "time": s.time_minutes(), "nodes": nodes,
              "ntasks_per_node": tasks_per_node, "gpus_per_node": s.gpus_per_node,
              "signal_delay_s": int(s.signal_delay_s), "stderr_to_stdout": True,
              "setup": list(s.setup) or None, "srun_args": list(s.srun_args) or None}
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(s, key):
            params[key] = str(getattr(s, key))
    if s.cpus_per_task:
        params["cpus_per_task"] = int(s.cpus_per_task)
    if s.exclusive:
        params["exclusive"] = True
    return {k: v for k, v in params.items() if v is not None}


def render_sbatch(s: LaunchSettings, command: str, folder: str) -> str:
    """The sbatch script submitit would write for these settings (its own renderer)."""
    import shlex

    from submitit.slurm.slurm import _make_sbatch_string

    submit_cmd = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit",
                           shlex.quote(str(folder))])
    return _make_sbatch_string(command=submit_cmd, folder=folder, **slurm_parameters(s, command))


def launch(command: str, argv_all: list[str], args, entry) -> int:
    """Entry from the command line's ``main`` when ``--executor`` is given: ``args`` is its parse
    of ``argv_all``; every task runs ``entry(argv)`` (``argv`` = ``argv_all`` without the launcher
    flags)."""
    s = settings_from_args(args)
    _, argv = split_argv(argv_all)
    run_dir = _run_dir(command, args)
    folder = os.path.abspath(s.job_dir or os.path.join(run_dir, "submitit"))
    world = s.tasks if command == "train" else 1
    if command == "train":
        cfg = _resolved_config(args)
        from megatron_starflow.parallel.state import validate_parallel

        dp = validate_parallel(cfg, world)
    if getattr(args, "dry_run", False):
        print(f"# executor: {s.executor}; tasks: {world} ({s.nodes} node(s) x {s.gpus_per_node} "
              f"GPU(s), one task per GPU); each task runs: launch.py {' '.join(argv)}")
        if s.executor == "slurm":
            print("# ---- sbatch script (what submitit submits) ----")
            print(render_sbatch(s, command, os.path.join(folder, "%j")))
        if command == "train":
            print(f"# ---- resolved config (data parallel size {dp}) ----")
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
        return 0
    import submitit

    os.makedirs(folder, exist_ok=True)
    if s.executor == "debug":
        executor = submitit.DebugExecutor(folder)
    elif s.executor == "local":
        import torch

        executor = submitit.LocalExecutor(folder)
        executor.update_parameters(tasks_per_node=world, timeout_min=s.time_minutes(),
                                   gpus_per_node=s.gpus_per_node if torch.cuda.is_available() else 0,
                                   signal_delay_s=int(s.signal_delay_s), stderr_to_stdout=True)
    else:
        executor = submitit.SlurmExecutor(os.path.join(folder, "%j"))
        executor.update_parameters(**slurm_parameters(s, command))
    job = executor.submit(CommandJob(argv, entry))
    print(f"submitted {command} as job {job.job_id} ({s.executor}, {world} task(s)); logs: {folder}",
          flush=True)
    if s.executor == "slurm":
        return 0
    if s.executor == "local":
        _forward_signals(job)
    try:
        job.results()
    finally:
        if s.executor == "local":
            out = job.paths.stdout  # task 0's log (stderr goes to the same file)
            if os.path.isfile(out):
                with open(out) as f:
                    sys.stdout.write(_strip_submitit_lines(f.read()))
    return 0


def _strip_submitit_lines(text: str) -> str:
    return "".join(line for line in text.splitlines(True) if "submitit" not in line)


def _forward_signals(job) -> None:
    """SIGTERM / SIGUSR1 to this launcher reach every local task (through the controller, which
    forwards SIGTERM), so a local run checkpoints and stops like a preempted SLURM job."""
    def forward(signum, frame):  # noqa: ARG001
        process = getattr(job, "_process", None)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, forward)
