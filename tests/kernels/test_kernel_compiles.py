"""Every kernel compiles for Hopper (sm_90) with Triton's real compiler and ptxas, no GPU needed.

The interpreter runs kernels as Python, so it cannot catch what only the compiler rejects. This
test runs this file as a script with the interpreter off; it compiles each kernel, bf16 I/O, with
the tile sizes its launcher uses at Sana sizes, checks that bf16 attention tiles use tensor cores
(wgmma or mma.sync), and prints each kernel's registers and spill stack (cuobjdump, shipped with
Triton) for the record.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

FP32_POINTERS = {"dw_partial_ptr", "dscale_partial_ptr", "dshift_partial_ptr", "state_ptr", "ksum_ptr", "tstate_ptr",
                 "tksum_ptr", "dstate_ptr", "dksum_ptr", "bias_ptr", "lse_ptr", "delta_ptr"}


def compile_for_hopper(kernel, constexprs: dict, num_warps: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def argument_type(name):
        if name in constexprs:
            return "constexpr"
        if name.endswith("_ptr"):
            return "*fp32" if name in FP32_POINTERS else "*bf16"
        return "fp32" if name in ("eps", "scale") else "i32"

    signature = {name: argument_type(name) for name in kernel.arg_names}
    return triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps})


def resource_usage(compiled) -> str:
    import tempfile

    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        return "cuobjdump not shipped"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run([str(cuobjdump), "-res-usage", cubin.name], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", report)
    return f"registers {match.group(1)}, spill stack {match.group(2)} B" if match else "no resource report"


def launch_configurations():
    """(kernel, constexprs, num_warps, uses tensor cores) as the launchers use them at Sana sizes."""
    from tbcm.kernels import cross_attention, layer_norm_modulate, linear_attention, rms_norm
    from tbcm.kernels.utils import head_block, row_settings

    block, row_warps = row_settings(2240)
    yield rms_norm._rms_norm_forward_kernel, dict(HAS_WEIGHT=True, ROUND_TO_WEIGHT=True, BLOCK=block), row_warps, False
    yield rms_norm._rms_norm_tangent_kernel, dict(HAS_WEIGHT=True, BLOCK=block), row_warps, False
    yield rms_norm._rms_norm_backward_kernel, dict(HAS_WEIGHT=True, BLOCK=block), row_warps, False
    yield layer_norm_modulate._ln_modulate_forward_kernel, dict(BLOCK=block), row_warps, False
    yield layer_norm_modulate._ln_modulate_tangent_kernel, dict(BLOCK=block), row_warps, False
    yield layer_norm_modulate._ln_modulate_backward_kernel, dict(BLOCK=block), row_warps, False
    tokens, warps, head = linear_attention.BLOCK_TOKENS, linear_attention.NUM_WARPS, head_block(32)
    yield linear_attention._key_pass_kernel, dict(TANGENT=True, BLOCK_N=tokens, BLOCK_D=head), warps, False
    yield linear_attention._query_pass_kernel, dict(TANGENT=True, BLOCK_M=tokens, BLOCK_D=head), warps, False
    yield linear_attention._backward_query_kernel, dict(BLOCK_M=tokens, BLOCK_D=head), warps, False
    yield linear_attention._backward_key_kernel, dict(BLOCK_N=tokens, BLOCK_D=head), warps, False
    head = head_block(112)
    for tiles, tangent in ((cross_attention.FORWARD_TILES, False), (cross_attention.TANGENT_TILES, True)):
        block_m, block_n, warps = tiles
        yield cross_attention._forward_kernel, dict(
            HAS_BIAS=True, TANGENT=tangent, HAS_TQ=tangent, HAS_TK=tangent, HAS_TV=tangent, BLOCK_M=block_m,
            BLOCK_N=block_n, BLOCK_D=head), warps, True
    block_m, block_n, warps = cross_attention.BACKWARD_TILES
    for kernel in (cross_attention._backward_key_kernel, cross_attention._backward_query_kernel):
        yield kernel, dict(HAS_BIAS=True, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head), warps, True


def main() -> int:
    failures = 0
    for kernel, constexprs, num_warps, tensor_cores in launch_configurations():
        try:
            compiled = compile_for_hopper(kernel, constexprs, num_warps)
        except Exception as error:
            failures += 1
            print(f"FAILED {kernel.__name__}: {type(error).__name__}: {error}")
            continue
        ptx = compiled.asm["ptx"]
        matmul = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "no tensor cores"
        if tensor_cores and matmul == "no tensor cores":
            failures += 1
            print(f"FAILED {kernel.__name__}: bf16 tiles do not use tensor-core instructions")
            continue
        print(f"ok {kernel.__name__} {num_warps} warps, {matmul}: {resource_usage(compiled)}")
    return 1 if failures else 0


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    environment = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    run = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=environment,
                         cwd=Path(__file__).resolve().parents[2], timeout=900)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert run.stdout.count("ok ") == 14


if __name__ == "__main__":
    sys.exit(main())
