"""CUDA-graph decode (rwkv_engine/core/cuda_graph.py).

On the CPU: the plumbing with ``ReplayBackend`` (a graph's semantics: static outputs
overwritten by every replay) - copy-in/out, bucketing and padding, that a returned state
survives the next replay, the fallback to eager on a capture error (also through the
real ``CudaGraphBackend`` with torch.cuda.CUDAGraph faked to fail), the config hook.
On a GPU (``-m gpu``, skipped without CUDA): graph replay against the eager step of the
same fp16 model, logits within fp16 tolerance and the same greedy tokens.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from rwkv_engine.core.random_checkpoint import make_state_dict
from rwkv_engine.core import cuda_graph
from rwkv_engine.core.checkpoint import infer_shape
from rwkv_engine.core.cuda_graph import GraphDecode, ReplayBackend, bucket_for
from rwkv_engine.core.model import RWKV7


def tiny_model(device="cpu", dtype=None, n_layer=2, n_embd=128, vocab=512, seed=3):
    ids = list(range(vocab)) if vocab != 65536 else None     # a trimmed World vocabulary
    sd = make_state_dict(n_layer=n_layer, n_embd=n_embd, vocab=vocab, seed=seed, device=device, world_ids=ids)
    shape, world_ids = infer_shape(sd, Path("<random>"))
    # the CPU reference: the eager torch path on both sides (no fused step, no kernel)
    return RWKV7(sd, shape, device=device, dtype=dtype, world_ids=world_ids,
                 use_kernel=device != "cpu", fused=False)


def greedy(model, state, first, steps):
    """Greedy decode: (tokens [B, steps], logits [B, steps, V]) from ``first`` [B]."""
    tok, toks, logs = first[:, None], [], []
    for _ in range(steps):
        logits, state = model.forward(tok, state)
        tok = logits.argmax(-1, keepdim=True)
        toks.append(tok)
        logs.append(logits[:, None])
    return torch.cat(toks, 1), torch.cat(logs, 1), state


def warm(model, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, model.shape.vocab_size, (rows, 12), generator=g)
    logits, state = model.forward(prompt, model.new_state(rows))
    return logits.argmax(-1), state


def test_same_device_treats_cuda_and_cuda0_as_one():
    # a model built with device="cuda" gets tensors that say cuda:0: graphs must still run
    same = cuda_graph.same_device
    assert same(torch.device("cuda"), torch.device("cuda:0")) and same("cuda:1", "cuda:1")
    assert not same("cuda:0", "cuda:1") and not same("cpu", "cuda") and same("cpu", "cpu")


def test_bucket_for():
    assert [bucket_for(b) for b in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    assert bucket_for(9) is None and bucket_for(3, (8, 2)) == 8


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_replay_matches_eager_and_pads(rows):
    model = tiny_model()
    first, state = warm(model, rows)
    want_tok, want_log, want_state = greedy(model, state, first, 6)
    backend = ReplayBackend()
    graphs = model.enable_cuda_graphs(backend=backend)
    got_tok, got_log, got_state = greedy(model, state, first, 6)
    b = bucket_for(rows)
    assert sorted(graphs.graphs) == [b] and graphs.graphs[b].tok.shape == (b, 1)
    assert backend.captures == 1 and backend.replays == 6 and graphs.replays == 6
    assert torch.equal(got_tok, want_tok)
    torch.testing.assert_close(got_log, want_log, rtol=0, atol=0)
    assert got_log.shape == (rows, 6, model.shape.vocab_size)
    assert got_state.batch == rows and got_state.equal(want_state)
    # the returned state owns its storage (a clone, not a view of the static buffers)
    for t, s in zip(got_state.tensors(), graphs.graphs[b].state.tensors()):
        assert t.untyped_storage().data_ptr() != s.untyped_storage().data_ptr()
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_a_returned_state_survives_the_next_replay():
    model = tiny_model()
    first, state = warm(model, 2)
    model.enable_cuda_graphs(backend=ReplayBackend())
    logits1, s1 = model.forward(first[:, None], state)
    keep_logits, keep = logits1.clone(), s1.copy()
    model.forward((first + 1)[:, None], state)                 # overwrites the static outputs
    assert torch.equal(logits1, keep_logits) and s1.equal(keep)
    # and the input state was never written (forward takes values)
    _, again = model.forward(first[:, None], state)
    assert again.equal(keep)


def test_batches_above_the_buckets_and_foreign_states_run_eagerly():
    model = tiny_model()
    backend = ReplayBackend()
    graphs = model.enable_cuda_graphs(buckets=(1, 2), backend=backend)
    first, state = warm(model, 4)
    model.forward(first[:, None], state)
    assert backend.captures == 0 and graphs.replays == 0          # 4 > the largest bucket
    first, state = warm(model, 1)
    half = type(state)([t.double() for t in state.att_x], state.wkv, state.ffn_x)
    assert graphs(first[:, None], half) is None                   # another dtype: eager
    model.forward(first[:, None], state)
    assert graphs.replays == 1


class Boom(RuntimeError):
    pass


def test_capture_error_falls_back_to_eager_with_one_log_line(caplog):
    class FailingBackend(ReplayBackend):
        def capture(self, fn):
            raise Boom("operation not permitted when stream is capturing")

    model = tiny_model()
    first, state = warm(model, 2)
    want, _, _ = greedy(model, state, first, 3)
    graphs = model.enable_cuda_graphs(backend=FailingBackend())
    with caplog.at_level(logging.WARNING, logger="rwkv_engine"):
        got, _, _ = greedy(model, state, first, 3)
    assert torch.equal(got, want)
    lines = [r.getMessage() for r in caplog.records if "CUDA graph" in r.getMessage()]
    assert len(lines) == 1 and "not permitted" in lines[0] and "batch 2" in lines[0], lines
    assert graphs.disabled and graphs.info()["captured"] == []


def test_real_backend_falls_back_when_cudagraph_fails(monkeypatch, caplog):
    """The CUDA backend with torch.cuda.CUDAGraph faked to fail (as without graph support)."""
    def broken(*a, **k):
        raise RuntimeError("CUDA graphs are not supported on this device")
    monkeypatch.setattr(torch.cuda, "CUDAGraph", broken)
    model = tiny_model()
    first, state = warm(model, 1)
    want, _, _ = greedy(model, state, first, 2)
    graphs = GraphDecode(model, backend=cuda_graph.CudaGraphBackend())
    model.graphs = graphs
    with caplog.at_level(logging.WARNING, logger="rwkv_engine"):
        got, _, _ = greedy(model, state, first, 2)
    assert torch.equal(got, want)
    assert "not supported" in graphs.disabled
    assert sum("CUDA graph" in r.getMessage() for r in caplog.records) == 1


def test_enable_on_a_cpu_model_without_backend_is_a_noop():
    model = tiny_model()
    assert model.enable_cuda_graphs() is None and model.graphs is None


def test_config_option_defaults_off_and_enables_on_cuda_only(monkeypatch):
    from rwkv_engine.pipeline import loading
    from rwkv_engine.pipeline.config import EngineConfig
    assert EngineConfig().cuda_graphs is False
    calls = []
    monkeypatch.setattr(RWKV7, "enable_cuda_graphs", lambda self, *a, **k: calls.append(self.device.type))
    monkeypatch.setattr(loading, "cpu_precision_for", lambda *a, **k: ("fp32", {"mode": "fp32"}))
    model = loading.load_configured_model(EngineConfig(device="cpu", cuda_graphs=True))
    assert model.device.type == "cpu" and calls == []             # the CPU never captures


# ------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA/ROCm device")
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_gpu_graph_matches_eager(rows):
    model = tiny_model("cuda", torch.float16, n_layer=4, n_embd=256, vocab=65536, seed=5)
    first, state = warm(model, rows)
    want_tok, want_log, _ = greedy(model, state, first, 16)
    graphs = model.enable_cuda_graphs()
    got_tok, got_log, _ = greedy(model, state, first, 16)
    assert graphs.disabled is None and graphs.replays == 16, graphs.info()
    rel = float(((got_log - want_log).abs().amax(-1) / want_log.abs().amax(-1)).max())
    assert rel < 2e-2, rel
    assert torch.equal(got_tok, want_tok)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA/ROCm device")
def test_gpu_capture_all_buckets_share_a_pool():
    model = tiny_model("cuda", torch.float16, n_layer=2, n_embd=128, vocab=65536)
    graphs = model.enable_cuda_graphs()
    assert graphs.capture_all() == [1, 2, 4, 8], graphs.info()
