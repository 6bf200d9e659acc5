"""kernels.install on a tiny SanaTransformer2DModel: same outputs, tangents and gradients; exact uninstall."""

import pytest
import torch
import torch.autograd.forward_ad as fwad
from diffusers import SanaTransformer2DModel
from kernel_test_utils import DEVICE, assert_close
from torch.nn.attention import SDPBackend, sdpa_kernel

from tbcm import kernels
from tbcm.kernels.sana_patch import FusedModulatedNorm, FusedSanaCrossAttnProcessor, FusedSanaLinearAttnProcessor


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64, caption_channels=32,
        sample_size=4, patch_size=1, qk_norm="rms_norm_across_heads", guidance_embeds=True)
    with torch.no_grad():  # move the norm weights off 1 and the embedders off their init
        for parameter in transformer.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return transformer.to(DEVICE).eval()


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    caption_mask = torch.ones(2, 7)
    caption_mask[1, 4:] = 0  # a padded caption
    tensors = dict(latents=torch.randn(2, 4, 4, 4, generator=generator),
                   captions=torch.randn(2, 7, 32, generator=generator), timestep=torch.rand(2, generator=generator),
                   guidance=torch.full((2,), 4.5), caption_mask=caption_mask,
                   latents_tangent=torch.randn(2, 4, 4, 4, generator=generator),
                   timestep_tangent=torch.randn(2, generator=generator))
    return {name: tensor.to(DEVICE) for name, tensor in tensors.items()}


def run(model, inputs):
    """(output, jvp tangent w.r.t. latents and timestep, parameter gradients of a squared loss)."""
    def student(latents, timestep):
        return model(latents, inputs["captions"], timestep, guidance=inputs["guidance"],
                     encoder_attention_mask=inputs["caption_mask"], return_dict=False)[0]

    with sdpa_kernel(SDPBackend.MATH):
        with torch.no_grad(), fwad.dual_level():  # dual tensors, as the trainer's JVP pass uses
            output, tangent = fwad.unpack_dual(student(fwad.make_dual(inputs["latents"], inputs["latents_tangent"]),
                                                       fwad.make_dual(inputs["timestep"], inputs["timestep_tangent"])))
        model.zero_grad()
        student(inputs["latents"], inputs["timestep"]).square().mean().backward()
    grads = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    model.zero_grad()
    return output, tangent, grads


@pytest.fixture(scope="module")
def diffusers_results(model, inputs):
    return run(model, inputs)


def test_installed_model_matches_diffusers(model, inputs, diffusers_results):
    expected_output, expected_tangent, expected_grads = diffusers_results
    kernels.install(model)
    try:
        output, tangent, grads = run(model, inputs)
    finally:
        kernels.uninstall(model)
    assert_close(output, expected_output, torch.float32, "output")
    assert_close(tangent, expected_tangent, torch.float32, "jvp tangent")
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], torch.float32, f"gradient of {name}")


def test_install_swaps_every_fused_piece(model):
    kernels.install(model)
    try:
        assert kernels.installed(model)
        for block in model.transformer_blocks:
            assert isinstance(block.attn1.processor, FusedSanaLinearAttnProcessor)
            assert isinstance(block.attn2.processor, FusedSanaCrossAttnProcessor)
            for attn in (block.attn1, block.attn2):
                assert isinstance(attn.norm_q, kernels.FusedRMSNorm) and isinstance(attn.norm_k, kernels.FusedRMSNorm)
            assert "forward" in vars(block)
        assert isinstance(model.caption_norm, kernels.FusedRMSNorm)
        assert isinstance(model.norm_out, FusedModulatedNorm)
    finally:
        kernels.uninstall(model)


def test_uninstall_restores_the_original_objects(model, inputs, diffusers_results):
    block = model.transformer_blocks[0]
    originals = [block.attn1.processor, block.attn2.processor, block.attn1.norm_q, block.attn2.norm_k,
                 model.caption_norm, model.norm_out]
    parameters = dict(model.named_parameters())
    kernels.install(model)
    kernels.install(model)  # a second install changes nothing
    assert dict(model.named_parameters()) == parameters  # the very same Parameter objects, same names
    kernels.uninstall(model)
    kernels.uninstall(model)  # and so does a second uninstall
    assert not kernels.installed(model)
    assert [block.attn1.processor, block.attn2.processor, block.attn1.norm_q, block.attn2.norm_k,
            model.caption_norm, model.norm_out] == originals
    assert all("forward" not in vars(each) for each in model.transformer_blocks)
    output, _, _ = run(model, inputs)
    assert torch.equal(output, diffusers_results[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU defaults")
def test_cpu_defaults():
    assert not kernels.default_enabled()
    assert kernels.available() and "interpreter" in kernels.reason()
