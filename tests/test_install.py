"""The install commands the docs show, run as written in a fresh virtualenv, then the quick tour in it.

CI runs this; locally it is opt-in with OPTIMUM_ADMM_RUN_INSTALL=1, since it installs the package's dependencies from
the index (about 1.5 minutes)."""

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
    # ... and the quick tour runs as written in that virtualenv, pushing to a loopback Hub (no real Hub here)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import online_environment
    from hub_server import HubServer

    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "docs" / "quicktour.md").read_text(), re.S | re.M)
    script = tmp_path / "quicktour.py"
    script.write_text("\n\n".join(blocks))
    token = "hf_install_test_3c9d"
    with HubServer({token}) as hub:
        tour_env = {**online_environment(), "PATH": env["PATH"], "HF_ENDPOINT": hub.url, "HF_TOKEN": token,
                    "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf-home")}  # fmt: skip
        tour_env.pop("PYTHONPATH", None)
        tour = subprocess.run([str(python), str(script)], cwd=tmp_path, env=tour_env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert tour.returncode == 0, tour.stderr[-3000:]
        assert "zeros in down_proj: 50%" in tour.stdout and "True" in tour.stdout
        assert "pruning_config.json" in hub.state.files("me/tiny-admm-50")
