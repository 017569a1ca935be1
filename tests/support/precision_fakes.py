"""Fakes for the CPU precision tests (tests/core/test_cpu_precision.py,
test_model_precision.py, tests/pipeline/test_model_precision_service.py): fixed figures
instead of timing and accuracy runs, and an isolated cache place."""
from __future__ import annotations

import threading
from typing import Optional

# per-CPU timing figures of the modes (ms per step; top-1 against fp32)
TIMING_FIGURES = {"fp32": {"decode_1": 10.0, "decode_8": 20.0, "prefill_64": 100.0, "top1": 1.0},
                  "int8": {"decode_1": 4.0, "decode_8": 8.0, "prefill_64": 60.0, "top1": 0.995}}


class FakeModelGate:
    """Replaces ``model_precision.measure`` (the per-model gate): fixed figures (``per_mode``:
    {mode: (top1, kl)} for the modes that measure otherwise), counts calls and records the
    modes checked and the fp32 reference each got; ``started`` is set when it runs; with
    ``release`` set it waits for that event between its two steps; ``error`` is raised
    instead of answering."""

    def __init__(self, top1=0.996, kl=0.0004, tokens=512, error: Optional[BaseException] = None,
                 per_mode: Optional[dict] = None):
        self.figures, self.error, self.calls = {"top1": top1, "kl": kl, "tokens": tokens}, error, 0
        self.per_mode = per_mode or {}
        self.modes, self.references = [], []
        self.release: Optional[threading.Event] = None
        self.started = threading.Event()

    def __call__(self, path, mode, step=None, reference=None):
        self.calls += 1
        self.modes.append(mode)
        self.references.append(reference)
        self.started.set()
        for _ in range(2):
            if step is not None:
                step(f"checking {mode} (fake)")
            if self.error is not None:
                raise self.error
            if self.release is not None:
                assert self.release.wait(60)
        if mode in self.per_mode:
            top1, kl = self.per_mode[mode]
            return dict(self.figures, top1=top1, kl=kl)
        return dict(self.figures)


def isolate_precision(tmp_path, monkeypatch) -> None:
    """No environment override, the caches under ``tmp_path``, a fixed code fingerprint, the
    CPU modes fp32 and int8 only, nothing remembered in this process."""
    from nvim_harness import shared_kernel_dir
    from rwkv_engine.core import cpu_precision as cp
    from rwkv_engine.core import cpu_precision_cache as cpc
    from rwkv_engine.core import model as model_module
    from rwkv_engine.core import model_precision as mp
    monkeypatch.setenv("RWKV_NVIM_KERNEL_DIR", shared_kernel_dir())
    monkeypatch.delenv(cp.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(cpc, "code_fingerprint", lambda: "fixed")
    monkeypatch.setattr(mp, "code_fingerprint", lambda: "fixed")
    monkeypatch.setattr(model_module, "cpu_modes", lambda: ("fp32", "int8"), raising=False)
    cp.forget()
