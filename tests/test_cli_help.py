"""`tbcm --help` and every subcommand's --help print their usage and exit 0; `tbcm serve --help` and
`tbcm loadtest --help` need neither aiohttp nor locust (the [bench] extra)."""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from tbcm.cli.main import COMMAND_MODULES, build_parser
from tbcm.cli.options import add_config_options


def subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_there_are_subcommands_to_check():
    assert {"serve", "loadtest", "swap", "store-model", "distill"} <= set(subcommands())


def test_the_lazy_command_table_names_each_subcommands_module():
    """Every subcommand is in COMMAND_MODULES, and its module alone builds a parser that knows it."""
    assert set(COMMAND_MODULES) == set(subcommands())
    for command, module in COMMAND_MODULES.items():
        parser = build_parser([command])
        action = next(a for a in parser._actions if a.dest == "command")
        assert command in action.choices, (command, module)


def help_in_a_fresh_python(argvs: list[list[str]], before: str = "", after: str = ""):
    """Run `tbcm ARGV` for each of `argvs` (each a --help, exiting 0) in a new interpreter, with code before and
    after; the finished process."""
    code = (f"import sys\n{before}\n"
            "from tbcm.cli.main import main\n"
            f"for argv in {argvs!r}:\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit as done:\n"
            "        assert done.code == 0, (argv, done.code)\n"
            f"{after}\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_swap_and_loadtest_import_neither_torch_nor_diffusers():
    """An operator's client beside a live server must not pay the distillation modules' imports."""
    help_in_a_fresh_python([["swap", "--help"], ["loadtest", "--help"]],
                           after="assert not {'torch', 'diffusers', 'transformers'} & set(sys.modules)")


@pytest.mark.parametrize("command", subcommands())
def test_every_subcommand_help_prints_its_usage(command, capsys):
    from tbcm.cli.main import main

    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert f"usage: tbcm {command}" in capsys.readouterr().out


def test_help_works_without_the_bench_extra():
    """aiohttp and locust made unimportable: the parser (every subcommand) still builds and prints."""
    result = help_in_a_fresh_python([["--help"], ["serve", "--help"], ["loadtest", "--help"]],
                                    before="sys.modules['aiohttp'] = sys.modules['locust'] = None")
    assert "usage: tbcm loadtest" in result.stdout and "--repeat-ratio" in result.stdout


@dataclasses.dataclass
class PercentConfig:
    share: float = 0.16  # 16% of the budget


def test_a_percent_sign_in_a_config_comment_prints_in_help():
    parser = argparse.ArgumentParser(prog="tbcm x")
    add_config_options(parser, PercentConfig)
    assert "16% of the budget (default: 0.16)" in " ".join(parser.format_help().split())
