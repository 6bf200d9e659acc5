"""The generator: bit-identical images per (prompt, seed) whatever the batch, agreement with plain PyTorch
references of the one-step student and the CFG teacher, request checks and stage timings."""
import pytest
import torch

from tbcm.models.generator import Generator
from tbcm.models.sampling import seeded_noise, to_uint8

TARGET, SEED = "a small red circle on the left", 1234
OTHERS = ["a big blue box at the top", "there is a tiny green cross", "medium yellow disc in the middle",
          "an image of a huge purple triangle", "at the bottom, a small orange square", "red"]


@pytest.fixture
def pipes(teacher_pipe, student_pipe):
    return {"teacher": teacher_pipe, "student": student_pipe}


def fresh_cache(pipe):
    pipe.text._cache.clear()  # so each batch encodes its prompts itself, with its own neighbours


@pytest.mark.parametrize("which,steps,threads", [("student", 1, 1), ("student", 2, 1), ("student", 4, 1),
                                                 ("teacher", 2, 1), ("student", 2, 2), ("teacher", 2, 2)])
def test_image_depends_only_on_prompt_and_seed(pipes, which, steps, threads):
    """Also with two intra-op threads (the session default here), where CPU kernels may split work by batch size;
    one student and one teacher case there, since two threads crawl on a loaded 2-core machine."""
    torch.set_num_threads(threads)  # restored by the autouse _threads fixture
    pipe = pipes[which]
    generator = Generator(pipe)
    fresh_cache(pipe)
    alone = generator.generate([TARGET], [SEED], steps).images
    assert alone.shape == (1, 16, 16, 3) and alone.dtype == torch.uint8
    fresh_cache(pipe)
    three = generator.generate([OTHERS[0], TARGET, OTHERS[1]], [7, SEED, 9], steps).images
    fresh_cache(pipe)
    prompts = OTHERS[:5] + [TARGET] + OTHERS[5:]
    seeds = [21, 22, 23, 24, SEED + 1, SEED, 26]
    seven = generator.generate(prompts, seeds, steps).images
    assert seven.shape == (7, 16, 16, 3)
    assert torch.equal(three[1], alone[0])
    assert torch.equal(seven[5], alone[0])
    # a different seed (same prompt) and a different prompt (same seed) give different images
    assert not torch.equal(seven[4], alone[0])
    assert not torch.equal(generator.generate([OTHERS[2]], [SEED], steps).images[0], alone[0])
    # and repeating the call repeats the images
    assert torch.equal(generator.generate([OTHERS[0], TARGET, OTHERS[1]], [7, SEED, 9], steps).images, three)


def test_per_image_guidance_is_batch_invariant(student_pipe):
    generator = Generator(student_pipe)
    alone = generator.generate([TARGET], [SEED], 1, guidance=3.0).images
    batch = generator.generate([OTHERS[0], TARGET], [5, SEED], 1, guidance=[6.0, 3.0]).images
    assert torch.equal(batch[1], alone[0])
    assert not torch.equal(generator.generate([TARGET], [SEED], 1, guidance=6.0).images, alone)


