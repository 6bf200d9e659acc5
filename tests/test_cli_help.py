"""`tbcm --help` and every subcommand's --help print their usage and exit 0; `tbcm serve --help` and
`tbcm loadtest --help` need neither aiohttp nor locust (the [bench] extra)."""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from tbcm.cli.main import build_parser
from tbcm.cli.options import add_config_options


def subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_there_are_subcommands_to_check():
    assert {"serve", "loadtest", "swap", "store-model", "distill"} <= set(subcommands())


@pytest.mark.parametrize("command", subcommands())
def test_every_subcommand_help_prints_its_usage(command, capsys):
    from tbcm.cli.main import main

    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert f"usage: tbcm {command}" in capsys.readouterr().out


def test_help_works_without_the_bench_extra():
    """aiohttp and locust made unimportable: the parser (every subcommand) still builds and prints."""
    code = ("import sys; sys.modules['aiohttp'] = sys.modules['locust'] = None\n"
            "from tbcm.cli.main import main\n"
            "for argv in (['--help'], ['serve', '--help'], ['loadtest', '--help']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit as done:\n"
            "        assert done.code == 0, (argv, done.code)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: tbcm loadtest" in result.stdout and "--repeat-ratio" in result.stdout


@dataclasses.dataclass
class PercentConfig:
    share: float = 0.16  # 16% of the budget


def test_a_percent_sign_in_a_config_comment_prints_in_help():
    parser = argparse.ArgumentParser(prog="tbcm x")
    add_config_options(parser, PercentConfig)
    assert "16% of the budget (default: 0.16)" in " ".join(parser.format_help().split())
