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
import torch

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
        # transformers caches one HfApi (and its endpoint) on first use: a fresh one for this server
        monkeypatch.setattr(importlib.import_module("transformers.utils.hub"), "_hf_api", None)
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


# -- every page's code runs, or says why not -----------------------------------------------------------------------
#
# Each ```python block of every page runs, in page order and one namespace per page, in a sandbox: the Hub ids the
# pages use are tiny stand-in models on the loopback Hub server (the real huggingface_hub client downloads them),
# "wikitext2" / "c4" are replaced by local text (the datasets Hub is not reachable here), and the free names a page
# assumes its reader has (``model``, ``tokenizer``, ``texts``, ``training_args``, ...) are tiny objects. A block
# that cannot run here says so on the line above its fence:
#     <!-- docs-test: skip — <why> -->          (not run: a GPU, a real 8B model, a schematic with "...", ...)
#     <!-- docs-test: raises <Error> — <why> --> (runs and must raise that error, as the page says)
MARKER = re.compile(r"^<!-- docs-test: (skip|raises (\w+)) — (.+?) -->$")
STAND_INS = ("HuggingFaceTB/SmolLM2-135M", "meta-llama/Llama-3.1-8B")
PAGES = sorted([ROOT / "README.md", *DOCS.rglob("*.md")])


def marked_blocks(page: Path) -> list[tuple[int, str, str | None, str | None]]:
    """``(line, code, marker, reason)`` for each ```python block; marker is ``skip``, an error name or None."""
    text = page.read_text()
    out = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        marker = MARKER.match(before)
        kind = None if marker is None else ("skip" if marker[1] == "skip" else marker[2])
        out.append((text[: match.start()].count("\n") + 1, match.group(1), kind, marker and marker[3]))
    return out


@pytest.fixture
def docs_sandbox(tmp_path, monkeypatch, local_hub, corpus_text, tokenizer):
    """The names and the stand-ins the pages' code runs against (see the comment above)."""
    from conftest import build_tiny_model
    from huggingface_hub import HfApi
    from transformers import TrainingArguments

    import optimum_admm.calibration as calibration
    import optimum_admm.evaluation as evaluation
    from optimum_admm.structured.api import pack_tokens

    lines = corpus_text.splitlines()
    monkeypatch.setattr(calibration, "load_named_texts", lambda name, split="train", num_documents=None: lines)
    monkeypatch.setattr(evaluation, "_load_named", lambda name: lines[:40])
    for repo in STAND_INS:
        folder = tmp_path / "stand-ins" / repo
        build_tiny_model("llama").save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        HfApi().create_repo(repo, exist_ok=True)
        HfApi().upload_folder(repo_id=repo, folder_path=folder)
    monkeypatch.chdir(tmp_path)

    def names() -> dict:
        model = build_tiny_model("llama").train()
        data = pack_tokens(lines, tokenizer, sequence_length=32, max_sequences=16)
        args = TrainingArguments(str(tmp_path / "trainer"), max_steps=2, per_device_train_batch_size=4,
                                 report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")  # fmt: skip
        batch = {"input_ids": torch.tensor(data[:4]["input_ids"]), "labels": torch.tensor(data[:4]["labels"])}
        return {
            "torch": torch,
            "model": model,
            "tokenizer": tokenizer,
            "texts": lines,
            "calibration_texts": lines,
            "data": data,
            "train_dataset": data,
            "training_args": args,
            "args": args,
            "optimizer": torch.optim.SGD(model.parameters(), lr=1e-3),
            "loader": [batch, batch],
        }

    return names


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
def test_every_page_code_runs_or_says_why_not(docs_sandbox, capsys):
    import traceback
    import types

    import torch  # noqa: F401 (pages may assume it)

    ran, skipped, failures = [], [], []
    for index, page in enumerate(PAGES):
        work = Path.cwd() / f"page-{index}"  # each page starts in its own empty directory
        work.mkdir()
        os.chdir(work)
        module = types.ModuleType(f"docs_page_{index}")  # dataclasses on a page need a real module
        sys.modules[module.__name__] = module
        namespace = module.__dict__
        namespace.update(docs_sandbox())
        for line, code, kind, reason in marked_blocks(page):
            where = f"{page.relative_to(ROOT)}:{line}"
            if kind == "skip":
                assert reason and len(reason) > 10, f"{where}: a skipped block must say why"
                skipped.append(where)
                continue
            try:
                exec(compile(code, where, "exec"), namespace)
            except Exception as err:
                if kind is not None and type(err).__name__ == kind:
                    ran.append(where)
                    continue
                failures.append(f"{where}: {type(err).__name__}: {str(err)[:300]}\n{traceback.format_exc()[-1500:]}")
                continue
            if kind is not None:
                failures.append(f"{where}: the page says it raises {kind}, it did not")
            ran.append(where)
    capsys.readouterr()
    assert not failures, "\n".join(failures)
    assert len(ran) >= 2 * len(skipped), (ran, skipped)  # most of the documentation runs as written


def _shell_commands(page: Path) -> list[tuple[int, list[str]]]:
    """The ``optimum-cli admm ...`` / ``optimum-admm ...`` commands of the page's ```bash blocks, as argv lists."""
    import shlex

    text = page.read_text()
    out = []
    for match in re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M):
        line_no = text[: match.start()].count("\n") + 2
        joined = re.sub(r"\\\n\s*", " ", match.group(1))
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("torchrun "):  # torchrun ... -m optimum_admm.commands.main prune ...
                line = re.sub(r"^torchrun .*?(optimum-admm|-m optimum_admm\.commands\.main)", "optimum-admm", line)
            for prefix in ("optimum-cli admm ", "optimum-admm "):
                if line.startswith(prefix):
                    out.append((line_no, shlex.split(line[len(prefix) :])))
    return out


def test_every_documented_command_line_parses(monkeypatch, tmp_path):
    """Each documented ``optimum-cli admm`` command is accepted by the real parser (flags, choices, values), without
    running it: a renamed flag or a removed choice fails here."""
    from optimum.commands.base import CommandInfo, RootOptimumCLICommand

    from optimum_admm.commands.admm import ADMMCommand

    root = RootOptimumCLICommand("optimum-admm")
    for info in ADMMCommand.SUBCOMMANDS:
        root.register_subcommand(CommandInfo(info.name, help=info.help, subcommand_class=info.subcommand_class))
    checked, failures = 0, []
    for page in PAGES:
        for line, argv in _shell_commands(page):
            if not argv or argv[0] in ("--help", "-h") or "--help" in argv:
                continue
            monkeypatch.chdir(tmp_path)
            for token in argv:  # the files a command names exist on its reader's machine: placeholders here
                if re.fullmatch(r"[\w./-]+\.(txt|json|yaml)", token) and not Path(token).is_absolute():
                    Path(token).parent.mkdir(parents=True, exist_ok=True)
                    Path(token).write_text("{}" if not token.endswith(".txt") else "Some text.")
            try:
                root.parser.parse_args(argv)
                checked += 1
            except SystemExit:
                failures.append(f"{page.relative_to(ROOT)}:{line}: {' '.join(argv)}")
    assert not failures, "\n".join(failures)
    assert checked >= 8
