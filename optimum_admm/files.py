"""Writing files and directories so that an interruption never leaves one that looks complete.

One rule for every output of the package: write into a staging path beside the target (same file system), flush it
to disk, then rename it into place; on any failure remove the staging path and leave the target as it was.

- :func:`atomic_write` does it for one file (``state.json``, a shard of a checkpoint, a sidecar).
- :func:`staged_directory` does it for a directory (a saved model). A directory that is a mount point cannot be
  renamed away: its content is staged inside it and moved into place entry by entry, the weights index and
  ``config.json`` last, so a reader never sees a config without its weights.

Staging names carry the host and process id. A process killed outright (SIGKILL, power loss) cannot clean up; the
next run for the same target removes what a dead process of this host left (never what another host's process, or a
live one, is writing). New files and directories get the usual permissions: the process umask applies, which is never
changed here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_write", "check_writable_directory", "staged_directory", "host_name"]

logger = logging.getLogger(__name__)

#: Written last when a staged directory is moved into a mount point entry by entry.
_LAST = ("model.safetensors.index.json", "model.safetensors", "config.json")
#: The staging directory's name inside a target that is a mount point.
_INSIDE = "staging"


def host_name() -> str:
    """This host's name, reduced to ``[A-Za-z0-9_]`` (part of every staging name).

    Example:
        >>> host_name().replace("_", "").isalnum()
        True
    """
    return "".join(c if c.isalnum() else "_" for c in platform.node()) or "host"


def _owner() -> str:
    return f"{host_name()}-{os.getpid()}"


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    with contextlib.suppress(OSError):  # some file systems refuse fsync on directories
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(staging_path)``, flush it and rename it over ``path``; ``path`` is untouched on failure.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "state.json"
        >>> _ = atomic_write(target, lambda p: p.write_text("{}"))
        >>> target.read_text()
        '{}'
    """
    target = Path(path)
    staging = target.with_name(f".{target.name}.tmp-{_owner()}-{secrets.token_hex(4)}")
    try:
        write(staging)
        _fsync(staging)
        os.replace(staging, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
        raise
    _fsync(target.parent)
    return target


def _remove_stale_staging(target: Path, inside: bool) -> None:
    """Remove the staging directories for ``target`` left by dead processes of this host.

    Directories of other hosts (a shared file system) and of live processes are never touched, nor the ``.old-``
    backup of a previous output, which a run killed between its two renames leaves as the only complete copy.
    """
    parent, name = (target, _INSIDE) if inside else (target.parent, target.name)
    pattern = re.compile(rf"\.{re.escape(name)}\.tmp-{re.escape(host_name())}-(\d+)-.*")
    for path in parent.glob(f".{name}.tmp-*"):
        match = pattern.fullmatch(path.name)
        if match is None or not path.is_dir() or int(match.group(1)) == os.getpid():
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            logger.info("removing %s, left by an interrupted run (process %d)", path, pid)
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, another user's
            continue


def _swap_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing ``target`` is moved aside first and restored on failure."""
    if not target.exists():
        staging.rename(target)
        return
    backup = target.with_name(f".{target.name}.old-{_owner()}")
    target.rename(backup)
    try:
        staging.rename(target)
    except BaseException:
        backup.rename(target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _move_contents_into(staging: Path, target: Path) -> None:
    """For a mount point: replace ``target``'s entries with ``staging``'s, the files a loader opens first last."""
    for entry in target.iterdir():
        if entry.name.startswith(f".{_INSIDE}.tmp-") or entry.name == "lost+found":
            continue  # this staging directory, another run's, the file system's own
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    entries = sorted(staging.iterdir(), key=lambda p: (p.name in _LAST, _LAST.index(p.name) if p.name in _LAST else 0))
    for entry in entries:
        os.replace(entry, target / entry.name)
    staging.rmdir()


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike) -> Iterator[Path]:
    """A fresh directory to write into; it becomes ``target`` only when the ``with`` body completes.

    On success an existing ``target`` is moved aside, the staging directory renamed into place and the old content
    dropped (a failed rename puts the old content back); on any exception (Ctrl-C included) the staging directory
    is removed and ``target`` is left as it was. A ``target`` that is a mount point is staged inside itself.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "model"
        >>> with staged_directory(out) as staging:
        ...     _ = (staging / "config.json").write_text("{}")
        >>> sorted(p.name for p in out.iterdir())
        ['config.json']
    """
    target = Path(target)
    inside = target.is_dir() and os.path.ismount(target)
    if not inside:
        target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target, inside)
    parent, name = (target, _INSIDE) if inside else (target.parent, target.name)
    staging = parent / f".{name}.tmp-{_owner()}-{secrets.token_hex(4)}"
    staging.mkdir(mode=0o777)  # the umask gives the usual permissions
    try:
        yield staging
        for path in staging.rglob("*"):
            if path.is_file():
                _fsync(path)
        if inside:
            _move_contents_into(staging, target)
        else:
            _swap_into_place(staging, target)
        _fsync(target if inside else target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_writable_directory(path: str | os.PathLike, parameter: str, needed_bytes: int | None = None) -> Path:
    """Before any work: the output ``path`` can be created and written (where :func:`staged_directory` stages it),
    and its file system has room for about ``needed_bytes`` (5% margin). Returns the directory that was probed.

    Raises:
        OutputDirectoryError: naming ``parameter``, the path and the reason.

    Example:
        >>> import tempfile
        >>> check_writable_directory(Path(tempfile.mkdtemp()) / "out", "save_dir").is_dir()
        True
    """
    from .errors import OutputDirectoryError
    from .memory import format_bytes

    target = Path(path).expanduser().absolute()
    inside = target.is_dir() and os.path.ismount(target)
    probe = target if inside else target.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # staged_directory creates the missing parents
    if not probe.is_dir():
        raise OutputDirectoryError(f"{parameter} {path} cannot be created: {probe} is not a directory")
    scratch = probe / f".optimum-admm-probe-{_owner()}-{secrets.token_hex(4)}"
    try:
        os.close(os.open(scratch, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        scratch.unlink()
    except OSError as err:
        raise OutputDirectoryError(
            f"{parameter} {path} cannot be written ({err.strerror or err} in {probe}); choose a directory you can "
            "write to"
        ) from None
    if needed_bytes:
        free = shutil.disk_usage(probe).free
        if free < needed_bytes * 1.05:
            raise OutputDirectoryError(
                f"{parameter} {path}: its file system has {format_bytes(free)} free, but the output needs about "
                f"{format_bytes(needed_bytes)}; free some space or choose another directory"
            )
    return probe
