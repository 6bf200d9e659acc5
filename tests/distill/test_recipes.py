"""Named recipes: each builds a valid config that records its name, options given beside it win, the shipped
student is the shipped recipe, exports name their recipe, and data-scm+dmd trains."""
import dataclasses
import json
import math
from pathlib import Path

import pytest

from tbcm.cli.distill import distill_config, sources
from tbcm.cli.main import build_parser, main
from tbcm.distill.config import DistillConfig
from tbcm.distill.export import export_student
from tbcm.distill.recipes import METHOD_KNOBS, RECIPES, method_of, recipe_changes
from tbcm.distill.trainer import Distiller

SHIPPED = Path(__file__).resolve().parents[2] / "weights" / "student" / "tbcm.json"
TINY = dict(steps=2, prompts_per_step=2, route_points=4, sample_every=0, eval_every=0, checkpoint_every=1,
            tangent_warmup=2)


def parsed(*argv: str) -> DistillConfig:
    return distill_config(build_parser().parse_args(["distill", *argv]))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_recipe_builds_a_valid_config_that_records_its_name(name):
    config = parsed("--recipe", name)
    assert config == DistillConfig.from_recipe(name) and config.recipe == name
    assert all(getattr(config, knob) == value for knob, value in RECIPES[name].items())
    assert method_of(config) == name and recipe_changes(config) == {}


def test_recipes_are_what_their_names_say():
    tbcm, synthetic = DistillConfig.from_recipe("tbcm"), DistillConfig.from_recipe("synthetic-scm")
    assert (tbcm.points_per_trajectory, tbcm.renoised_per_trajectory, tbcm.dmd_weight) == (tbcm.route_points - 1, 0, 0)
    assert (tbcm.prior_weight, tbcm.learn_logvar, tbcm.time_sampling) == ("tan", True, "route")
    assert (synthetic.points_per_trajectory, synthetic.renoised_per_trajectory) == (0, 15)
    assert DistillConfig.from_recipe("tbcm+synthetic").renoised_per_trajectory == 2
    data, data_dmd = DistillConfig.from_recipe("data-scm"), DistillConfig.from_recipe("data-scm+dmd")
    assert data.pairs == data_dmd.pairs == "data" and (data.dmd_weight, data_dmd.dmd_weight) == (0, 0.1)
    assert {k for k in METHOD_KNOBS if getattr(data, k) != getattr(data_dmd, k)} == {"dmd_weight", "dmd_fake_updates",
                                                                                     "dmd_shift"}


def test_options_given_beside_a_recipe_win_and_the_manifest_says_so():
    # --prior-weight tan is the config's own default: given, it still beats the recipe's uniform
    config = parsed("--recipe", "tbcm+synthetic+dmd", "--prior-weight", "tan", "--steps", "7", "--seed", "3")
    assert (config.prior_weight, config.steps, config.seed, config.learn_logvar) == ("tan", 7, 3, False)
    assert recipe_changes(config) == {"prior_weight": ["uniform", "tan"], "steps": [1400, 7]}
    assert parsed("--recipe", "tbcm", "--no-learn-logvar").learn_logvar is False
    assert recipe_changes(parsed("--recipe", "tbcm", "--logvar-detached")) == {"logvar_detached": [False, True]}
    assert parsed().recipe == "" and parsed() == DistillConfig()  # no recipe: the config's defaults


def test_an_unknown_recipe_is_named_before_any_work(tmp_path, capsys):
    assert main(["distill", "--recipe", "tcbm", "--teacher", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "--recipe must be one of ['data-scm', 'data-scm+dmd', 'synthetic-scm', 'synthetic-scm+dmd', 'tbcm'" in capsys.readouterr().err


def test_the_shipped_student_is_the_shipped_recipe():
    """The config recorded in the shipped student's manifest (made before recipes, by the Makefile's options)
    is tbcm+synthetic+dmd's with the run's source and folders, knob for knob."""
    saved = json.loads(SHIPPED.read_text())["manifest"]["config"]
    given = {k: saved[k] for k in ("teacher", "prompts", "seed", "out", "rollouts")}
    recipe = json.loads(json.dumps(dataclasses.asdict(DistillConfig.from_recipe("tbcm+synthetic+dmd", **given))))
    added = ("agreement_n", "logvar_detached")  # knobs added since the run (loading its config gives them their defaults)
    assert {k: v for k, v in saved.items() if k not in (*DistillConfig.retired, "recipe")} == \
        {k: v for k, v in recipe.items() if k not in ("recipe", *added)}
    old_run = DistillConfig(**{k: v for k, v in recipe.items() if k != "recipe"} | {"cfg_scales": (4.0, 4.5, 5.0)})
    assert method_of(old_run) == "tbcm+synthetic+dmd"  # a run without a recipe is named by the one it matches
    assert method_of(dataclasses.replace(old_run, dmd_weight=0.2)) == "custom"


def test_an_export_names_its_recipe_and_zero_trajectory_points_train(tiny_teacher_dir, tmp_path):
    config = DistillConfig.from_recipe("synthetic-scm", teacher=str(tiny_teacher_dir), out=str(tmp_path / "run"),
                                       renoised_per_trajectory=3, **TINY)
    distiller = Distiller(config, sources(config))
    pairs, _, _ = distiller.make_pairs()
    assert len(pairs.t) == 2 * 3  # re-noised endpoints only
    distiller.train()
    folder = export_student(distiller.pipeline(), distiller.teacher, distiller.config, tmp_path / "student",
                            distiller.step, distiller.counters)
    manifest = json.loads((folder / "tbcm.json").read_text())["manifest"]
    assert manifest["method"] == "synthetic-scm" and manifest["config"]["recipe"] == "synthetic-scm"
    assert manifest["recipe_changes"] == {"renoised_per_trajectory": [15, 3], "route_points": [16, 4],
                                          "steps": [1400, 2], "tangent_warmup": [280, 2]}


def test_data_scm_with_dmd_trains_from_fresh_noise(tiny_teacher_dir, tmp_path):
    config = DistillConfig.from_recipe("data-scm+dmd", teacher=str(tiny_teacher_dir), out=str(tmp_path / "run"),
                                       points_per_trajectory=2, dmd_fake_updates=1, **TINY)
    distiller = Distiller(config, sources(config))
    pairs, _, starts = distiller.make_pairs()
    assert len(pairs.t) == 4 and starts.t.tolist() == [pytest.approx(math.pi / 2)] * 2  # one start per prompt
    assert starts.x_t.isfinite().all() and starts.x0.isnan().all()  # fresh noise, with no endpoint to regress on
    assert (starts.states == pairs.states[::2]).all()  # each prompt's caption
    distiller.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(row["dmd"] > 0 and row["fake"] > 0 for row in rows)
    assert distiller.counters["skipped_steps"] == 0
