"""Export: a trained student becomes a diffusers pipeline folder that `SanaSprintPipeline.from_pretrained` loads.

The folder holds the student transformer (guidance embedding on, log-variance head dropped), an `SCMScheduler`,
the teacher's VAE, text encoder and tokenizer, and a manifest in tbcm.json: the teacher it came from (path and
SHA-256 of its transformer weights), the method (its recipe, tbcm/distill/recipes.py) with any of the recipe's
method knobs the run changed, the full config (paths inside the current directory made relative to it), and its
evaluations, named in "evaluations": the teacher agreement (tbcm/distill/agreement.py, any teacher) under
"teacher_agreement", and, when asked for and an evaluator was given (a shapes-world teacher), the evaluator's
numbers per split under "eval" ("eval_status" says why there are none otherwise).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from tbcm.models.pipeline import Pipeline, load_pipeline, save_pipeline
from tbcm.models.training import CHECKPOINT, read_safetensors, saved_config

from tbcm.distill.agreement import NAME as AGREEMENT
from tbcm.distill.agreement import teacher_agreement, teacher_reference
from tbcm.distill.config import DistillConfig
from tbcm.distill.recipes import method_of, recipe_changes
from tbcm.distill.sources import Evaluator
from tbcm.distill.student import extrapolate_from_teacher, student_from_teacher, student_pipeline
from tbcm.distill.teacher import portable_path, teacher_fingerprint

EVALUATOR = "shapes-evaluator"  # the manifest's name for the evaluator's numbers ("eval")
PATH_FIELDS = ("teacher", "prompts", "out", "rollouts")  # the DistillConfig fields that hold paths


def eval_status(evaluator: Evaluator | None, eval_n: int) -> str:
    """What the manifest says of its "eval" numbers: measured, or why there are none."""
    if evaluator is None:
        return "not run: no evaluator (a prompt-file run, or a teacher not of the shapes world)"
    return f"run: {eval_n} images per split" if eval_n else "not run: eval n = 0"


def portable_config(config: DistillConfig) -> dict:
    """The config as the manifest records it: each path inside the current directory relative to it."""
    return dataclasses.asdict(config) | {name: portable_path(getattr(config, name)) for name in PATH_FIELDS}


def export_student(student: Pipeline, teacher: Pipeline, config: DistillConfig, out: Path, step: int,
                   counters: dict, evaluator: Evaluator | None = None, eval_n: int = 0,
                   standalone: bool = False, agreement_prompts: list[str] = ()) -> Path:
    """Write the folder atomically; first measure the teacher agreement on `config.agreement_n` images of
    `agreement_prompts` (when both are given), and with eval_n > 0 and an evaluator score the 1-step student on
    each of its splits. The weights written (and measured) are config.export_extrapolation of the way from the
    teacher to the student (1: the student's own)."""
    if config.export_extrapolation != 1:
        student = dataclasses.replace(student, transformer=extrapolate_from_teacher(
            student.transformer, teacher.transformer, config.export_extrapolation))
    manifest = {"kind": "student", "method": method_of(config), "recipe_changes": recipe_changes(config),
                "teacher": teacher_fingerprint(teacher), "step": step, "counters": counters,
                "config": portable_config(config), "evaluations": [], "eval": {},
                "eval_status": eval_status(evaluator, eval_n)}
    if config.agreement_n and agreement_prompts:
        reference = teacher_reference(teacher, list(agreement_prompts), config.agreement_n)
        manifest["teacher_agreement"] = teacher_agreement(student, reference)
        manifest["evaluations"].append(AGREEMENT)
    if evaluator is not None and eval_n:
        manifest["eval"] = {split: evaluator.evaluate(student, eval_n, split) for split in evaluator.splits}
        manifest["eval_n"] = eval_n
        manifest["evaluations"].append(EVALUATOR)
    # the teacher's eval, maker and training run describe the teacher: its run goes under manifest["teacher"]
    inherited = {k: v for k, v in teacher.info.items() if k not in ("eval", "made_by", "teacher_run")}
    if "teacher_run" in teacher.info:
        manifest["teacher"]["run"] = teacher.info["teacher_run"]
    student.info = {**inherited, "kind": "student"}
    return save_pipeline(student, out, {**student.info, "manifest": manifest}, copy_text_encoder=standalone)


def load_student_checkpoint(run: Path):
    """(student pipeline from the run's EMA weights, teacher, config, step, counters) of a distill run."""
    path = Path(run) / CHECKPOINT
    tensors, meta = read_safetensors(path)
    config = saved_config(DistillConfig, meta["config"], path)
    teacher = load_pipeline(config.teacher)
    transformer = student_from_teacher(teacher.transformer, config.guidance_embeds_scale).eval()
    transformer.load_state_dict({k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")})
    return student_pipeline(teacher, transformer), teacher, config, meta["step"], meta["extra"]["counters"]
