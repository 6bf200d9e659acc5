"""Conformance with diffusers: for Sana / Sana-Sprint folders built by plain diffusers and transformers calls
(tests/sana_folders.py) and for the shipped folders, `Generator` images equal those of diffusers' own pipeline
called with its defaults (same prompt, seed, steps, guidance, size), and the encoder states and the velocity at a
given state equal diffusers' encode_prompt and transformer call.

Only what a tiny random folder cannot have is passed to diffusers: `use_resolution_binning=False` (binning renders
square prompts at 1024 px and resizes; the folders' sample sizes are no Sana bin) and, for a student at 1 or 4
steps, `intermediate_timesteps=None` (SanaSprintPipeline's default intermediate time only works at 2 steps).
"""
from __future__ import annotations

import inspect
import json
import re

import numpy as np
import pytest
import torch
from diffusers import SanaPipeline, SanaSprintPipeline
from sana_folders import IMAGE_SIZE, SPECS, make_folder

from tbcm.models.generator import Generator
from tbcm.models.card import model_card
from tbcm.models.pipeline import WEIGHTS_DIR, load_pipeline
from tbcm.models.sampling import cfg_flow_model, flow_model

PROMPTS = {
    "mixed-case": "  A Small RED Circle, on the LEFT of a Blue SQUARE.  ",
    "long": "A tiny purple plus sign near the top, " * 12,  # 456 characters: past the 300-token limit
}
TEACHER_STEPS = 6
# SanaSprintPipeline's schedule per step count: its defaults at 2 steps; elsewhere its intermediate time must be
# off (it raises otherwise), which leaves SCMScheduler's evenly spaced times.
SPRINT_SCHEDULES = {1: {"intermediate_timesteps": None}, 2: {}, 4: {"intermediate_timesteps": None}}
MIN_PSNR_DB = 40.0
STATE_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=0, rtol=0)}
# CFG at w = 4.5 scales a per-call rounding difference (other batch shapes: other reduction orders) by 2w - 1 = 8
VELOCITY_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            built[name] = make_folder(SPECS[name], tmp_path_factory.mktemp("sana") / name)
        return built[name]
    return get


@pytest.fixture(scope="module")
def pipes(folder):
    """(ours, diffusers') per folder name, loaded once: ours by load_pipeline, theirs by from_pretrained."""
    loaded = {}

    def get(name):
        if name not in loaded:
            spec = SPECS[name]
            cls = SanaSprintPipeline if spec.sprint else SanaPipeline
            theirs = cls.from_pretrained(folder(name), dtype=spec.dtype, variant=spec.variant)
            theirs.set_progress_bar_config(disable=True)
            loaded[name] = load_pipeline(folder(name), dtype=spec.dtype), theirs
        return loaded[name]
    return get


def diffusers_image(theirs, prompt, seed, steps, **schedule) -> np.ndarray:
    """diffusers' pipeline with its defaults, but for the size, seed, steps and guidance."""
    return np.asarray(theirs(prompt, num_inference_steps=steps, guidance_scale=4.5, height=IMAGE_SIZE,
                             width=IMAGE_SIZE, use_resolution_binning=False,
                             generator=torch.Generator().manual_seed(seed), **schedule).images[0])


def our_image(pipe, prompt, seed, steps) -> np.ndarray:
    return Generator(pipe).generate([prompt], [seed], steps, 4.5, IMAGE_SIZE).images[0].numpy()


CASES = [(name, prompt, steps) for name, spec in SPECS.items() for prompt in PROMPTS
         for steps in (SPRINT_SCHEDULES if spec.sprint else (TEACHER_STEPS,))]


@pytest.mark.parametrize("name,prompt,steps", CASES)
def test_images_match_diffusers_pipeline(pipes, name, prompt, steps):
    ours, theirs = pipes(name)
    schedule = SPRINT_SCHEDULES[steps] if SPECS[name].sprint else {}
    expected = diffusers_image(theirs, PROMPTS[prompt], 7, steps, **schedule)
    got = our_image(ours, PROMPTS[prompt], 7, steps)
    value = psnr(got, expected)
    print(f"PSNR {name} {prompt} steps={steps}: {value:.1f} dB")
    assert got.shape == expected.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert value >= MIN_PSNR_DB, f"{name} / {prompt} / {steps} steps: {value:.1f} dB"
    assert expected.std() > 1  # the image is not flat, so agreement means something


