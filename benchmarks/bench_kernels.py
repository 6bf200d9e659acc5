"""Time the Triton kernels against their PyTorch counterparts at Sana sizes (needs a GPU).

    python -m benchmarks.bench_kernels [--json runs/bench_kernels.json] [--layers 28] [--smoke]

Sections (bf16, random weights):
  1. each kernel vs kernels.reference (diffusers' maths): forward, forward+backward and
     torch.func.jvp, at Sana 600M (hidden 1152, cross-attn 16 x 72) and 1.6B (2240, 20 x 112)
     widths, linear-attention head dim 32, 1024 image tokens (1024px), 300 caption tokens;
  2. one TBCM-like training iteration of the 600M transformer: torch.func.jvp of the student
     (no grad) plus a forward/backward, with and without kernels.install;
  3. the one-step generator (transformer step + AutoencoderDC decode, DC-AE f32c32 layout) at
     1024px, batch 1 and 8, eager vs CudaGraphRunner.
Without CUDA it says so, runs a tiny smoke version of every section (Triton interpreter,
wall-clock timings that mean nothing) and exits 0. Results go to a table and to --json.
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the smoke version runs the kernels in Triton's CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import diffusers  # noqa: E402
import triton  # noqa: E402
from diffusers import AutoencoderDC, SanaTransformer2DModel  # noqa: E402
from diffusers.models.normalization import RMSNorm  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from tbcm import kernels  # noqa: E402
from tbcm.kernels import FusedRMSNorm, reference  # noqa: E402
from tbcm.kernels.cross_attention import softmax_attention  # noqa: E402
from tbcm.kernels.layer_norm_modulate import layer_norm_modulate  # noqa: E402
from tbcm.kernels.linear_attention import linear_attention  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32  # the interpreter cannot do bf16


@dataclass(frozen=True)
class Size:
    name: str
    hidden: int
    cross_heads: int
    cross_head_dim: int
    tokens: int = 1024  # a 32 x 32 latent: 1024px through DC-AE's x32 downsampling
    caption_tokens: int = 300
    batch: int = 2
    linear_head_dim: int = 32


SANA_SIZES = [Size("600M", 1152, 16, 72), Size("1.6B", 2240, 20, 112)]
SMOKE_SIZE = Size("smoke", 64, 2, 32, tokens=4, caption_tokens=3, batch=1)


def measure(fn, smoke: bool) -> tuple[float, float | None]:
    """(median milliseconds, peak MiB allocated above the starting point, None on CPU) of fn()."""
    for _ in range(0 if smoke else 4):  # compile, autotune, capture, allocate
        fn()
    repeats = 1 if smoke else 10
    times = []
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_memory = torch.cuda.memory_allocated()
    for _ in range(repeats):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - began))
    peak = (torch.cuda.max_memory_allocated() - start_memory) / 2**20 if CUDA else None
    return sorted(times)[len(times) // 2], peak


def compare(results, section, name, baseline, candidate, smoke, note=None):
    """Measure the (label, fn) pairs baseline and candidate into one result row; a failure is recorded, not raised."""
    row = dict(section=section, name=name, baseline=baseline[0], candidate=candidate[0])
    if note:
        row["note"] = note
    for role, (_, fn) in (("baseline", baseline), ("candidate", candidate)):
        try:
            row[f"{role}_ms"], row[f"{role}_peak_mib"] = measure(fn, smoke)
        except Exception as error:  # an OOM or a capture failure is a result too
            row[f"{role}_error"] = f"{type(error).__name__}: {str(error)[:200]}"
        if CUDA:
            torch.cuda.empty_cache()
    results.append(row)
    print(format_row(row) + (f"  ({note})" if note else ""), flush=True)


def format_row(row) -> str:
    def cell(role):
        if f"{role}_error" in row:
            return f"{'error':>10} {'':>9}"
        peak = row[f"{role}_peak_mib"]
        return f"{row[f'{role}_ms']:10.3f} {'-' if peak is None else f'{peak:.0f}':>9}"
    speedup = (f"{row['baseline_ms'] / row['candidate_ms']:6.2f}x"
               if "baseline_ms" in row and "candidate_ms" in row else "   n/a")
    return f"{row['section']:<10} {row['name']:<44} {cell('baseline')} {cell('candidate')} {speedup}"


def gradient_step(fn, inputs):
    """forward + backward through fn for all inputs (which require grad)."""
    def step():
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
    return step


def jvp_step(fn, inputs, math_attention=False):
    tangents = [torch.randn_like(x) for x in inputs]

    def step():
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext():
            torch.func.jvp(fn, tuple(x.detach() for x in inputs), tuple(tangents))
    return step


def bench_ops(results, size: Size, smoke):
    """Each kernel vs its reference, forward / forward+backward / jvp."""
    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=DEVICE, dtype=DTYPE)).requires_grad_()

    b, n, d = size.batch, size.tokens, size.hidden
    cross_width = size.cross_heads * size.cross_head_dim
    caption_mask = torch.ones(b, size.caption_tokens, device=DEVICE)
    caption_mask[0, size.caption_tokens // 2:] = 0
    key_bias = (1 - caption_mask) * -10000.0
    linear_heads = d // size.linear_head_dim
    qk_norm = RMSNorm(d, eps=1e-5).to(DEVICE, DTYPE)  # diffusers' module against the fused one sharing its weight
    ops = {  # name: (kernel fn, reference fn, inputs, reference needs math attention for jvp)
        "rms_norm (QK norm)": (FusedRMSNorm.sharing_parameters_of(qk_norm), qk_norm, [randn(b, n, d)], False),
        "layer_norm_modulate": (layer_norm_modulate, reference.layer_norm_modulate,
                                [randn(b, n, d), randn(b, 1, d, scale=0.1), randn(b, 1, d, scale=0.1)], False),
        f"linear_attention {linear_heads}x{size.linear_head_dim}": (
            lambda q, k, v: linear_attention(q, k, v, linear_heads),
            lambda q, k, v: reference.linear_attention(q, k, v, linear_heads),
            [randn(b, n, d) for _ in range(3)], False),
        f"softmax_attention {size.cross_heads}x{size.cross_head_dim}": (
            lambda q, k, v: softmax_attention(q, k, v, size.cross_heads, key_bias),
            lambda q, k, v: reference.softmax_attention(q, k, v, size.cross_heads, key_bias),
            [randn(b, n, cross_width), randn(b, size.caption_tokens, cross_width),
             randn(b, size.caption_tokens, cross_width)], True),
    }
    for op_name, (kernel_fn, reference_fn, inputs, math_for_jvp) in ops.items():
        name = f"{op_name} {size.name}"
        compare(results, "forward", name, ("pytorch", lambda: reference_fn(*inputs)),
                ("triton", lambda: kernel_fn(*inputs)), smoke)
        compare(results, "fwd+bwd", name, ("pytorch", gradient_step(reference_fn, inputs)),
                ("triton", gradient_step(kernel_fn, inputs)), smoke)
        compare(results, "jvp", name, ("pytorch-math" if math_for_jvp else "pytorch",
                                       jvp_step(reference_fn, inputs, math_for_jvp)),
                ("triton", jvp_step(kernel_fn, inputs)), smoke)


def sana_transformer(layers: int, smoke: bool) -> SanaTransformer2DModel:
    """Sana(-Sprint) 600M layout (random weights), or a toy of the same structure for the smoke run."""
    if smoke:
        width = dict(num_attention_heads=2, num_cross_attention_heads=2, cross_attention_head_dim=32,
                     cross_attention_dim=64, caption_channels=32, sample_size=2)
    else:
        width = dict(num_attention_heads=36, num_cross_attention_heads=16, cross_attention_head_dim=72,
                     cross_attention_dim=1152, caption_channels=2304, sample_size=32)
    return SanaTransformer2DModel(in_channels=32, out_channels=32, attention_head_dim=32, num_layers=layers,
                                  mlp_ratio=2.5, patch_size=1, qk_norm="rms_norm_across_heads", guidance_embeds=True,
                                  **width)


def transformer_inputs(model, batch):
    config = model.config
    size, captions = config.sample_size, 3 if config.caption_channels < 256 else 300
    caption_mask = torch.ones(batch, captions, device=DEVICE)
    caption_mask[:, captions // 2:] = 0
    return dict(latents=torch.randn(batch, config.in_channels, size, size, device=DEVICE, dtype=DTYPE),
                captions=torch.randn(batch, captions, config.caption_channels, device=DEVICE, dtype=DTYPE),
                caption_mask=caption_mask, timestep=torch.rand(batch, device=DEVICE, dtype=DTYPE),
                guidance=torch.full((batch,), 4.5, device=DEVICE, dtype=DTYPE))


def bench_training(results, layers: int, smoke: bool):
    """torch.func.jvp of the student (no grad, as sCM's tangent) + forward/backward of a loss."""
    model = sana_transformer(layers, smoke).to(DEVICE, DTYPE).train()
    inputs = transformer_inputs(model, batch=1 if smoke else 2)
    tangents = (torch.randn_like(inputs["latents"]), torch.randn_like(inputs["timestep"]))

    def student(latents, timestep):
        return model(latents, inputs["captions"], timestep, guidance=inputs["guidance"],
                     encoder_attention_mask=inputs["caption_mask"], return_dict=False)[0]

    def iteration():
        primals = (inputs["latents"], inputs["timestep"])
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # diffusers' SDPA has no forward AD otherwise
            _, tangent = torch.func.jvp(student, primals, tangents)
        loss = (student(*primals).float() - tangent.float()).square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    def with_kernels():
        kernels.install(model)  # a no-op after the first call
        iteration()

    name = f"TBCM iteration 600M layout, {layers} layers, batch {inputs['latents'].shape[0]}"
    note = None if layers == 28 else f"{layers} layers, not Sana 600M's 28 (--layers)"
    compare(results, "training", name, ("diffusers", iteration), ("kernels", with_kernels), smoke, note)
    kernels.uninstall(model)


def dc_ae(smoke: bool) -> AutoencoderDC:
    """DC-AE f32c32 (Sana 1.0) layout with random weights, or a two-stage toy for the smoke run."""
    if smoke:
        widths, encoder_depths, decoder_depths, head_dim = (16, 32), (1, 1), (1, 1), 16
    else:
        widths, head_dim = (128, 256, 512, 512, 1024, 1024), 32
        encoder_depths, decoder_depths = (2, 2, 2, 3, 3, 3), (3, 3, 3, 3, 3, 3)
    # ResBlock stages, then EfficientViT stages with multi-scale 5 (f32c32: three and three)
    convolutional = len(widths) // 2
    blocks = ("ResBlock",) * convolutional + ("EfficientViTBlock",) * (len(widths) - convolutional)
    multiscales = ((),) * convolutional + ((5,),) * (len(widths) - convolutional)
    return AutoencoderDC(
        in_channels=3, latent_channels=32, attention_head_dim=head_dim, encoder_block_types=blocks,
        decoder_block_types=blocks, encoder_block_out_channels=widths, decoder_block_out_channels=widths,
        encoder_layers_per_block=encoder_depths, decoder_layers_per_block=decoder_depths,
        encoder_qkv_multiscales=multiscales, decoder_qkv_multiscales=multiscales, upsample_block_type="interpolate",
        downsample_block_type="Conv", decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)


def bench_generator(results, layers: int, smoke: bool):
    """transformer step at t = pi/2 + DC-AE decode, eager vs CudaGraphRunner (kernels installed in both)."""
    transformer = kernels.install(sana_transformer(layers, smoke).to(DEVICE, DTYPE).eval())
    vae = dc_ae(smoke).to(DEVICE, DTYPE).eval()

    def one_step(latents, captions, caption_mask, timestep, guidance):
        velocity = transformer(latents, captions, timestep, guidance=guidance, encoder_attention_mask=caption_mask,
                               return_dict=False)[0]
        angle = timestep.view(-1, 1, 1, 1)
        denoised = torch.cos(angle) * latents - torch.sin(angle) * velocity  # TrigFlow one-step estimate
        return vae.decode(denoised / vae.config.scaling_factor, return_dict=False)[0]

    runner = kernels.CudaGraphRunner(one_step)
    for batch in (3,) if smoke else (1, 8):  # 3: padded to the bucket of 4
        inputs = transformer_inputs(transformer, batch)
        inputs["timestep"].fill_(math.pi / 2)
        args = [inputs[key] for key in ("latents", "captions", "caption_mask", "timestep", "guidance")]
        side = transformer.config.sample_size
        image = f"toy {side}x{side} latent" if smoke else f"{side * 32}px"  # DC-AE f32: 32 pixels per latent
        with torch.no_grad():
            compare(results, "generator", f"one-step {image}, {layers} layers, batch {batch}",
                    ("eager+kernels", lambda: one_step(*args)),
                    ("cuda-graph" if runner.available else "runner-eager", lambda: runner(*args)), smoke,
                    runner.reason)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="runs/bench_kernels.json", help="where to write the results")
    parser.add_argument("--layers", type=int, default=28, help="transformer depth for sections 2 and 3 (Sana 600M: 28)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes only (implied without CUDA)")
    args = parser.parse_args(argv)
    smoke = args.smoke or not CUDA
    if not CUDA:
        print("No CUDA device: running the tiny smoke version on CPU (Triton interpreter); timings are meaningless.")
    layers = 1 if smoke else args.layers
    diffusers.utils.logging.set_verbosity_error()  # not the per-model "cast with .to()" advice
    torch.manual_seed(0)
    report = dict(device=torch.cuda.get_device_name() if CUDA else "cpu", cuda=CUDA, smoke=smoke,
                  torch=torch.__version__, triton=triton.__version__, diffusers=diffusers.__version__,
                  dtype=str(DTYPE), kernels=kernels.reason(), layers=layers, results=[])
    print(" | ".join([report["device"], f"torch {torch.__version__}", f"triton {triton.__version__}", str(DTYPE),
                      report["kernels"]]))
    print(f"{'section':<10} {'case':<44} {'base ms':>10} {'base MiB':>9} {'cand ms':>10} {'cand MiB':>9} speedup")
    for size in [SMOKE_SIZE] if smoke else SANA_SIZES:
        bench_ops(report["results"], size, smoke)
    bench_training(report["results"], layers, smoke)
    bench_generator(report["results"], layers, smoke)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
