"""The package's import rules (DESIGN.md "Import direction"): the contracts of ``.importlinter``
hold (``lint-imports``), the checker catches a planted violation, and no module imports a private
name (``_x``) from another subpackage (import-linter does not look at imported names)."""

import ast
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "megatron_starflow"
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())", "--no-cache", "--no-logo"]


def _lint(cwd: str, *args: str) -> subprocess.CompletedProcess:
    # lint-imports analyses the package found from its working directory (it puts it first on
    # sys.path), so a copy of the package in another folder is checked instead of this one.
    return subprocess.run([*LINT, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_contract_catches_a_planted_violation(tmp_path):
    shutil.copytree(os.path.join(ROOT, PACKAGE), tmp_path / PACKAGE,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, ".importlinter"), tmp_path / ".importlinter")
    with open(tmp_path / PACKAGE / "models" / "masks.py", "a") as f:
        f.write("\nfrom megatron_starflow.training import losses  # planted: models -> training\n")
    proc = _lint(str(tmp_path), "--contract", "models")
    assert proc.returncode != 0
    assert "megatron_starflow.models.masks -> megatron_starflow.training.losses" in " ".join(proc.stdout.split())


def _top_package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def private_names_across_packages(root: str = ROOT) -> list[str]:
    """``from megatron_starflow.X... import _name`` in a module outside subpackage X."""
    found = []
    base = os.path.join(root, PACKAGE)
    for folder, _, files in os.walk(base):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
            importer = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                        and node.module.split(".")[0] == PACKAGE):
                    continue
                if _top_package(node.module) == _top_package(importer):
                    continue
                for alias in node.names:
                    if alias.name.startswith("_"):
                        found.append(f"{importer}:{node.lineno} imports {node.module}.{alias.name}")
    return found


def test_no_private_names_across_packages():
    assert private_names_across_packages() == []


def test_private_name_check_catches_a_planted_import(tmp_path):
    (tmp_path / PACKAGE / "sampling").mkdir(parents=True)
    (tmp_path / PACKAGE / "sampling" / "planted.py").write_text(
        "from megatron_starflow.data.synthetic import _hidden\n"
        "from megatron_starflow.sampling.jacobi import _same_package_is_fine\n")
    assert private_names_across_packages(str(tmp_path)) == [
        "megatron_starflow.sampling.planted:1 imports megatron_starflow.data.synthetic._hidden"]
