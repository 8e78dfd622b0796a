"""Launch a script under torchrun on this CPU (gloo) and read back what rank 0 wrote.

Every multi-process test uses this one launcher: a free rendezvous port per launch, one OpenMP
thread per rank (2 cores are shared by all ranks), megatron's import warnings silenced."""

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: str, args: list[str], world: int, timeout: int = 240) -> None:
    """Run ``script args`` on ``world`` local ranks; fail with the tail of stderr if it fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
           f"--master_port={free_port()}", script, *map(str, args)]
    # The scripts import the installed package and the helpers of tests/ (as pytest.ini does).
    path = os.pathsep.join(p for p in (os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=path)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


def run_checks(script: str, out, args: list[str], world: int, timeout: int = 240) -> dict:
    """For check scripts that write ``{check name: result or {"error": traceback}}`` to ``out``
    (argument 1): run them and fail listing every check that raised."""
    run_torchrun(script, [out, *args], world, timeout)
    results = json.loads(open(out).read())
    errors = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
    assert not errors, errors
    return results
