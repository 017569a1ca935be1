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


@pytest.fixture
def completer_factory(tiny_model, tmp_path):
    """Completer(config) sharing the session's tiny model; fresh cache per call."""
    from rwkv_engine.pipeline.completer import Completer

    def make(**overrides):
        return Completer(fast_config(tmp_path, **overrides), model=tiny_model)

    return make


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
