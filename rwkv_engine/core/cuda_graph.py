"""CUDA-graph replay of the one-token decode step (batch buckets 1, 2, 4, 8).

Eager batch-1 decode of a 1.5B model launches about 1,000 kernels per token, so the
launch overhead bounds it, not the memory bandwidth. ``GraphDecode`` captures
``RWKV7._step`` (the eager one-token forward, the slow path it is tested against) once per
batch bucket into a CUDA graph over static buffers and replays it:

    copy in   tokens [B] -> tok [b] (padded rows get id 0);
              state rows  -> att_x / ffn_x L x [b, C] (model dtype), wkv L x [b, H, 64, 64] fp32
    replay    one graph launch: logits [b, V] fp32 and the new state, in the graph's own
              (static) output tensors
    copy out  rows [:B] cloned into a new State and new logits, because the next replay
              overwrites the static outputs (``forward`` returns values: a caller may keep
              the state it got - the state cache does)

B is rounded up to the next bucket; the padded rows compute garbage that never leaves
them (every op of the step is row-wise). A batch above the largest bucket, a state of
another dtype / device, or ANY error while capturing (logged once, one line) returns
None: the caller runs the eager step. After a capture error graphs stay off for that
model. Off by default (``EngineConfig.cuda_graphs``) until it has run on a GPU.

The capture itself goes through a backend: ``CudaGraphBackend`` (torch.cuda.CUDAGraph,
warm-up on a side stream, one memory pool shared by the buckets), or, for the CPU tests
of the plumbing, ``ReplayBackend``, which re-runs the function at every "replay" and
copies its results into the tensors the capture returned - the same overwrite-in-place
semantics as a graph.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .state import State

log = logging.getLogger("rwkv_engine")

BUCKETS = (1, 2, 4, 8)


def same_device(a: torch.device, b: torch.device) -> bool:
    """torch.device("cuda") and torch.device("cuda:0") name one GPU (the model keeps the
    first form, tensors on it report the second)."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def bucket_for(batch: int, buckets: Sequence[int] = BUCKETS) -> Optional[int]:
    """The smallest bucket >= ``batch``; None when the batch is larger than every bucket."""
    for b in sorted(buckets):
        if b >= batch:
            return b
    return None


class CudaGraphBackend:
    """Captures with torch.cuda.CUDAGraph; ``capture(fn)`` -> (replay callable, fn's outputs)."""

    name = "cuda"

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self.pool = None

    def capture(self, fn: Callable[[], tuple]):
        graph = torch.cuda.CUDAGraph()               # first: raises at once without CUDA graphs
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                # warm-up (allocator, cuBLAS handles, kernels)
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = fn()
        return graph.replay, outputs


class ReplayBackend:
    """CPU stand-in with a graph's semantics: the outputs of the capture are the static
    outputs, and every replay recomputes from the static inputs into them in place."""

    name = "replay"

    def __init__(self):
        self.captures = 0
        self.replays = 0

    def capture(self, fn: Callable[[], tuple]):
        outputs = fn()
        self.captures += 1

        def replay():
            self.replays += 1
            for dst, src in zip(_flat(outputs), _flat(fn())):
                dst.copy_(src)
        return replay, outputs


def _flat(outputs) -> List[torch.Tensor]:
    logits, state = outputs
    return [logits, *state.tensors()]


class _Captured:
    """Static buffers and the replay of one bucket ``b``."""

    @torch.inference_mode()
    def __init__(self, model, b: int, backend):
        self.b = b
        st = model.new_state(b)                                  # zeros: L x [b, C], L x [b, H, N, N]
        self.tok = torch.zeros(b, 1, dtype=torch.long, device=model.device)   # [b, 1]
        self.inputs = st                                         # static input state
        self.replay, (self.logits, self.state) = backend.capture(lambda: model._step(self.tok, self.inputs))

    @torch.inference_mode()
    def run(self, tokens: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        """tokens [B, 1] on the device, state of B rows -> (logits [B, V] fp32, new State)."""
        B = tokens.shape[0]
        self.tok[:B].copy_(tokens)
        if B < self.b:
            self.tok[B:].zero_()
        dst = self.inputs.tensors()
        src = state.tensors()
        if B == self.b:
            torch._foreach_copy_(dst, src)
        else:
            torch._foreach_copy_([t[:B] for t in dst], src)
        self.replay()
        out = self.state

        def take(t):                                             # own compact storage, rows [:B]
            return t[:B].clone(memory_format=torch.contiguous_format)
        new = State([take(t) for t in out.att_x], [take(t) for t in out.wkv], [take(t) for t in out.ffn_x])
        return take(self.logits), new


class GraphDecode:
    """Graph replay of ``model``'s one-token step for the batch buckets, captured lazily
    (the first step of each bucket captures it)."""

    def __init__(self, model, buckets: Sequence[int] = BUCKETS, backend=None):
        self.model = model
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))
        self.backend = backend if backend is not None else CudaGraphBackend()
        self.graphs: Dict[int, _Captured] = {}
        self.disabled: Optional[str] = None                      # why graphs are off (after an error)
        self.replays = 0

    def usable(self, tokens: torch.Tensor, state: State) -> bool:
        dev = self.model.device
        if self.disabled is not None or not same_device(tokens.device, dev):
            return False
        if bucket_for(tokens.shape[0], self.buckets) is None:
            return False
        s = state
        return (same_device(s.wkv[0].device, dev) and same_device(s.att_x[0].device, dev)
                and s.att_x[0].dtype == self.model.dtype
                and s.wkv[0].dtype == torch.float32 and s.n_layer == self.model.shape.n_layer)

    def __call__(self, tokens: torch.Tensor, state: State):
        """(logits [B, V], new State) by graph replay, or None: run the eager step."""
        if not self.usable(tokens, state):
            return None
        b = bucket_for(tokens.shape[0], self.buckets)
        cap = self.graphs.get(b)
        try:
            if cap is None:
                cap = self.graphs[b] = _Captured(self.model, b, self.backend)
            out = cap.run(tokens, state)
        except Exception as e:                                   # noqa: BLE001 - any capture error: eager
            self.fail(b, e)
            return None
        self.replays += 1
        return out

    def capture_all(self) -> List[int]:
        """Capture every bucket now, largest first (one memory pool: the smaller graphs reuse
        the largest one's blocks); returns the buckets captured."""
        for b in sorted(self.buckets, reverse=True):
            if self.disabled is not None:
                break
            if b not in self.graphs:
                try:
                    self.graphs[b] = _Captured(self.model, b, self.backend)
                except Exception as e:                           # noqa: BLE001
                    self.fail(b, e)
        return sorted(self.graphs)

    def fail(self, b: int, error: BaseException) -> None:
        from .errors import one_line
        self.disabled = f"batch {b}: {one_line(error, 200)}"
        self.graphs.clear()
        log.warning("rwkv.nvim: CUDA graph capture failed (%s): decoding eagerly", self.disabled)

    def info(self) -> dict:
        return {"backend": self.backend.name, "buckets": list(self.buckets), "captured": sorted(self.graphs),
                "replays": self.replays, "disabled": self.disabled}
