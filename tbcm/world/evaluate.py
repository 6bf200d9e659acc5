"""`tbcm eval`: FD to real procedural images, improved precision and recall (fidelity and diversity, on the same
evaluator features and reference images as FD), prompt-attribute accuracy, NFE and images/s, plus a sample grid.

Prompts are captions of fresh scenes from the chosen split (train or held-out combinations); the reference set is
an independent set of real renders of the same split. `--model real` scores real renders instead of generated
images, which gives the floor: the FD between two independent real sets.
"""
from __future__ import annotations

import json
import platform
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tbcm.world import world
from tbcm.world.evaluator import Evaluator, attribute_accuracy, attribute_errors, frechet_distance, measure, targets_of
from tbcm.world.manifold import precision_recall
from tbcm.models.card import is_shapes_world
from tbcm.models.generator import DEFAULT_GUIDANCE, Generator
from tbcm.models.pipeline import WEIGHTS_DIR, Pipeline, load_pipeline
from tbcm.models.training import save_grid

EVAL_SEED_BASE = 10**9        # prompt scenes: disjoint from every training seed range
REFERENCE_SEED_BASE = 2 * 10**9  # the independent real reference set


@dataclass
class EvalConfig:
    model: str = "teacher"          # pipeline folder, shipped name (teacher, student), or "real"
    steps: int | None = None        # sampling steps (default: 1 for students, 16 for teachers)
    guidance: float = DEFAULT_GUIDANCE  # CFG scale (teachers) or embedded guidance (students)
    intermediate_times: tuple = ()  # student times between pi/2 and 0 (steps - 1); (): SanaSprintPipeline's
    sampler: str = "scheduler"      # a teacher's: its folder's scheduler, "euler" or "trigflow" (TBCM's route)
    prompts: str = "train"          # "train" or "heldout" attribute combinations
    n: int = 512                    # images generated and real reference images
    batch_size: int = 64            # images per generator call
    seed: int = 0                   # offsets every scene and noise seed
    evaluator: str = str(WEIGHTS_DIR / "evaluator")  # evaluator folder
    json: str | None = None         # where to write the JSON (a grid PNG is written beside it)


def images_to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def evaluate(config: EvalConfig, pipeline: Pipeline | None = None) -> dict:
    """Score `config.model` (or an already loaded `pipeline`, e.g. a student mid-training)."""
    evaluator = Evaluator.load(Path(config.evaluator))
    size = evaluator.config["image_size"]
    scenes = [world.sample_scene(EVAL_SEED_BASE + config.seed * config.n + i, config.prompts)
              for i in range(config.n)]
    references = [world.sample_scene(REFERENCE_SEED_BASE + config.seed * config.n + i, config.prompts)
                  for i in range(config.n)]
    result = {"model": config.model, "prompts": config.prompts, "n": config.n}
    if config.model == "real":
        images = world.render_tensor(scenes, size)
        result |= {"nfe": 0, "images_per_s": None, "steps": 0}
    else:
        pipeline = pipeline or load_pipeline(config.model)
        if not is_shapes_world(pipeline.info):
            warnings.warn(f"{config.model} is not a shapes-world folder (its tbcm.json records no vae_run): the shapes "
                          f"evaluator's numbers say little about it; a distillation reports its teacher agreement")
        generator = Generator(pipeline, intermediate_times=config.intermediate_times, sampler=config.sampler)
        steps = config.steps or generator.default_steps
        generator.generate([scenes[0].caption], [0], steps, config.guidance)  # warm-up, not timed
        chunks, elapsed = [], 0.0
        for i in tqdm(range(0, config.n, config.batch_size), desc=f"eval {config.model}", unit="batch"):
            part = scenes[i:i + config.batch_size]
            t0 = time.perf_counter()
            out = generator.generate([s.caption for s in part], [EVAL_SEED_BASE + config.seed * config.n + i + j
                                                                 for j in range(len(part))], steps, config.guidance)
            elapsed += time.perf_counter() - t0
            chunks.append(out.images)
        images = images_to_unit(torch.cat(chunks))
        nfe = steps if generator.pipe.is_student else 2 * steps  # CFG doubles every teacher step
        result |= {"nfe": nfe, "images_per_s": config.n / elapsed, "steps": steps, "guidance": config.guidance,
                   "student": generator.pipe.is_student}
    feats, logits = measure(evaluator, images)
    ref_feats, _ = measure(evaluator, world.render_tensor(references, size))
    targets = targets_of(scenes)
    accuracy, per_attribute = attribute_accuracy(logits, targets)
    result |= {"fd": frechet_distance(feats, ref_feats), **precision_recall(ref_feats, feats), "accuracy": accuracy,
               "accuracy_per_attribute": per_attribute, "errors_per_attribute": attribute_errors(logits, targets),
               "machine": f"{platform.machine()}, "
               f"{torch.get_num_threads()} threads, torch {torch.__version__}", "config": asdict(config)}
    if config.json:
        out = Path(config.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        save_grid(((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1),
                  out.with_suffix(".png"))
    return result
