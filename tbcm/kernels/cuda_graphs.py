"""CUDA-graph replay of a fixed function of batched tensors, one graph per batch bucket.

API:

    runner = CudaGraphRunner(fn, batch_buckets=(1, 2, 4, 8), warmup_iters=3)
    runner.available   # bool: False without CUDA
    runner.reason      # why not available, e.g. "CUDA not available: running eagerly"; "" when available
    runner.capture(example_inputs_fn, buckets=None)   # optional pre-capture, largest bucket first
    outputs = runner(*inputs)   # a tensor or a tuple of tensors, like fn

`fn(*inputs)` takes tensors whose dim 0 is the batch and returns a tensor or a tuple of tensors
whose dim 0 is the batch. A call pads the batch up to the smallest bucket that fits (repeating
the last sample) and splits a batch larger than the largest bucket into chunks. With CUDA, the
first call per key (bucket, non-batch shapes, dtypes, devices) warms `fn` up on a side stream
(Triton JIT and autotuning, cuBLAS workspaces, lazy init) and captures it into a graph whose
static input and output buffers live in one memory pool shared by all graphs; later calls copy
the inputs into the static buffers, replay under a lock, and return the outputs sliced to the
real batch and cloned, so the next replay cannot overwrite them. `capture(example_inputs_fn)`
captures ahead of time, largest bucket first so smaller graphs reuse the pool's memory;
`example_inputs_fn(bucket)` returns example inputs with that batch size.
Without CUDA, fn runs eagerly on the same padded chunks (so batching behaves identically).
fn always runs under torch.no_grad(). Randomness (noise, seeds) must be drawn by the caller
outside fn and passed in as inputs: a replay repeats the captured kernels exactly.
"""

import threading
from dataclasses import dataclass

import torch

Outputs = torch.Tensor | tuple[torch.Tensor, ...]


def bucket_for(batch: int, buckets: tuple[int, ...]) -> int:
    """Smallest bucket holding `batch` (buckets sorted ascending, batch <= the largest)."""
    return next(bucket for bucket in buckets if bucket >= batch)


def batch_chunks(batch: int, largest_bucket: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of at most largest_bucket samples covering the batch."""
    return [(start, min(start + largest_bucket, batch)) for start in range(0, batch, largest_bucket)]


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """x with its last sample repeated until dim 0 has `size` entries."""
    missing = size - x.shape[0]
    return x if missing == 0 else torch.cat([x, x[-1:].expand(missing, *x.shape[1:])])


def _map_outputs(outputs: Outputs, fn) -> Outputs:
    return fn(outputs) if isinstance(outputs, torch.Tensor) else tuple(fn(t) for t in outputs)


def _concat(pieces: list[Outputs]) -> Outputs:
    if len(pieces) == 1:
        return pieces[0]
    if isinstance(pieces[0], torch.Tensor):
        return torch.cat(pieces)
    return tuple(torch.cat(parts) for parts in zip(*pieces))


@dataclass
class _CapturedGraph:
    graph: "torch.cuda.CUDAGraph"
    static_inputs: list[torch.Tensor]
    static_outputs: Outputs


class CudaGraphRunner:
    """Runs `fn` through per-bucket CUDA graphs (eagerly without CUDA); see the module docstring."""

    def __init__(self, fn, batch_buckets=(1, 2, 4, 8), warmup_iters=3):
        if not batch_buckets or min(batch_buckets) < 1:
            raise ValueError(f"batch_buckets must be positive sizes, got {batch_buckets}")
        self.fn = fn
        self.batch_buckets = tuple(sorted(set(batch_buckets)))
        self.warmup_iters = warmup_iters
        self.available = torch.cuda.is_available()
        self.reason = "" if self.available else "CUDA not available: running eagerly"
        self._graphs: dict[tuple, _CapturedGraph] = {}
        self._pool = None
        self._lock = threading.Lock()

    def __call__(self, *inputs: torch.Tensor) -> Outputs:
        batch = inputs[0].shape[0]
        if any(x.shape[0] != batch for x in inputs):
            raise ValueError(f"all inputs need the same batch size, got {[x.shape[0] for x in inputs]}")
        pieces = [self._run_chunk([x[start:stop] for x in inputs])
                  for start, stop in batch_chunks(batch, self.batch_buckets[-1])]
        return _concat(pieces)

    def capture(self, example_inputs_fn, buckets=None) -> None:
        """Capture graphs ahead of time for `buckets` (default: all), largest first; no-op without CUDA."""
        if not self.available:
            return
        for bucket in sorted(buckets or self.batch_buckets, reverse=True):
            with self._lock:
                self._graph_for([pad_batch(x, bucket) for x in example_inputs_fn(bucket)])

    @property
    def captured_keys(self) -> list[tuple]:
        """(bucket, ((shape[1:], dtype, device), ...)) of every captured graph, in capture order."""
        return list(self._graphs)

    def _run_chunk(self, inputs: list[torch.Tensor]) -> Outputs:
        batch = inputs[0].shape[0]
        padded = [pad_batch(x, bucket_for(batch, self.batch_buckets)) for x in inputs]
        with torch.no_grad():
            if not self.available:
                return _map_outputs(self.fn(*padded), lambda t: t[:batch])
            with self._lock:
                captured = self._graph_for(padded)
                for static, x in zip(captured.static_inputs, padded):
                    static.copy_(x)
                captured.graph.replay()
                return _map_outputs(captured.static_outputs, lambda t: t[:batch].clone())

    def _graph_for(self, padded: list[torch.Tensor]) -> _CapturedGraph:
        key = (padded[0].shape[0], tuple((tuple(x.shape[1:]), x.dtype, x.device) for x in padded))
        if key not in self._graphs:
            self._graphs[key] = self._capture(padded)
        return self._graphs[key]

    def _capture(self, padded: list[torch.Tensor]) -> _CapturedGraph:
        with torch.no_grad():
            side_stream = torch.cuda.Stream()
            side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side_stream):
                for _ in range(self.warmup_iters):
                    self.fn(*padded)
            torch.cuda.current_stream().wait_stream(side_stream)
            torch.cuda.synchronize()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                # allocated inside the capture, so they come from the shared pool; capture records
                # kernels without running them, so their (uninitialised) contents do not matter
                static_inputs = [torch.empty_like(x) for x in padded]
                static_outputs = self.fn(*static_inputs)
            return _CapturedGraph(graph, static_inputs, static_outputs)
