"""rwkv_engine: the RWKV-7 inference engine and completion pipeline of rwkv.nvim.

Three layers, each importing only the ones below it (tests/tools/test_layers.py checks):

    core/       the model and nothing about editing: checkpoint, model, state, wkv +
                kernel_loader, tokenizer, sampler, download (library half), errors
    pipeline/   from a request to ranked candidates: config, prompt_layout, context_ring,
                state_cache, prefill, speculation, candidates, loading, completer
                (orchestration), service (worker thread)
    cli/        the `rwkv-nvim` console script and its subcommands

Importing this package is cheap (no torch): heavy modules load on first use.

Public API (contract):
    rwkv_engine.load_model(path, device="cpu", dtype=None) -> RWKV7
    model.new_state(batch) -> State
    model.forward(tokens: LongTensor[B, T], state) -> (logits [B, V] fp32, State)
    rwkv_engine.tokenizer.encode(text) / .decode(ids)
"""
from __future__ import annotations

import sys

from .core import tokenizer

__version__ = "0.1.0"

# the contract name `rwkv_engine.tokenizer` (import statement and attribute alike)
sys.modules[__name__ + ".tokenizer"] = tokenizer


def load_model(path, device: str = "cpu", dtype=None, **kwargs):
    """Load an RWKV-7 checkpoint (``.pth`` optional). See :func:`rwkv_engine.core.model.load_model`."""
    from .core.model import load_model as _load
    return _load(path, device=device, dtype=dtype, **kwargs)
