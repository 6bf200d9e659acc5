"""Assembling the shipped embedded world from training runs: weights/teacher (a pipeline folder) and
weights/evaluator, with the configs and reports of the runs that made them recorded in tbcm.json."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from diffusers import AutoencoderDC, SanaTransformer2DModel

from .evaluator import Evaluator
from .pipeline import TEXT_ENCODER_PACKAGE, WEIGHTS_DIR, Pipeline, default_scheduler, embedded_text_encoder, \
    save_pipeline
from .training import CHECKPOINT, read_safetensors


def run_record(run: Path) -> dict:
    """The config a run was trained with, and its report if it wrote one."""
    _, meta = read_safetensors(run / CHECKPOINT)
    report = run / "report.json"
    return {"config": meta["config"], "step": meta["step"],
            "report": json.loads(report.read_text()) if report.exists() else None}


def ship_world(vae_run: Path, evaluator_run: Path, teacher_run: Path, weights: Path | None = None) -> Path:
    weights = Path(weights or WEIGHTS_DIR)
    teacher_record = run_record(teacher_run)
    config = teacher_record["config"]
    pipe = Pipeline(SanaTransformer2DModel.from_pretrained(teacher_run / "transformer", use_safetensors=True),
                    AutoencoderDC.from_pretrained(vae_run / "vae", use_safetensors=True),
                    embedded_text_encoder(config["max_sequence_length"]),
                    default_scheduler(False, config["sample_shift"]))
    info = {"kind": "teacher", "image_size": config["image_size"],
            "max_sequence_length": config["max_sequence_length"], "text_encoder_package": TEXT_ENCODER_PACKAGE,
            "made_by": "make world", "vae_run": run_record(vae_run), "teacher_run": teacher_record}
    save_pipeline(pipe, weights / "teacher", info)
    evaluator = Evaluator.load(evaluator_run / "evaluator")
    tmp = weights / "evaluator.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    evaluator.save(tmp)
    (tmp / "record.json").write_text(json.dumps(run_record(evaluator_run), indent=2))
    shutil.rmtree(weights / "evaluator", ignore_errors=True)
    tmp.rename(weights / "evaluator")
    print(f"shipped {weights / 'teacher'} and {weights / 'evaluator'}")
    return weights
