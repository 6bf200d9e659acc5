"""`tbcm` entry point: one subcommand per job, each defined in its own module under cli/.

A command line that names its subcommand imports only the module that defines it: the distillation and world
modules import torch and diffusers (about 8 s of CPU on two cores), which an operator's `tbcm swap` or
`tbcm loadtest` run beside a live server must not cost it. `tbcm --help` (or no known subcommand) imports them all.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> the module whose `register(sub)` defines it (tests/test_cli_help.py checks this against them)
COMMAND_MODULES = {
    "world": "tbcm.cli.world", "generate": "tbcm.cli.world", "eval": "tbcm.cli.world",
    "distill": "tbcm.cli.distill", "rollout": "tbcm.cli.distill", "export": "tbcm.cli.distill",
    "serve": "tbcm.cli.service", "loadtest": "tbcm.cli.service", "swap": "tbcm.cli.service",
    "store-model": "tbcm.cli.service",
    "deploy": "tbcm.cli.deploy",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or, when `argv`'s first word names one, of that one alone."""
    parser = argparse.ArgumentParser(prog="tbcm", description="TBCM distillation of Sana-family text-to-image "
                                     "models, and serving of the one-step student.")
    sub = parser.add_subparsers(dest="command", required=True)
    named = COMMAND_MODULES.get(argv[0]) if argv else None
    for module in [named] if named else dict.fromkeys(COMMAND_MODULES.values()):
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # bad input: a clear message, no traceback
        print(f"tbcm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
