"""Fixtures every layer's tests share: small random RWKV-7 checkpoints in the official
layout, and the `rwkv` reference package.

The tests mirror the code's layers (README, "Layout"): core/ (model, kernels, tokenizer,
precision), pipeline/ (prompt, state cache, prefill, candidates, service), remote/ (the
llama.cpp and OpenAI-compatible backends), cli/ (`rwkv-nvim` subcommands), editor/
(headless Neovim end to end: Lua plugin + host bridge), tools/ (bench/ and tools/ scripts,
the layer rules), gpu/ (skipped without CUDA). Helper modules shared across folders
(Neovim harness, fake servers, random checkpoints, pipeline fixtures) live in support/,
which is put on sys.path here; each folder's conftest.py holds that folder's own fixtures."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "support"))
os.environ.setdefault("RWKV_NVIM_LOG_LEVEL", "WARNING")
# dtype = "auto" on the CPU would measure the precision modes once per CPU (~10 s, and a
# file in ~/.cache): the suite runs fp32; tests/core/test_cpu_precision.py measures on purpose
os.environ.setdefault("RWKV_NVIM_CPU_PRECISION", "fp32")

from rwkv_engine.core.random_checkpoint import write_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """2 layers, n_embd 128, the full 65536 World vocabulary, fp32."""
    return write_checkpoint(tmp_path_factory.mktemp("models") / "tiny.pth", n_layer=2, n_embd=128, seed=1)


@pytest.fixture(scope="session")
def small_model_path(tmp_path_factory) -> Path:
    """4 layers, n_embd 256 (4 heads), full vocabulary, fp32."""
    return write_checkpoint(tmp_path_factory.mktemp("models") / "small.pth", n_layer=4, n_embd=256, seed=2)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    import rwkv_engine
    return rwkv_engine.load_model(tiny_model_path, device="cpu")


@pytest.fixture(scope="session")
def rwkv_reference():
    """The `rwkv` pip package's RWKV_x070 class (test-only oracle)."""
    os.environ["RWKV_V7_ON"] = "1"
    os.environ.setdefault("RWKV_JIT_ON", "0")
    os.environ["RWKV_CUDA_ON"] = "0"
    try:
        from rwkv.model import RWKV
    except ImportError:
        pytest.skip("the `rwkv` reference package is not installed (pip install -e '.[test]')")
    return RWKV
