"""``deploy-diff``: the command line, one module per subcommand.

Each subcommand module has ``NAME``, ``register(subparsers)`` (adds its parser) and ``run(args) -> int``, and may
list ``FLAG_WORDS`` (library argument names in error messages -> its flags). Modules import the library only
inside ``run``, so ``deploy-diff --help`` and the runtime commands never import torch.

Errors print one readable line and exit 1 (``--debug`` shows the traceback instead); an interrupt exits 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import bench, demo, distill, export, generate, inspect, sample, schedules, serve, timesteps, train
from ._common import error_line

__all__ = ["COMMANDS", "build_parser", "main"]

# in the order `deploy-diff --help` lists them
COMMANDS = {
    m.NAME: m for m in (schedules, train, distill, timesteps, export, sample, bench, serve, generate, demo, inspect)
}


def build_parser() -> argparse.ArgumentParser:
    """The ``deploy-diff`` parser with every subcommand registered."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="deploy-diff", description="Train a diffusion UNet in PyTorch, export it, and sample it without torch."
    )
    parser.add_argument("--version", action="version", version=f"deploy-diff {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``deploy-diff ARGV``; returns the exit status (0, 1 on an error, 2 without a command, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("deploy-diff: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one readable line unless --debug
        if args.debug:
            raise
        print(error_line(args.command, e, getattr(COMMANDS[args.command], "FLAG_WORDS", ())), file=sys.stderr)
        return 1
