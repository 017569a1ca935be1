"""The llama.cpp CPU tools for tests: the cached build, or built now (a few minutes, once per
machine: ~/.cache/rwkv.nvim/llama.cpp). Tests skip cleanly where it cannot be had."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import llamacpp_peer as lc  # noqa: E402  (developer tooling of the checkout: bench/llamacpp_peer)

NEEDED = ("llama-server", "llama-bench", "llama-batched-bench")


def llama_bins_or_skip() -> Path:
    """The bin directory of the llama.cpp build, or pytest.skip with the reason."""
    bins = lc.bin_dir()
    if bins is not None and all((bins / t).is_file() for t in NEEDED):
        return bins
    if os.environ.get("RWKV_LLAMA_CPP_BUILD", "1") == "0":
        pytest.skip("no cached llama.cpp build and RWKV_LLAMA_CPP_BUILD=0")
    if not (shutil.which("cmake") and shutil.which("g++")):
        pytest.skip("building llama.cpp needs cmake and g++ (apt-get install -y cmake g++)")
    try:
        return lc.build(jobs=2)
    except lc.BuildError as e:
        if "could not download" in str(e):
            pytest.skip(str(e).splitlines()[0])
        raise
