"""Helpers and fixtures for the completion-pipeline tests (tiny models, small windows)."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import List, Optional

import pytest

from rwkv_engine.pipeline.config import EngineConfig

# A small Python file: 48 lines, short, so prompts stay a few hundred tokens.
SOURCE_LINES: List[str] = []
for _i in range(12):
    SOURCE_LINES += [f"def f{_i}(x):", f"    y = x * {_i}", f"    return y + {_i}", ""]


def fast_config(tmp_path: Optional[Path] = None, **overrides) -> EngineConfig:
    """Small windows, greedy-free but cheap sampling, no wall-clock stops."""
    opts = dict(
        candidates=2, max_tokens=3, max_lines=4, temperature=1.0, top_p=1.0, top_k=0,
        alpha_frequency=0.0, time_budget_ms=600_000, n_prefix=24, n_suffix=8,
        near_prefix=8, near_suffix=4, ring_n_chunks=4, ring_chunk_size=8, ring_queue=4,
        cache_device_mb=64, cache_host_mb=64, cache_disk_mb=16 if tmp_path else 0,
        cache_dir=str(tmp_path / "cache") if tmp_path else None, prefill_chunk=64,
        prime_after_ms=0,     # idle priming only when a test asks (tests/pipeline/test_service.py)
    )
    opts.update(overrides)
    return EngineConfig(**opts)


def make_request(lines: List[str], row: int, col: Optional[int] = None, first: int = 0,
                 rid: int = 1, filename: str = "demo.py", buf: int = 1) -> dict:
    """A request over ``lines`` (a window starting at buffer line ``first``); col None = end of line."""
    line = lines[row - first]
    return {"id": rid, "buf": buf, "tick": rid, "filename": filename, "filetype": "python",
            "lines": list(lines), "first": first, "row": row,
            "col": len(line.encode("utf-8")) if col is None else col}


def type_text(lines: List[str], row: int, col: int, text: str):
    """Insert ``text`` (no newlines) at (row, byte col); returns (new lines, new col)."""
    raw = lines[row].encode("utf-8")
    new = (raw[:col] + text.encode("utf-8") + raw[col:]).decode("utf-8")
    out = list(lines)
    out[row] = new
    return out, col + len(text.encode("utf-8"))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny models run fastest single-threaded, especially on a busy 2-core machine
    (OpenMP barriers dominate a [1, 128] forward)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



class Recorder:
    """Collects a CompletionService's events, partials and results (callbacks run on its worker)."""

    def __init__(self):
        self.events, self.partials, self.done = [], [], []
        self.ready = threading.Event()
        self.finished = threading.Event()

    def on_event(self, kind, info):
        self.events.append((kind, info))
        if kind in ("ready", "error"):
            self.ready.set()

    def on_partial(self, p):
        self.partials.append(p)

    def on_done(self, r):
        self.done.append(r)
        self.finished.set()

    def kinds(self, kind):
        """The info dicts of every event of this kind."""
        return [i for k, i in self.events if k == kind]


# -- memory and equivalence helpers (state cache / prefill tests) ---------------------------
def reachable_bytes(tensors) -> int:
    """Bytes kept alive by holding ``tensors``: each distinct storage once, whole (a view
    of a larger buffer keeps all of it). Computed here, independently of the engine."""
    seen = {}
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        seen[(str(st.device), st.data_ptr())] = st.nbytes()
    return sum(seen.values())


def logical_bytes(tensors) -> int:
    """Bytes of the elements themselves (what compact tensors would hold)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def snapshot_tensors(snap) -> list:
    """Every tensor a state-cache Snapshot keeps alive (state + logits)."""
    return [*snap.state.tensors(), snap.logits]


def cache_reachable_bytes(cache, tier: str = "both") -> int:
    """Distinct storage bytes reachable from a StateCache's memory tiers
    ("device", "host" or "both")."""
    lrus = {"device": [cache.dev], "host": [cache.host], "both": [cache.dev, cache.host]}[tier]
    tensors = []
    for lru in lrus:
        for snap, _ in lru.items.values():
            tensors.extend(snapshot_tensors(snap))
    return reachable_bytes(tensors)


def cold_forward(model, tokens):
    """(logits [1, V], state) of ``tokens`` run through ``model`` from a zero state in one
    forward call: the reference a resumed prefill must equal."""
    import torch
    return model.forward(torch.tensor([list(tokens)], dtype=torch.long, device=model.device),
                         model.new_state(1))


def assert_logits_close(got, want, rel: float = 1e-4) -> None:
    """max |got - want| < rel * (the logits' scale, max |want|), fp32 CPU."""
    scale = float(want.abs().max())
    diff = float((got.float() - want.float()).abs().max())
    assert diff < rel * max(scale, 1.0), f"logits differ by {diff:.3g} (scale {scale:.3g})"


def assert_states_close(got, want, rel: float = 1e-4) -> None:
    for a, b in zip(got.tensors(), want.tensors()):
        scale = max(float(b.abs().max()), 1.0)
        diff = float((a.float() - b.float()).abs().max())
        assert diff < rel * scale, f"state differs by {diff:.3g} (scale {scale:.3g})"


def greedy_tokens(model, state, logits, n_tokens: int = 8) -> list:
    """The greedy continuation (temperature 0, no penalties) of a batch-1 state."""
    from rwkv_engine.core.sampler import SamplingParams
    from rwkv_engine.pipeline.candidates import StopRules, decode_candidates
    rows = decode_candidates(model, state, logits, 1,
                             SamplingParams(temperature=0.0, top_p=1.0, alpha_frequency=0.0),
                             [0], StopRules(max_tokens=n_tokens, max_lines=1000))
    return rows[0].tokens


def record_prefills(completer) -> list:
    """Make ``completer`` record every PrefillResult (plain and speculative) into the
    returned list, as (kind, segments or None, result)."""
    got = []
    prefill, spec = completer.prefiller.prefill, completer.speculator.prefill

    def plain(segments, *a, **k):
        res = prefill(segments, *a, **k)
        got.append(("prefill", list(segments), res))
        return res

    def speculative(*a, **k):
        res = spec(*a, **k)
        if res is not None:
            got.append(("speculative", None, res))
        return res

    completer.prefiller.prefill = plain
    completer.speculator.prefill = speculative
    return got


class CountingModel:
    """The model, recording the length of every forward piece."""

    def __init__(self, model):
        self.model = model
        self.device = model.device
        self.pieces: List[int] = []

    def new_state(self, batch: int = 1):
        return self.model.new_state(batch)

    def forward(self, tokens, state=None):
        self.pieces.append(int(tokens.shape[1]))
        return self.model.forward(tokens, state)


def flat(segments) -> List[int]:
    """The tokens of a prompt's segments, in order."""
    return [t for s in segments for t in s.tokens]
