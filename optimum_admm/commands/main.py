"""The ``optimum-admm`` console script: the ``optimum-cli admm`` subcommands, without going through optimum-cli."""

from __future__ import annotations

from collections.abc import Sequence

from optimum.commands.base import CommandInfo, RootOptimumCLICommand

from .admm import ADMMCommand

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``optimum-admm prune ...`` / ``optimum-admm evaluate ...`` / ``optimum-admm shear ...``.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Example:
        >>> main(["evaluate", "--model", "smollm2-admm-60", "--dataset", "wikitext2"])  # doctest: +SKIP
    """
    root = RootOptimumCLICommand("optimum-admm", usage="optimum-admm {prune,evaluate,shear} ...")
    for info in ADMMCommand.SUBCOMMANDS:
        root.register_subcommand(CommandInfo(info.name, help=info.help, subcommand_class=info.subcommand_class))
    args = root.parser.parse_args(argv)
    if not hasattr(args, "func"):
        root.parser.print_help()
        raise SystemExit(1)
    args.func(args).run()


if __name__ == "__main__":
    main()
