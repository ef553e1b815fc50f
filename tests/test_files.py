"""Atomic files and directories: an interruption or a failed rename never leaves an output that looks complete."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from optimum_admm import files
from optimum_admm.files import atomic_write, staged_directory


def test_atomic_write_leaves_the_target_as_it_was_on_failure(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")

    def fail(path):
        path.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, fail)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    atomic_write(target, lambda path: path.write_text("new"))
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_swap_restores_the_previous_output(tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("previous")
    real = Path.rename

    def rename(self, destination):
        if Path(destination) == target and ".tmp-" in self.name:
            raise OSError("device busy")  # the second rename, staging -> target
        return real(self, destination)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="device busy"), staged_directory(target) as staging:
        (staging / "config.json").write_text("new")
    assert (target / "config.json").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no backup, no staging left


def test_staged_directories_get_the_usual_permissions(tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    with staged_directory(tmp_path / "model") as staging:
        (staging / "config.json").write_text("{}")
    assert (tmp_path / "model").stat().st_mode & 0o777 == reference.stat().st_mode & 0o777


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_mount_point_is_staged_inside_and_stays_mounted(tmp_path):
    mount = tmp_path / "mnt"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("this sandbox cannot mount a tmpfs")
    try:
        (mount / "old.safetensors").write_text("previous output")
        with staged_directory(mount) as staging:
            assert staging.parent == mount
            (staging / "model.safetensors").write_text("weights")
            (staging / "config.json").write_text("{}")
            assert not (mount / "config.json").exists()  # nothing that looks complete before the end
        assert os.path.ismount(mount)
        assert sorted(p.name for p in mount.iterdir()) == ["config.json", "model.safetensors"]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_dead_process_staging_inside_a_mount_point_is_removed(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    monkeypatch.setattr(files.os.path, "ismount", lambda path: Path(path) == target)
    dead = target / f".staging.tmp-{files.host_name()}-999999999-abcd"
    dead.mkdir()
    with staged_directory(target) as staging:
        (staging / "config.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
