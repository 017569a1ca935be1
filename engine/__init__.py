"""rwkv_engine: the RWKV-7 inference engine and completion pipeline of rwkv.nvim.

Importing this package is cheap (no torch): heavy modules load on first use.

Public API (contract):
    rwkv_engine.load_model(path, device="cpu", dtype=None) -> RWKV7
    model.new_state(batch) -> State
    model.forward(tokens: LongTensor[B, T], state) -> (logits [B, V] fp32, State)
    rwkv_engine.tokenizer.encode(text) / .decode(ids)
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = {
    "tokenizer", "checkpoint", "model", "state", "wkv", "sampler", "kernel_loader",
    "config", "download", "cli",
}


def load_model(path, device: str = "cpu", dtype=None, **kwargs):
    """Load an RWKV-7 checkpoint (``.pth`` optional). See :func:`rwkv_engine.model.load_model`."""
    from .model import load_model as _load
    return _load(path, device=device, dtype=dtype, **kwargs)


def __getattr__(name):
    if name in _SUBMODULES or importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
