"""The symmetric equal-time study's arms (benchmarks/equal_time_grid.py): each is the recipe its name says, the arms
differ in the method only, and the time to the bars is read off the curve."""
import argparse
import dataclasses
from pathlib import Path

from benchmarks.equal_time_grid import ARMS, arm_command, time_to_bars
from tbcm.cli.distill import distill_config
from tbcm.cli.main import build_parser
from tbcm.distill.config import DistillConfig

BANK_S = 200.0
# what may differ between arms: the method (pairs, DMD), the run's own paths and budget (the bank's time is TBCM's),
# and the length of a calm-down that never starts (calm_down_start is past every step in every arm)
METHOD = {"recipe", "pairs", "points_per_trajectory", "renoised_per_trajectory", "dmd_weight", "dmd_fake_updates",
          "dmd_shift", "out", "rollouts", "time_budget_s", "calm_down_steps"}


def arm_config(arm: str, tmp_path: Path) -> DistillConfig:
    args = argparse.Namespace(out=tmp_path, budget=1200.0)
    cmd = arm_command(args, arm, 0, None if arm.startswith("data") else BANK_S)
    assert cmd[1] == "distill"
    return distill_config(build_parser().parse_args(cmd[1:]))


def test_the_arms_differ_in_their_method_only_with_4_pairs_per_prompt_each(tmp_path):
    configs = {arm: arm_config(arm, tmp_path) for arm in ARMS}
    tbcm = configs["tbcm"]
    for arm, config in configs.items():
        differ = {f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(tbcm, f.name)}
        assert differ <= METHOD, (arm, differ - METHOD)
        assert config.recipe == arm and config.calm_down_start > config.steps
        assert (config.prior_weight, config.learn_logvar, config.cosine_decay) == ("uniform", False, True)
        assert config.points_per_trajectory + config.renoised_per_trajectory == 4
        assert (config.dmd_weight > 0) == arm.endswith("+dmd")
        on_bank = config.pairs == "trajectory"
        assert on_bank == (config.rollouts is not None)
        assert config.time_budget_s == (1200.0 - BANK_S if on_bank else 1200.0) and config.fit_schedule_to_budget
    assert configs["synthetic-scm"].points_per_trajectory == 0 and configs["tbcm"].renoised_per_trajectory == 0
    assert configs["data-scm"].pairs == "data"


def test_an_arm_stopped_midway_resumes_from_its_checkpoint(tmp_path):
    args = argparse.Namespace(out=tmp_path, budget=1200.0)
    assert "--resume" not in arm_command(args, "tbcm", 0, BANK_S)
    (tmp_path / "tbcm-s0").mkdir()
    (tmp_path / "tbcm-s0" / "checkpoint.safetensors").write_bytes(b"")
    assert arm_command(args, "tbcm", 0, BANK_S)[-1] == "--resume"
    assert "--resume" not in arm_command(args, "tbcm", 1, BANK_S)  # another seed's run folder


def test_the_time_to_the_bars_is_the_first_evaluation_meeting_both():
    teacher = {"fd": 100.0, "accuracy": 1.0}
    curve = [{"train_time_s": 0.0, "fd": 500.0, "accuracy": 0.7},
             {"train_time_s": 100.0, "fd": 120.0, "accuracy": 0.9},   # FD in, accuracy not
             {"train_time_s": 200.0, "fd": 140.0, "accuracy": 0.96},  # accuracy in, FD not
             {"train_time_s": 300.0, "fd": 129.0, "accuracy": 0.95},  # both: 1.29x and 0.95x
             {"train_time_s": 400.0, "fd": 110.0, "accuracy": 0.97}]
    assert time_to_bars(curve, 150.0, teacher) == 450.0  # the bank's seconds count
    assert time_to_bars(curve[:3], 0.0, teacher) is None
