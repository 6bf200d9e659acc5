"""Assembling the shipped embedded world from training runs: weights/teacher (a pipeline folder) and
weights/evaluator, with the configs and reports of the runs that made them recorded in tbcm.json."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from diffusers import AutoencoderDC, SanaTransformer2DModel

from tbcm.world.evaluate import EvalConfig, evaluate
from tbcm.world.evaluator import Evaluator
from tbcm.models.pipeline import (TEXT_ENCODER_PACKAGE, WEIGHTS_DIR, Pipeline, default_scheduler,
                                  embedded_text_encoder, save_pipeline)
from tbcm.models.training import CHECKPOINT, read_safetensors


def run_record(run: Path) -> dict:
    """The config a run was trained with, and its report if it wrote one."""
    _, meta = read_safetensors(run / CHECKPOINT)
    report = run / "report.json"
    return {"config": meta["config"], "step": meta["step"],
            "report": json.loads(report.read_text()) if report.exists() else None}


def component_record(folder: Path, key: str) -> dict | None:
    """The record of a run folder, or of a shipped pipeline folder's component (its tbcm.json[key])."""
    if (folder / CHECKPOINT).exists():
        return run_record(folder)
    manifest = folder / "tbcm.json"
    return json.loads(manifest.read_text()).get(key) if manifest.exists() else None


def ship_world(vae_run: Path, evaluator_run: Path | None, teacher_run: Path, weights: Path | None = None,
               eval_n: int = 512) -> Path:
    """Write weights/evaluator (unless evaluator_run is None: keep the shipped one) and weights/teacher; with
    eval_n > 0 the teacher's 16-step eval on both splits goes into its tbcm.json. `vae_run` may also be a shipped
    pipeline folder, and a teacher run continued from one (init_from) records where it started."""
    weights = Path(weights or WEIGHTS_DIR)
    teacher_record = run_record(teacher_run)
    init_from = teacher_record["config"].get("init_from", "")
    teacher_record["init_run"] = component_record(Path(init_from).parent, "teacher_run") if init_from else None
    config = teacher_record["config"]
    pipe = Pipeline(SanaTransformer2DModel.from_pretrained(teacher_run / "transformer", use_safetensors=True),
                    AutoencoderDC.from_pretrained(vae_run / "vae", use_safetensors=True),
                    embedded_text_encoder(config["max_sequence_length"]),
                    default_scheduler(False, config["sample_shift"]))
    info = {"kind": "teacher", "image_size": config["image_size"],
            "max_sequence_length": config["max_sequence_length"], "text_encoder_package": TEXT_ENCODER_PACKAGE,
            "made_by": "make world", "vae_run": component_record(vae_run, "vae_run"),
            "teacher_run": teacher_record, "eval": {}}
    if evaluator_run is not None:
        ship_evaluator(evaluator_run, weights)
    for split in ("train", "heldout") if eval_n else ():
        result = evaluate(EvalConfig(model="teacher", steps=16, prompts=split, n=eval_n,
                                     evaluator=str(weights / "evaluator")), pipe)
        info["eval"][split] = {k: result[k] for k in ("fd", "accuracy", "accuracy_per_attribute", "nfe", "steps")}
        print(f"teacher, 16 steps, {split}: FD {result['fd']:.1f}, accuracy {result['accuracy']:.3f}")
    save_pipeline(pipe, weights / "teacher", info)
    print(f"shipped {weights / 'teacher'}" + (f" and {weights / 'evaluator'}" if evaluator_run is not None else ""))
    return weights


def ship_evaluator(evaluator_run: Path, weights: Path) -> None:
    evaluator = Evaluator.load(evaluator_run / "evaluator")
    tmp = weights / "evaluator.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    evaluator.save(tmp)
    (tmp / "record.json").write_text(json.dumps(run_record(evaluator_run), indent=2))
    shutil.rmtree(weights / "evaluator", ignore_errors=True)
    tmp.rename(weights / "evaluator")
