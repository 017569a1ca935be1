"""Model-level GPU tests (skipped without CUDA): the engine on a GPU against fp32 on the CPU.

* Random checkpoints of the official 0.1B (12 x 768) and 1.5B (24 x 2048) shapes, drawn on
  the GPU (rwkv_engine/core/random_checkpoint.py, ``trained_like``: peaked logits like a trained
  model's), run on cuda in fp16 and bf16 and compared with the CPU fp32 reference (the
  pure-torch path) over a batch-4 prefill of 64 tokens (logits of every position) and 32
  decode steps: max relative logit error and top-1 agreement.
* State snapshots moved device -> host -> disk -> device (pipeline.state_cache) continue
  exactly as the state they were made from.
* The completion pipeline end to end on cuda with the bundled default model.

Both sides of the comparison start from one shared warm state (the fp32 reference's
state after 32 tokens): from the all-zero state the first token's WKV output is rank
one, v * (k . r), and the per-head GroupNorm that follows turns it into
sign(k . r) * v / |v|, so wherever k . r cancels to near zero a rounding flips a whole
head in any precision and the flip stays in the recurrent state for hundreds of steps.
That says nothing about the GPU path; from a warm state the comparison measures precision.

``RWKV_GPU_CHECK_METRICS=FILE`` appends each comparison's figures to FILE as JSON lines
(bench/gpu_check.py reads them into its report).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from rwkv_engine.core.random_checkpoint import make_state_dict

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA/ROCm device"),
]

SHAPES = {"0.1b": (12, 768), "1.5b": (24, 2048)}
ROWS, WARM, PREFILL, STEPS = 4, 32, 64, 32
# fp16 has 11 significant bits, bf16 8 (8x the rounding error of fp16). On the CPU,
# with every op rounded to the dtype as on the GPU (cuBLAS and the kernel accumulate in
# fp32 as the CPU does), these random checkpoints gave
#                 0.1B: max rel error, top-1        1.5B: max rel error, top-1
#   fp16          0.004, 99.7 %                     0.015, 98.4 %
#   bf16          0.032, 97.7 %                     0.130, 93.8 %
# (the trained 4 x 192 default model: fp16 0.0014, 100 %; bf16 0.012, 99.4 %): the
# deeper and wider random models amplify rounding more. The limits here are those
# figures with margin, so that the test fails on a broken GPU path (relative errors of
# order 1, agreement of a few tens of %) and not on bf16's 8 bits; bench/gpu_check.py
# reports both dtypes against issue 13's targets (< 2e-2, >= 99 %) as figures.
LIMITS = {torch.float16: (4e-2, 0.96), torch.bfloat16: (0.3, 0.88)}


def record(kind: str, **data) -> None:
    path = os.environ.get("RWKV_GPU_CHECK_METRICS")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"kind": kind, **data}) + "\n")


def build(sd: dict, shape, device, dtype=None):
    from rwkv_engine.core.model import RWKV7
    return RWKV7(sd, shape, device=device, dtype=dtype, use_kernel=device != "cpu")


@pytest.fixture(scope="module", params=list(SHAPES))
def random_model(request):
    """(name, fp32 state dict on the GPU, ModelShape) of a random trained-like checkpoint."""
    from rwkv_engine.core.checkpoint import infer_shape
    name = request.param
    L, C = SHAPES[name]
    sd = make_state_dict(n_layer=L, n_embd=C, seed=13, device="cuda", trained_like=True)
    shape, _ = infer_shape(sd, Path(f"<random {name}>"))
    yield name, sd, shape
    del sd
    torch.cuda.empty_cache()


def tokens_for(seed: int, n: int, vocab: int = 65536) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (ROWS, n), generator=g)                     # [ROWS, n] on the host


def run_protocol(model, warm_state, toks: torch.Tensor) -> torch.Tensor:
    """Logits [ROWS, PREFILL + STEPS, V] fp32 on the host: a PREFILL-token prefill (every
    position) from ``warm_state`` (a host fp32 State), then STEPS one-token decode steps."""
    from rwkv_engine.core.state import State
    dev, dt = model.device, model.dtype
    state = State([t.to(dev, dt) for t in warm_state.att_x], [t.to(dev) for t in warm_state.wkv],
                  [t.to(dev, dt) for t in warm_state.ffn_x])
    logits, state = model.forward(toks[:, WARM:WARM + PREFILL], state, all_logits=True)
    out = [logits.cpu()]
    for t in range(WARM + PREFILL, WARM + PREFILL + STEPS):
        logits, state = model.forward(toks[:, t:t + 1], state)
        out.append(logits[:, None].cpu())
    return torch.cat(out, dim=1)


@pytest.fixture(scope="module")
def reference(random_model):
    """(name, sd, shape, tokens, warm state, fp32 CPU logits) for ``random_model``."""
    name, sd, shape = random_model
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        cpu = build({k: v.cpu() for k, v in sd.items()}, shape, "cpu")
        toks = tokens_for(7, WARM + PREFILL + STEPS, shape.vocab_size)
        _, warm = cpu.forward(toks[:, :WARM], cpu.new_state(ROWS))
        ref = run_protocol(cpu, warm, toks)
        del cpu
    finally:
        torch.set_num_threads(threads)
    return name, sd, shape, toks, warm, ref


def compare(got: torch.Tensor, want: torch.Tensor) -> dict:
    """Per position: max |got - want| / max |want| (the relative logit error) and top-1."""
    rel = (got - want).abs().amax(-1) / want.abs().amax(-1)                    # [ROWS, positions]
    top1 = (got.argmax(-1) == want.argmax(-1)).float()
    return {"positions": rel.numel(), "max_rel_err": float(rel.max()),
            "median_rel_err": float(rel.median()), "top1_agreement": float(top1.mean()),
            "finite": bool(torch.isfinite(got).all())}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_logits_match_cpu_fp32(reference, dtype):
    name, sd, shape, toks, warm, ref = reference
    model = build(sd, shape, "cuda", dtype)
    assert model.device.type == "cuda" and model.dtype == dtype
    got = run_protocol(model, warm, toks)
    del model
    torch.cuda.empty_cache()
    m = compare(got, ref)
    record("accuracy", shape=name, n_layer=shape.n_layer, n_embd=shape.n_embd,
           dtype=str(dtype).replace("torch.", ""), **m)
    max_rel, min_top1 = LIMITS[dtype]
    assert m["finite"], "non-finite logits on the GPU"
    assert m["max_rel_err"] < max_rel, m
    assert m["top1_agreement"] >= min_top1, m


@pytest.fixture(scope="module")
def model_01b():
    """The 0.1B shape (trained-like random weights) on cuda in fp16."""
    from rwkv_engine.core.checkpoint import infer_shape
    L, C = SHAPES["0.1b"]
    sd = make_state_dict(n_layer=L, n_embd=C, seed=21, device="cuda", dtype=torch.float16,
                         trained_like=True)
    shape, _ = infer_shape(sd, Path("<random 0.1b>"))
    model = build(sd, shape, "cuda", torch.float16)
    yield model
    del model, sd
    torch.cuda.empty_cache()


def greedy(model, state, logits, n: int = 16):
    """n greedy steps from (state, logits): (token ids, logits of every step)."""
    ids, seen = [], []
    for _ in range(n):
        tok = logits.argmax(-1, keepdim=True)                                  # [1, 1] on the device
        ids.append(int(tok))
        logits, state = model.forward(tok, state)
        seen.append(logits)
    return ids, torch.cat(seen)


def test_state_snapshots_round_trip_device_host_disk(model_01b, tmp_path):
    from rwkv_engine.pipeline.state_cache import (Snapshot, StateCache, chain_key, decode_snapshot,
                                                  encode_snapshot)
    model = model_01b
    prompt = tokens_for(3, 40)[0].tolist()
    logits, state = model.forward(torch.tensor([prompt]), model.new_state(1))
    snap = Snapshot(state, logits, len(prompt))
    want_ids, want_logits = greedy(model, state, logits)

    bitwise = []

    def same(s: Snapshot, where: str):
        assert s.state.device.type == "cuda" and s.logits.device.type == "cuda", where
        assert s.state.equal(snap.state) and torch.equal(s.logits, snap.logits), where   # bit-exact
        ids, lg = greedy(model, s.state, s.logits)
        assert ids == want_ids, where
        # the same kernels on the same inputs: equal, up to a cuBLAS algorithm choice
        assert float((lg - want_logits).abs().max()) <= 1e-3 * float(want_logits.abs().max()), where
        bitwise.append(bool(torch.equal(lg, want_logits)))

    # by hand: device -> host -> bytes on disk -> device
    host = snap.to("cpu")
    assert host.state.device.type == "cpu"
    key = chain_key("0" * 32, prompt)
    f = tmp_path / "snap.rwst"
    f.write_bytes(encode_snapshot(key, model.model_id, host))
    same(decode_snapshot(f.read_bytes(), key, model.model_id, "cuda"), "encode/decode")

    # through the cache's tiers: a budget of one snapshot demotes the older one to the host
    one = snap.nbytes
    cache = StateCache(model.model_id, "cuda", device_bytes=one + one // 2, host_bytes=16 * one,
                       disk_bytes=16 * one, disk_dir=tmp_path / "states")
    k1, k2 = chain_key(cache.root, prompt), chain_key(cache.root, prompt + [11])
    cache.put(k1, snap, persist=True)
    other_logits, other = model.forward(torch.tensor([[11]]), state)
    cache.put(k2, Snapshot(other, other_logits, len(prompt) + 1))
    assert cache.tier_of(k1) == "host"
    got, tier = cache.get(k1)
    assert tier == "host"
    same(got, "host tier")
    cache.clear_memory()
    assert cache.tier_of(k1) == "disk"
    got, tier = cache.get(k1)
    assert tier == "disk"
    same(got, "disk tier")
    record("snapshots", bytes_per_snapshot=one, same_tokens=True, bitwise_equal_logits=bitwise)


def _held_bytes(snaps) -> int:
    """Bytes of the distinct storages behind the snapshots' tensors (what they keep alive)."""
    seen = {}
    for s in snaps:
        for t in s.state.tensors() + ([] if s.logits is None else [s.logits]):
            st = t.untyped_storage()
            seen[(str(t.device), st.data_ptr())] = st.nbytes()
    return sum(seen.values())


