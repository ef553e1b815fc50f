"""The documentation site: strict build, runnable quick tour, complete API reference, examples in every docstring."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import optimum_admm
import optimum_admm.structured

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TOKEN = "hf_docs_test_7d1e0c5a"
PUBLIC = {
    "optimum_admm": [n for n in optimum_admm.__all__ if n != "__version__"],
    "optimum_admm.structured": list(optimum_admm.structured.__all__),
}


def python_blocks(page: Path) -> list[str]:
    """The fenced ```python blocks of a Markdown page, in order."""
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)


def api_entries() -> list[str]:
    """The dotted paths of the ``::: path`` (mkdocstrings) entries of the API reference."""
    return re.findall(r"^::: (\S+)\s*$", (DOCS / "api.md").read_text(), re.M)


def test_strict_build(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install 'optimum-admm[docs]'")
    pytest.importorskip("material", reason="mkdocs-material is not installed: pip install 'optimum-admm[docs]'")
    pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed: pip install 'optimum-admm[docs]'")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "api" / "index.html").is_file()
    assert (tmp_path / "quicktour" / "index.html").is_file()


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """huggingface_hub pointed at a Hub-compatible server on 127.0.0.1, with a token only it accepts."""
    sys.path.insert(0, str(ROOT / "tests"))
    from hub_server import HubServer
    from huggingface_hub import constants

    with HubServer({TOKEN}) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        yield server


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_quick_tour_runs_as_written(tmp_path, monkeypatch, local_hub, capsys):
    blocks = python_blocks(DOCS / "quicktour.md")
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__quicktour__"}
    for index, block in enumerate(blocks):
        exec(compile(block, f"docs/quicktour.md[python block {index}]", "exec"), namespace)
    out = capsys.readouterr().out
    assert "zeros in down_proj: 50%" in out
    assert "True" in out
    files = local_hub.state.files("me/tiny-admm-50")
    assert {"model.safetensors", "pruning_config.json", "README.md"} <= set(files)


def test_api_reference_lists_every_public_name():
    listed: dict[str, str] = {}
    for path in api_entries():
        module, name = path.rsplit(".", 1)
        listed[name] = path
        package = "optimum_admm.structured" if path.startswith("optimum_admm.structured.") else "optimum_admm"
        if name in PUBLIC[package]:  # the entry documents the very object the package exports
            exported = getattr(importlib.import_module(package), name)
            assert getattr(importlib.import_module(module), name) is exported, path
    for package, names in PUBLIC.items():
        missing = sorted(set(names) - set(listed))
        assert not missing, f"docs/api.md does not list {package}.{missing}"


@pytest.mark.parametrize("package, name", [(package, name) for package, names in PUBLIC.items() for name in names])
def test_public_name_has_a_docstring_with_an_example(package, name):
    obj = getattr(importlib.import_module(package), name)
    doc = inspect.getdoc(obj) or ""
    assert "Example" in doc, f"{package}.{name} has no 'Example' section in its docstring"


def test_repository_paths_named_in_the_docs_exist():
    """Backquoted ``benchmarks/``, ``examples/``, ``tests/`` and ``scripts/`` paths on the pages are real files."""
    missing = []
    for page in DOCS.rglob("*.md"):
        for path in re.findall(r"`((?:benchmarks|examples|tests|scripts)/[\w./-]+\.\w+)`", page.read_text()):
            if not (ROOT / path).exists():
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing
