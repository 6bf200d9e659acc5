"""`tbcm` entry point: one subcommand per job, each defined in its own module under cli/."""
from __future__ import annotations

import argparse
import sys

from tbcm.cli import deploy as deploy_commands
from tbcm.cli import distill as distill_commands
from tbcm.cli import service as service_commands
from tbcm.cli import world as world_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tbcm", description="TBCM distillation of Sana-family text-to-image "
                                     "models, and serving of the one-step student.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (world_commands, distill_commands, service_commands, deploy_commands):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # bad input: a clear message, no traceback
        print(f"tbcm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
