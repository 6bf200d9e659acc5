"""Named recipes: each a set of overrides of DistillConfig's defaults, all defined here (`tbcm distill --recipe`).

A run started from a recipe records its name (`DistillConfig.recipe`); explicit options override the recipe's
values, and the export manifest names the method (`method_of`) and any of the method's knobs that the run changed
(`recipe_changes`), so that a student says exactly what it is. Values are cited by paper: TBCM (arXiv 2511.20410,
its released config), Sana-Sprint (arXiv 2503.09641), sCM (arXiv 2410.11081) and rCM (arXiv 2510.08431: DMD as a
regulariser of sCM).

Schedule lengths: upstream TBCM warms the tangent up over 4000 iterations and calms it down over 15000 -> 17000,
and Sana-Sprint warms it up over 4000 of its 20000 iterations; their totals are far past our 1400-step runs, so
the recipes keep those lengths as shares of a 20000-iteration run (Sana-Sprint's; TBCM does not record its own),
scaled to 1400 steps: x 0.07. The optimizer stays ours in every recipe (AdamW at lr 1e-4 with a 20-step warm-up,
EMA 0.99; upstream's CAME at lr 1e-5 without EMA is tuned for a 0.6B model), so recipes differ in method only.
"""
from __future__ import annotations

STEPS = 1400  # the shipped student's step count, which every recipe runs
SCALE = STEPS / 20000  # upstream schedule lengths -> ours (see the module docstring)
UPSTREAM_SCHEDULE = {"steps": STEPS, "tangent_warmup": round(4000 * SCALE)}  # sCM/Sprint/TBCM tangent warm-up: 280
# sCM eq. 14 weighting: prior x learned, the log-variance head on the attached time embedding (Sana's, upstream's)
SCM = {**UPSTREAM_SCHEDULE, "prior_weight": "tan", "learn_logvar": True, "logvar_detached": False}
DMD = {"dmd_weight": 0.1, "dmd_fake_updates": 4, "dmd_shift": 1.0}  # the shipped DMD term (rCM's recipe)
SPRINT_TIMES = {"p_mean": 0.2, "p_std": 1.6}  # Sana-Sprint's released sCM time proposal (its yaml; paper: 0.0)

# upstream TBCM: the K-1 = 15 trajectory states of each rollout, route jitter, TBCM's tangent calm-down
TBCM = {**SCM, "pairs": "trajectory", "route_points": 16, "points_per_trajectory": 15, "time_sampling": "route",
        "renoised_per_trajectory": 0, "calm_down_start": round(15000 * SCALE), "calm_down_steps": round(2000 * SCALE),
        "final_r": 0.75}
# Sana-Sprint's sCM on captioned images: 15 noised images per prompt (tbcm's batch), no LADD
DATA_SCM = {**SCM, **SPRINT_TIMES, "pairs": "data", "points_per_trajectory": 15}

# sCM on the teacher's samples only: no trajectory state, 15 re-noised endpoints per rollout (tbcm's batch), at
# Sana-Sprint's weighting and times, so that it differs from data-scm in where x0 comes from only
SYNTHETIC_SCM = {**SCM, **SPRINT_TIMES, "pairs": "trajectory", "points_per_trajectory": 0,
                 "renoised_per_trajectory": 15}

RECIPES: dict[str, dict] = {
    "tbcm": TBCM,
    # TBCM plus the DMD term on the one-step samples from each rollout's start noise (rCM's regulariser)
    "tbcm+dmd": {**TBCM, **DMD},
    # TBCM plus 2 re-noised teacher endpoints per rollout (sCM on the teacher's own samples, off the trajectory)
    "tbcm+synthetic": {**TBCM, "renoised_per_trajectory": 2},
    # the shipped student, exactly (the Makefile's options before recipes): 2 trajectory states + 2 re-noised
    # endpoints, uniform prior, no learned weighting, cosine decay, DMD; our own 100-step tangent warm-up. Not
    # tbcm+synthetic plus DMD: its weighting, points and schedule differ too
    "tbcm+synthetic+dmd": {"steps": STEPS, "learn_logvar": False, "prior_weight": "uniform", "cosine_decay": True,
                           "pairs": "trajectory", "points_per_trajectory": 2, "renoised_per_trajectory": 2, **DMD},
    "synthetic-scm": SYNTHETIC_SCM,
    "synthetic-scm+dmd": {**SYNTHETIC_SCM, **DMD},
    "data-scm": DATA_SCM,
    # data-scm plus the DMD term; data pairs have no rollout noise, so its one-step samples start from fresh noise
    "data-scm+dmd": {**DATA_SCM, **DMD},
}
METHOD_KNOBS = sorted({knob for overrides in RECIPES.values() for knob in overrides})  # what tells recipes apart
CUSTOM = "custom"  # the method of a run that names no recipe and matches none


def recipe_overrides(name: str) -> dict:
    """The overrides of recipe `name` ("": none); a clear error naming --recipe for an unknown one."""
    if name and name not in RECIPES:
        raise ValueError(f"--recipe must be one of {sorted(RECIPES)} (or none), got {name!r}")
    return RECIPES.get(name, {})


def recipe_changes(config) -> dict:
    """{knob: [the recipe's value, the run's]} for each method knob the run changed from its recipe's."""
    if not config.recipe:
        return {}
    preset = type(config)(**recipe_overrides(config.recipe))
    return {knob: [getattr(preset, knob), getattr(config, knob)] for knob in METHOD_KNOBS
            if getattr(preset, knob) != getattr(config, knob)}


def method_of(config) -> str:
    """The recipe a run names; for one that names none (runs made before recipes), the recipe whose method knobs
    it matches, else "custom"."""
    if config.recipe:
        return config.recipe
    for name in RECIPES:
        if not recipe_changes(type(config)(**{**_method_values(config), "recipe": name})):
            return name
    return CUSTOM


def _method_values(config) -> dict:
    return {knob: getattr(config, knob) for knob in METHOD_KNOBS}
