"""The command line's one error boundary: a user error is one clear line, never a traceback.

Every subcommand's ``run()`` goes through :meth:`GuardedCommand.run`:

- an error of the library (:class:`~optimum_admm.errors.OptimumADMMError`), a bad value (``ValueError``) or a file,
  disk or network condition (``OSError``) prints ``error: <message>`` on stderr and exits with 2 for a bad
  argument, 1 otherwise;
- Ctrl-C (SIGINT) exits with 130 and says whether re-running the same command resumes (``--checkpoint-dir`` holds
  a run) or nothing was written;
- anything else is an internal error: one line, and the advice to re-run with ``--debug`` and report it.

``--debug`` (or ``OPTIMUM_ADMM_DEBUG=1``) lets the exception through with its traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path
from typing import NoReturn

from optimum.commands.base import BaseOptimumCLICommand

__all__ = ["GuardedCommand", "add_debug_flag", "describe_error"]

DEBUG_ENV = "OPTIMUM_ADMM_DEBUG"


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """The ``--debug`` flag every subcommand has, and its short argument errors: the error and where the options are
    listed, instead of argparse's whole usage block."""
    parser.add_argument(
        "--debug", action="store_true", help=f"Show Python tracebacks of errors (also: {DEBUG_ENV}=1)."
    )

    def error(message: str) -> NoReturn:
        parser.exit(2, f"error: {message}\n(the options: {parser.prog} --help)\n")

    parser.error = error  # type: ignore[method-assign]


def describe_error(error: BaseException) -> str:
    """One line for a user: the library's own message, or what an ``OSError`` means and what to do."""
    from ..errors import OptimumADMMError

    if isinstance(error, (OptimumADMMError, ValueError)):
        return str(error)
    if isinstance(error, OSError):
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        if error.errno == errno.ENOSPC:
            return f"no space left on the device{where}; free some space or write the output elsewhere (--output)"
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"permission denied{where}; choose a directory you can write to"
        return f"{error.strerror or error}{where}"
    return f"{type(error).__name__}: {error}"


class GuardedCommand(BaseOptimumCLICommand):
    """A subcommand whose work is :meth:`execute`, run inside the error boundary."""

    def execute(self) -> None:  # pragma: no cover - every subcommand defines it
        raise NotImplementedError

    def _interrupted_message(self) -> str:
        checkpoint = getattr(self.args, "checkpoint_dir", None)
        if checkpoint and (Path(checkpoint) / "state.json").is_file():
            return f"interrupted; re-run the same command to resume from the checkpoint in {checkpoint}"
        return "interrupted; no output was written"

    def run(self) -> None:
        debug = bool(getattr(self.args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
        try:
            self.execute()
        except SystemExit:
            raise
        except KeyboardInterrupt:
            if debug:
                raise
            print(f"\n{self._interrupted_message()}", file=sys.stderr)
            raise SystemExit(130) from None
        except Exception as error:  # the boundary: every error becomes one line
            if debug:
                raise
            from ..errors import OptimumADMMError

            print(f"error: {describe_error(error)}", file=sys.stderr)
            if not isinstance(error, (OptimumADMMError, ValueError, OSError)):
                print(f"this is unexpected: re-run with --debug ({DEBUG_ENV}=1) and report it", file=sys.stderr)
            raise SystemExit(getattr(error, "exit_code", 1)) from None