def check_states_and_velocity(ours, theirs, prompts: list[str], **encode_kwargs) -> None:
    """Our encoder states against diffusers' encode_prompt (called as the pipeline's __call__ calls it), then one
    (CFG) velocity at a given flow state and time against diffusers' transformer call, as the pipeline makes it."""
    sprint, dtype = isinstance(theirs, SanaSprintPipeline), theirs.transformer.dtype
    encoded = theirs.encode_prompt(prompts, device="cpu", **encode_kwargs,
                                   **({} if sprint else {"do_classifier_free_guidance": True}))
    states, mask = ours.text.encode(prompts)
    torch.testing.assert_close(states.to(dtype), encoded[0], **STATE_TOL[dtype])
    assert torch.equal(mask, encoded[1])
    channels, side = theirs.transformer.config.in_channels, theirs.transformer.config.sample_size
    x = torch.randn(len(prompts), channels, side, side, generator=torch.Generator().manual_seed(0))
    s = torch.linspace(0.7, 0.25, len(prompts))
    transformer = theirs.transformer
    with torch.no_grad():
        if sprint:  # SanaSprintPipeline: flow time itself, guidance w x guidance_embeds_scale
            guidance = torch.full((len(prompts),), 4.5).to(dtype) * transformer.config.guidance_embeds_scale
            ours_v = flow_model(ours.transformer, states.to(dtype), mask, guidance=guidance)(x, s)
            kwargs = {"timestep": s, "guidance": guidance}
        else:  # SanaPipeline: scheduler timestep (sigma x 1000) x timestep_scale; CFG against the negative prompt
            null_states, null_mask = ours.text.null(len(prompts))
            torch.testing.assert_close(null_states.to(dtype), encoded[2], **STATE_TOL[dtype])
            ours_v = cfg_flow_model(ours.transformer, states.to(dtype), mask, null_states.to(dtype), null_mask,
                                    torch.full((len(prompts),), 4.5))(x, s)
            kwargs = {"timestep": s * 1000 * transformer.config.timestep_scale}
        call = dict(encoder_attention_mask=encoded[1], return_dict=False, **kwargs)
        theirs_v = transformer(x.to(dtype), encoder_hidden_states=encoded[0], **call)[0].float()
        if not sprint:
            null_v = transformer(x.to(dtype), encoder_hidden_states=encoded[2],
                                 **{**call, "encoder_attention_mask": encoded[3]})[0].float()
            theirs_v = null_v + 4.5 * (theirs_v - null_v)
    torch.testing.assert_close(ours_v, theirs_v, **VELOCITY_TOL[dtype])


@pytest.mark.parametrize("name", list(SPECS))
def test_encoder_states_and_velocity_match_diffusers(pipes, name):
    """diffusers' call defaults: lower-casing, max_sequence_length 300, the complex human instruction for prompts
    and none for the negative prompt."""
    ours, theirs = pipes(name)
    instruction = inspect.signature(type(theirs).__call__).parameters["complex_human_instruction"].default
    assert ours.text.max_length == 300 and ours.text.complex_human_instruction == instruction
    check_states_and_velocity(ours, theirs, list(PROMPTS.values()), complex_human_instruction=instruction)


def test_variant_folder_loads_without_naming_the_variant(folder):
    spec = SPECS["sprint-bf16"]
    pipe = load_pipeline(folder("sprint-bf16"), dtype=spec.dtype)
    assert pipe.transformer.dtype == pipe.text.encoder.dtype == pipe.vae.dtype == torch.bfloat16
    assert load_pipeline(folder("sprint-bf16"), variant="bf16").text.encoder.dtype == torch.float32


SHIPPED = ("teacher", "student")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_card_is_the_one_its_folder_gives(name):
    """weights/<name>/README.md is what save_pipeline writes for the folder today (recipe, numbers, the call)."""
    info = json.loads((WEIGHTS_DIR / name / "tbcm.json").read_text())
    want = model_card(load_pipeline(name), info, f"weights/{name}")
    assert (WEIGHTS_DIR / name / "README.md").read_text() == want, (
        f"weights/{name}/README.md is stale: rewrite it with model_card (tbcm.models.card)")


def card_call(name: str) -> str:
    """The python block of the shipped folder's model card, pointed at the folder wherever it is."""
    card = (WEIGHTS_DIR / name / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    return code.replace(repr(f"weights/{name}"), repr(str(WEIGHTS_DIR / name)))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_folder_model_card_call_matches_tbcm_generate(name):
    """The exact call documented in weights/<name>/README.md, in plain diffusers, gives `tbcm generate`'s image."""
    scope: dict = {}
    exec(card_call(name), scope)  # noqa: S102 - the card's own code, the thing under test
    ours = load_pipeline(name)
    info = json.loads((WEIGHTS_DIR / name / "tbcm.json").read_text())
    steps = 1 if ours.is_student else 16
    got = Generator(ours).generate(["a large red circle on the left"], [0], steps, 4.5).images[0].numpy()
    value = psnr(got, np.asarray(scope["image"]))
    print(f"PSNR shipped {name} steps={steps}: {value:.1f} dB")
    assert value >= MIN_PSNR_DB and info["complex_human_instruction"] is None
    assert ours.transformer.config.timestep_scale == 0.001  # trained on flow time in [0, 1]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_folder_states_and_velocity_match_diffusers(name):
    scope: dict = {}
    exec(card_call(name).split("image = ")[0], scope)  # noqa: S102 - the card's from_pretrained call
    ours = load_pipeline(name)
    check_states_and_velocity(ours, scope["pipe"], ["A Large RED circle on the left", "a small blue square"],
                              max_sequence_length=ours.text.max_length, complex_human_instruction=None)


@pytest.mark.parametrize("steps", [2, 4])
def test_shipped_student_multistep_matches_diffusers(steps):
    scope: dict = {}
    exec(card_call("student").split("image = ")[0], scope)  # noqa: S102 - the card's from_pretrained call
    pipe = load_pipeline("student")
    kwargs = dict(max_sequence_length=pipe.text.max_length, complex_human_instruction=None,
                  **SPRINT_SCHEDULES[steps])
    size = pipe.default_size
    expected = np.asarray(scope["pipe"]("a small blue square at the top", num_inference_steps=steps,
                                        guidance_scale=4.5, height=size, width=size, use_resolution_binning=False,
                                        generator=torch.Generator().manual_seed(3), **kwargs).images[0])
    got = Generator(pipe).generate(["a small blue square at the top"], [3], steps, 4.5).images[0].numpy()
    value = psnr(got, expected)
    print(f"PSNR shipped student steps={steps}: {value:.1f} dB")
    assert value >= MIN_PSNR_DB