def test_one_step_student_matches_a_plain_reference(student_pipe):
    """x0' = noise - v(noise, s=1) at t = pi/2 (k = 1, F = v - x_fm), then the VAE decode."""
    seeds, prompts = [3, 4, 5], [TARGET, OTHERS[0], OTHERS[1]]
    images = Generator(student_pipe).generate(prompts, seeds, 1, guidance=4.5).images
    states, mask = student_pipe.text.encode(prompts)
    noise = torch.stack([torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():
        v = student_pipe.transformer(noise, encoder_hidden_states=states, encoder_attention_mask=mask,
                                     timestep=torch.ones(3), guidance=torch.full((3,), 0.45)).sample
        decoded = student_pipe.vae.decode((noise - v) / student_pipe.vae.config.scaling_factor).sample
    reference = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert (images.int() - reference.int()).abs().max() <= 1
    assert (images.int() - reference.int()).abs().float().mean() < 0.05


def test_teacher_matches_a_plain_flow_euler_cfg_reference(teacher_pipe):
    steps, shift, w = 4, teacher_pipe.flow_shift, 4.5
    seeds, prompts = [3, 4], [TARGET, OTHERS[0]]
    images = Generator(teacher_pipe).generate(prompts, seeds, steps, guidance=w).images
    states, mask = teacher_pipe.text.encode(prompts)
    null_states, null_mask = teacher_pipe.text.encode(["", ""])
    x = seeded_noise(seeds, (4, 4, 4))[0]
    lin = torch.linspace(1.0, 0.0025, steps, dtype=torch.float64)
    sigmas = (shift * lin / (1 + (shift - 1) * lin)).tolist() + [0.0]
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            ts = torch.full((2,), s)
            cond = teacher_pipe.transformer(x, encoder_hidden_states=states, encoder_attention_mask=mask,
                                            timestep=ts).sample
            null = teacher_pipe.transformer(x, encoder_hidden_states=null_states, encoder_attention_mask=null_mask,
                                            timestep=ts).sample
            x = x + (s_next - s) * (null + w * (cond - null))
        decoded = teacher_pipe.vae.decode(x / teacher_pipe.vae.config.scaling_factor).sample
    reference = to_uint8(decoded)
    assert (images.int() - reference.int()).abs().max() <= 1
    assert (images.int() - reference.int()).abs().float().mean() < 0.05


@pytest.mark.parametrize("sampler", ["euler", "trigflow"])
def test_teacher_samplers_agree_with_the_folders_scheduler(teacher_pipe, student_pipe, sampler):
    """The tiny teacher ships FlowMatchEulerDiscreteScheduler(shift=2.5), whose set_timesteps gives the sigmas of
    flow-Euler and of TBCM's TrigFlow route: the default (the folder's scheduler) and both flags agree."""
    prompts, seeds = [TARGET, OTHERS[0]], [3, 4]
    default = Generator(teacher_pipe).generate(prompts, seeds, 4).images.int()
    chosen = Generator(teacher_pipe, sampler=sampler).generate(prompts, seeds, 4).images.int()
    assert (default - chosen).abs().max() <= 1
    with pytest.raises(ValueError, match="sampler 'euler' is a teacher's"):
        Generator(student_pipe, sampler="euler")
    with pytest.raises(ValueError, match="sampler must be one of"):
        Generator(teacher_pipe, sampler="ddim")


def test_check_names_the_field(student_pipe, teacher_pipe):
    student, teacher = Generator(student_pipe), Generator(teacher_pipe)
    for steps in (0, 5):
        with pytest.raises(ValueError, match="steps"):
            student.generate([TARGET], [0], steps=steps)
    with pytest.raises(ValueError, match="steps"):
        teacher.check(101, 16)
    teacher.check(100, 16)
    student.check(4, 16)
    for size in (0, 2, 18):
        with pytest.raises(ValueError, match="size"):
            student.generate([TARGET], [0], steps=1, size=size)
    assert student.default_steps == 1 and teacher.default_steps == 16
    timed = Generator(student_pipe, intermediate_times=(0.9,))
    timed.check(2, 16)
    with pytest.raises(ValueError, match=r"intermediate_times must hold steps - 1 = 2 decreasing"):
        timed.generate([TARGET], [0], steps=3)
    with pytest.raises(ValueError, match="intermediate_times are a student's sampling times"):
        Generator(teacher_pipe, intermediate_times=(0.9,)).generate([TARGET], [0], steps=2)


def test_sizes_and_timings(student_pipe):
    generator = Generator(student_pipe)
    out = generator.generate([TARGET, OTHERS[0]], [1, 2])
    assert out.images.shape == (2, 16, 16, 3)  # the folder's default size
    assert set(out.timings) == {"text_encoding", "transformer", "vae_decode"}
    assert all(isinstance(v, float) and v >= 0 for v in out.timings.values())
    bigger = generator.generate([TARGET], [1], steps=1, size=32)
    assert bigger.images.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("steps", [1, 2])
def test_bfloat16_pipeline_agrees_with_float32(tiny_student_dir, student_pipe, steps):
    from tbcm.models.pipeline import load_pipeline

    prompts, seeds = [TARGET, OTHERS[0], OTHERS[1]], [3, 4, 5]
    full = Generator(student_pipe).generate(prompts, seeds, steps).images.int()
    half_pipe = load_pipeline(tiny_student_dir, dtype=torch.bfloat16)
    assert next(half_pipe.transformer.parameters()).dtype == torch.bfloat16
    half = Generator(half_pipe).generate(prompts, seeds, steps).images.int()
    assert half.shape == full.shape
    assert (half - full).abs().max() <= 12 and (half - full).abs().float().mean() < 2.0  # bf16: ~3 digits


def test_generation_latents_are_what_is_decoded(student_pipe):
    assert Generator(student_pipe).generate(["a red circle"], [4], 2).latents is None  # the serving path copies none
    out = Generator(student_pipe).generate(["a red circle"], [4], 2, keep_latents=True)
    with torch.no_grad():
        decoded = student_pipe.vae.decode(out.latents / student_pipe.vae.config.scaling_factor).sample
    images = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert (images.int() - out.images.int()).abs().max() <= 1
