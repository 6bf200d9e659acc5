"""CudaGraphRunner: bucketing, padding, splitting and slicing (eager on CPU), and real capture on CUDA."""

import pytest
import torch
from kernel_test_utils import DEVICE, requires_cuda

from tbcm.kernels.cuda_graphs import CudaGraphRunner, batch_chunks, bucket_for, pad_batch
from tbcm.kernels.layer_norm_modulate import layer_norm_modulate


class RecordingStep:
    """A per-sample function of two batched inputs that records the batch sizes it is called with."""

    def __init__(self):
        self.batches = []

    def __call__(self, latents, scale):
        self.batches.append(latents.shape[0])
        return latents * scale[:, None] + 1, latents.sum(dim=1)


def test_bucket_padding_and_chunking_helpers():
    assert [bucket_for(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert batch_chunks(19, 8) == [(0, 8), (8, 16), (16, 19)]
    x = torch.arange(6.0).view(3, 2)
    padded = pad_batch(x, 4)
    assert padded.shape == (4, 2) and torch.equal(padded[3], x[2]) and torch.equal(padded[:3], x)
    assert pad_batch(x, 3) is x


@pytest.mark.parametrize("batch, expected_calls", [(1, [1]), (3, [4]), (8, [8]), (19, [8, 8, 4])])
def test_batches_are_padded_to_buckets_and_sliced_back(batch, expected_calls):
    step = RecordingStep()
    runner = CudaGraphRunner(step, batch_buckets=(8, 1, 4, 2))
    latents, scale = torch.randn(batch, 3, 5, device=DEVICE), torch.randn(batch, 5, device=DEVICE)
    scaled, summed = runner(latents, scale)
    assert scaled.shape == (batch, 3, 5) and summed.shape == (batch, 5)
    torch.testing.assert_close(scaled, latents * scale[:, None] + 1)
    torch.testing.assert_close(summed, latents.sum(dim=1))
    if not runner.available:
        assert step.batches == expected_calls


def test_single_tensor_output_and_input_checks():
    runner = CudaGraphRunner(lambda x: 2 * x, batch_buckets=(2,))
    x = torch.randn(3, 4, device=DEVICE)
    torch.testing.assert_close(runner(x), 2 * x)
    with pytest.raises(ValueError):
        runner(x, torch.randn(2, 4, device=DEVICE))
    with pytest.raises(ValueError):
        CudaGraphRunner(lambda x: x, batch_buckets=(0, 2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_runs_eagerly_without_cuda_and_says_so():
    step = RecordingStep()
    runner = CudaGraphRunner(step)
    assert not runner.available and runner.reason == "CUDA not available: running eagerly"
    runner.capture(lambda bucket: (torch.randn(bucket, 3, 5), torch.randn(bucket, 5)))
    assert step.batches == [] and runner.captured_keys == []


@pytest.mark.gpu
@requires_cuda
def test_captures_largest_first_and_replays_like_eager():
    step = RecordingStep()
    runner = CudaGraphRunner(step, warmup_iters=2)
    assert runner.available and runner.reason == ""
    runner.capture(lambda bucket: (torch.randn(bucket, 3, 5, device="cuda"), torch.randn(bucket, 5, device="cuda")))
    assert [key[0] for key in runner.captured_keys] == [8, 4, 2, 1]
    calls_after_capture = len(step.batches)
    latents, scale = torch.randn(3, 3, 5, device="cuda"), torch.randn(3, 5, device="cuda")
    first, _ = runner(latents, scale)
    second, _ = runner(2 * latents, scale)  # a replay of the same graph must not overwrite `first`
    assert len(step.batches) == calls_after_capture  # replays do not call fn
    torch.testing.assert_close(first, latents * scale[:, None] + 1)
    torch.testing.assert_close(second, 2 * latents * scale[:, None] + 1)


@pytest.mark.gpu
@requires_cuda
def test_triton_kernel_inside_a_graph():
    runner = CudaGraphRunner(layer_norm_modulate, batch_buckets=(2, 4))
    x = torch.randn(3, 16, 64, device="cuda", dtype=torch.bfloat16)
    scale, shift = (torch.randn(3, 1, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    torch.testing.assert_close(runner(x, scale, shift), layer_norm_modulate(x, scale, shift))