def test_completion_pipeline_on_cuda_with_default_model(tmp_path):
    from rwkv_engine.pipeline.completer import Completer
    from rwkv_engine.pipeline.config import EngineConfig

    budget_mb = 1
    cfg = EngineConfig(device="cuda", cache_dir=str(tmp_path / "cache"), candidates=4,
                       cache_device_mb=budget_mb, cache_host_mb=2 * budget_mb, cache_disk_mb=8)
    c = Completer(cfg)
    assert c.model.device.type == "cuda" and c.model.dtype == torch.float16
    lines = [f"def f{i}(x):\n    return x * {i}\n".splitlines() for i in range(30)]
    lines = [ln for pair in lines for ln in pair] + ["def main():", "    total = 0", "    for i in "]
    row = len(lines) - 1
    partial = []
    times, stats = [], []
    for n in range(6):                        # the cold request, then 5 keystrokes
        text = lines[row] + "range(10)"[:n]
        req = {"id": n + 1, "buf": 1, "tick": n + 1, "filename": "demo.py", "filetype": "python",
               "lines": lines[:row] + [text], "first": 0, "row": row, "col": len(text.encode())}
        res = c.complete(req, on_partial=partial.append)
        assert res is not None and res["id"] == n + 1
        assert 1 <= len(res["candidates"]) <= 4
        assert all(isinstance(x["text"], str) for x in res["candidates"])
        st = res["stats"]
        assert st["candidates"] == len(res["candidates"])
        assert st["decoded_tokens"] > 0 and st["prompt_tokens"] > 0
        assert 0 < st["ms_total"] < 60_000 and st["ms_prefill"] >= 0 and st["ms_decode"] >= 0
        times.append(st["ms_total"])
        stats.append(st)
    assert stats[0]["prefilled_tokens"] > 50                       # cold: the whole prompt
    assert all(s["prefilled_tokens"] <= 8 for s in stats[1:]), stats   # a keystroke re-feeds a few
    assert partial, "no partial text was streamed"
    cs = c.cache_stats()
    budget = budget_mb << 20
    dev_snaps = [s for s, _ in c.cache.dev.items.values()]
    host_snaps = [s for s, _ in c.cache.host.items.values()]
    held_dev, held_host = _held_bytes(dev_snaps), _held_bytes(host_snaps)
    assert all(s.state.device.type == "cuda" for s in dev_snaps)
    assert all(s.state.device.type == "cpu" for s in host_snaps)
    assert held_dev <= budget and cs["device"]["bytes"] <= budget, (held_dev, cs)
    assert held_host <= 2 * budget and cs["host"]["bytes"] <= 2 * budget, (held_host, cs)
    assert cs["device"]["bytes"] >= held_dev                        # never under-counted
    record("pipeline", ms_total=times, device_bytes=cs["device"]["bytes"], device_held=held_dev,
           host_bytes=cs["host"]["bytes"], host_held=held_host, budget=budget,
           prefilled=[s["prefilled_tokens"] for s in stats])
