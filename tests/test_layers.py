"""The package layering holds: `lint-imports` keeps every contract in pyproject.toml [tool.importlinter].

import-linter finds a package's modules by walking its folder, and hetrain's subpackages are mounted
from folders beside flows/ (pyproject.toml [tool.setuptools] package-dir). So the check runs on a copy
of the sources laid out as the installed package: hetrain/ = flows/, hetrain/mpc_ops/ = mpc_ops/, ...
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MOUNTS = {"hetrain": "flows", "hetrain/mpc_ops": "mpc_ops", "hetrain/participants": "participants",
          "hetrain/bench": "bench"}


def stage_package(root: Path) -> Path:
    """Copy the sources under `root` in the installed package's layout; return the folder that holds hetrain/."""
    for target, source in MOUNTS.items():  # parents first: flows/ becomes hetrain/, then the mounts inside it
        shutil.copytree(REPO / source, root / target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root


def run_lint_imports(staged: Path) -> subprocess.CompletedProcess:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    env = {**os.environ, "PYTHONPATH": str(staged)}  # the staged copy, not the editable install, is `hetrain`
    return subprocess.run([str(lint_imports), "--no-cache", str(REPO / "pyproject.toml")], cwd=staged, env=env,
                          capture_output=True, text=True, timeout=300)


def test_lint_imports_keeps_every_layering_contract(tmp_path):
    # Prepare
    staged = stage_package(tmp_path)
    # Execute
    result = run_lint_imports(staged)
    # Assert
    report = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, f"lint-imports found imports that break the layering:\n{report}"
    assert "0 broken" in result.stdout and "Analyzed" in result.stdout, report


def test_lint_imports_reports_an_import_from_core_up_to_the_flows(tmp_path):
    # Prepare: the copy of core/config.py imports the trainer's engine, as the old depth check did
    staged = stage_package(tmp_path)
    config = staged / "hetrain" / "core" / "config.py"
    config.write_text(config.read_text() + "\nfrom hetrain.engine import Model  # noqa\n")
    # Execute
    result = run_lint_imports(staged)
    # Assert
    assert result.returncode == 1
    assert "hetrain.core is not allowed to import hetrain.engine" in result.stdout
    assert "- hetrain.core.config -> hetrain.engine" in result.stdout
