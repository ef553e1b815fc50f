"""The install commands the docs show, run as written in a fresh virtualenv (CI runs this; locally it is opt-in with
OPTIMUM_ADMM_RUN_INSTALL=1, since it installs the package's dependencies from the index: about 1.5 minutes)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

pytestmark = pytest.mark.skipif(
    not os.environ.get("OPTIMUM_ADMM_RUN_INSTALL"),
    reason="installs from the package index; OPTIMUM_ADMM_RUN_INSTALL=1",
)


def _install_commands() -> list[str]:
    """The ``pip install`` lines of the first shell block of docs/installation.md (comments dropped)."""
    text = (ROOT / "docs" / "installation.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip().startswith("pip install")]


def test_the_documented_install_commands_work_in_a_fresh_virtualenv(tmp_path):
    commands = _install_commands()
    assert commands == ["pip install torch==2.13.0", "pip install ."]  # the block this test runs, as written
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {
        **os.environ,
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    env.pop("PYTHONPATH", None)
    for command in commands:  # from the clone's root, as the docs say (after `git clone ... && cd optimum-admm`)
        result = subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, f"{command}: {result.stderr[-3000:]}"
    python = venv / "bin" / "python"
    checked = subprocess.run([str(python), "-c", "import optimum_admm, torch; print(optimum_admm.__version__, "
                              "torch.__version__)"], cwd=tmp_path, env=env, capture_output=True, text=True)  # fmt: skip
    assert checked.returncode == 0 and "+cpu" in checked.stdout, checked.stderr  # no CUDA torch was pulled in
    cli = subprocess.run(
        [str(venv / "bin" / "optimum-cli"), "admm", "--help"], env=env, capture_output=True, text=True
    )
    assert cli.returncode == 0 and "prune" in cli.stdout, cli.stderr
