"""Where rwkv.nvim keeps its caches: the one place that says it.

    $XDG_CACHE_HOME/rwkv.nvim, or ~/.cache/rwkv.nvim when XDG_CACHE_HOME is unset or empty

Under it: ``kernels/`` (compiled kernels; $RWKV_NVIM_KERNEL_DIR moves them),
``cpu-precision.json`` (the CPU precision verdicts: timing per CPU),
``model-precision.json`` (the per-model accuracy gate's results, keyed by file identity),
``states/`` (recurrent states on disk), ``llama.cpp/`` (the developer tooling's llama.cpp
build). The engine option ``cache_dir`` replaces the root for the states and the verdicts. tools/quickstart.py,
which runs before the package is installed, keeps a copy of this rule that a test checks.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$XDG_CACHE_HOME/rwkv.nvim, else ~/.cache/rwkv.nvim."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "rwkv.nvim"
