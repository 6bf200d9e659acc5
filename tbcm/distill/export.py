"""Export: a trained student becomes a diffusers pipeline folder that `SanaSprintPipeline.from_pretrained` loads.

The folder holds the student transformer (guidance embedding on, log-variance head dropped), an `SCMScheduler`,
the teacher's VAE, text encoder and tokenizer, and a manifest in tbcm.json: the teacher it came from (path and
SHA-256 of its transformer weights), the method, the full config, and eval numbers when asked for.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from tbcm.world.evaluate import EvalConfig, evaluate
from tbcm.models.pipeline import Pipeline, load_pipeline, save_pipeline

from tbcm.distill.config import DistillConfig
from tbcm.distill.student import extrapolate_from_teacher


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def teacher_fingerprint(teacher: Pipeline) -> dict:
    weights = sorted((teacher.path / "transformer").glob("*.safetensors"))
    return {"path": str(teacher.path), "transformer_sha256": {p.name: file_sha256(p) for p in weights}}


def export_student(student: Pipeline, teacher: Pipeline, config: DistillConfig, out: Path, step: int,
                   counters: dict, eval_n: int = 0, standalone: bool = False) -> Path:
    """Write the folder atomically; with eval_n > 0, measure 1-step FD/accuracy on both splits first. The weights
    written are config.export_extrapolation of the way from the teacher to the student (1: the student's own)."""
    if config.export_extrapolation != 1:
        student = dataclasses.replace(student, transformer=extrapolate_from_teacher(
            student.transformer, teacher.transformer, config.export_extrapolation))
    manifest = {"kind": "student", "method": "tbcm" if config.pairs == "trajectory" else "scm-data",
                "teacher": teacher_fingerprint(teacher), "step": step, "counters": counters,
                "config": {k: v for k, v in config.__dict__.items()}, "eval": {}}
    if eval_n:
        for split in ("train", "heldout"):
            result = evaluate(EvalConfig(model=str(out), steps=1, prompts=split, n=eval_n), student)
            manifest["eval"][split] = {k: result[k] for k in ("fd", "accuracy", "nfe", "images_per_s")}
    # the teacher's eval, maker and training run describe the teacher: its run goes under manifest["teacher"]
    inherited = {k: v for k, v in teacher.info.items() if k not in ("eval", "made_by", "teacher_run")}
    if "teacher_run" in teacher.info:
        manifest["teacher"]["run"] = teacher.info["teacher_run"]
    student.info = {**inherited, "kind": "student"}
    return save_pipeline(student, out, {**student.info, "manifest": manifest}, copy_text_encoder=standalone)


def load_student_checkpoint(run: Path):
    """(student pipeline from the run's EMA weights, teacher, config, step, counters) of a distill run."""
    from tbcm.models.training import CHECKPOINT, read_safetensors

    from tbcm.distill.student import student_from_teacher
    from tbcm.distill.trainer import student_pipeline

    tensors, meta = read_safetensors(Path(run) / CHECKPOINT)
    config = DistillConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
    teacher = load_pipeline(config.teacher)
    transformer = student_from_teacher(teacher.transformer, config.guidance_embeds_scale).eval()
    transformer.load_state_dict({k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")})
    return student_pipeline(teacher, transformer), teacher, config, meta["step"], meta["extra"]["counters"]
