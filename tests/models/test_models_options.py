"""cli/options.py: config dataclasses -> argparse options and back, with comments as help."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import pytest

from tbcm.cli.options import add_config_options, config_from_args


@dataclass
class Demo:
    seed: int = 0                      # everything is a function of it
    lr: float = 1e-3                   # peak learning rate
    name: str = "run"                  # a label
    ema: bool = True                   # keep an EMA of the weights
                                       #   of the model (a continued comment)
    # a section comment, not a continuation
    compile: bool = False              # torch.compile the student
    channels: tuple = (16, 32)         # one entry per stage
    scales: tuple = (4.0, 4.5, 5.0)    # CFG scales to draw from
    steps: int | None = None           # optional step count
    out: Optional[str] = None          # where to write
    internal: int = 7                  # skipped below
    tags: list = field(default_factory=list)


def parser_for(cls=Demo, skip=("internal", "tags")) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_config_options(parser, cls, skip=skip)
    return parser


def test_defaults_round_trip():
    config = config_from_args(Demo, parser_for().parse_args([]))
    assert config == Demo()


def test_values_are_parsed_to_the_field_types():
    args = parser_for().parse_args(["--seed", "3", "--lr", "0.5", "--name", "x", "--no-ema", "--compile",
                                    "--channels", "8,16,32", "--scales", "4.0,5", "--steps", "2", "--out", "o"])
    config = config_from_args(Demo, args)
    assert config == Demo(seed=3, lr=0.5, name="x", ema=False, compile=True, channels=(8, 16, 32),
                          scales=(4.0, 5), steps=2, out="o")
    assert type(config.seed) is int and type(config.lr) is float and type(config.steps) is int
    assert all(type(c) is int for c in config.channels) and type(config.scales[0]) is float


def test_bool_flags_go_both_ways():
    parser = parser_for()
    assert parser.parse_args(["--ema"]).ema is True and parser.parse_args(["--no-ema"]).ema is False
    assert parser.parse_args(["--compile"]).compile is True and parser.parse_args([]).compile is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--ema", "false"])


def test_bad_values_are_rejected():
    parser = parser_for()
    for argv in (["--seed", "x"], ["--steps", "1.5"], ["--channels", "a,b"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def test_comments_become_help_and_skip_is_honoured():
    parser = parser_for()
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["seed"] == "everything is a function of it (default: 0)"
    assert helps["channels"] == "one entry per stage (default: (16, 32))"
    assert helps["ema"] == "keep an EMA of the weights of the model (a continued comment) (default: True)"
    assert "section" not in helps["compile"]
    assert "internal" not in helps and "tags" not in helps
    text = parser.format_help()
    assert "--lr LR" in text and "--no-ema" in text and "peak learning rate" in text


def test_overrides_and_unknown_fields():
    args = parser_for().parse_args(["--seed", "3"])
    config = config_from_args(Demo, args, seed=9, internal=1)
    assert config.seed == 9 and config.internal == 1 and config.tags == []


@pytest.mark.parametrize("module,name", [
    ("tbcm.world.world_train", "VAEConfig"), ("tbcm.world.world_train", "EvaluatorConfig"),
    ("tbcm.world.teacher_train", "TeacherConfig"), ("tbcm.world.evaluate", "EvalConfig"),
    ("tbcm.distill.config", "DistillConfig"), ("tbcm.distill.config", "RolloutConfig")])
def test_project_configs_round_trip(module, name):
    """Every real config survives the round trip with no arguments, with one option per field, each with help
    (a field inherited from TrainConfig, or restated there with a new default, gets TrainConfig's)."""
    import importlib

    cls = getattr(importlib.import_module(module), name)
    parser = parser_for(cls, skip=())
    assert config_from_args(cls, parser.parse_args([])) == cls()
    for action in parser._actions[1:]:
        assert action.help.endswith(f"(default: {action.default})"), (name, action.dest)
        assert not action.help.startswith("(default"), f"{name}.{action.dest} has no help"
    assert {a.dest for a in parser._actions[1:]} == {f.name for f in dataclasses.fields(cls)}


def test_a_subclass_keeps_its_bases_help_for_a_restated_default():
    @dataclass
    class Longer(Demo):
        lr: float = 5e-2
        extra: int = 1                     # a knob of its own

    helps = {a.dest: a.help for a in parser_for(Longer)._actions}
    assert helps["lr"] == "peak learning rate (default: 0.05)"
    assert helps["seed"] == "everything is a function of it (default: 0)"
    assert helps["extra"] == "a knob of its own (default: 1)"
