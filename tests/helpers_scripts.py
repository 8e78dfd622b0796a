"""Scripts of tools/ and benchmarks/ as modules. Those folders are not packages (their scripts run
as ``python tools/x.py``), so a test loads a script from its file; the scripts import the
installed package (scripts/install.sh)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relative_path: str):
    """``load_script("tools/estimate_memory.py")`` -> that script as a module (its ``main`` etc.)."""
    name = "script_" + os.path.splitext(relative_path)[0].replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relative_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
