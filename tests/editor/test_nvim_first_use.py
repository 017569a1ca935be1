"""Issue 21 item 2: the first suggestion does not wait for the model to load.

With the plugin's own host (its environment exists) the engine starts right after
start-up (deferred after VimEnter, a jobstart and one notification: the editor is not
blocked) and the model loads in the host's worker thread while nobody types; the first
keystroke then finds it loaded. The environment here is the test interpreter's own
(it has pynvim and this checkout's engine), as :RwkvBuild would have made it.
"""
from __future__ import annotations

import json
import sys
import time

import pytest

from nvim_harness import require_nvim, start_nvim

pytestmark = [pytest.mark.nvim, pytest.mark.slow]


def test_model_loads_at_start_not_at_the_first_keystroke(tmp_path):
    require_nvim()
    opts = {"debounce_ms": 20, "python": {"env": sys.prefix, "host": "own"}, "engine": {"device": "cpu"}}
    # the precision verdict is the build's job (test_quickstart_torch): not measured here
    s = start_nvim(tmp_path / "nv", opts, manifest=False, extra_env={"RWKV_NVIM_CPU_PRECISION": "fp32"})
    try:
        assert s.nvim.api.get_mode()["mode"] == "n"
        s.wait_for("require('rwkv.host').state.started", timeout=10, what="the engine start after VimEnter")
        s.wait_for("require('rwkv').status().loaded", timeout=120, what="the model, loaded without a keystroke")
        assert s.lua("return require('rwkv.host').state.kind") == "own"
        s.cmd("setlocal filetype=python")
        t0 = time.monotonic()
        s.feed("idef hello(name):<CR>return ")
        s.wait_for("require('rwkv.ghost').get() ~= nil", timeout=60, what="the first ghost text")
        first = time.monotonic() - t0
        print("\nfirst ghost text after the first keystroke (model loaded at start): "
              + json.dumps({"first_ghost_s": round(first, 2)}))
        assert not s.errors_in_messages(), s.messages()
    finally:
        s.close()


def test_a_missing_cpu_verdict_never_blocks_a_suggestion(tmp_path):
    """A fresh cache and no build: the engine serves fp32 at once, measures the CPU in
    the background between requests, then switches; :RwkvStatus says which is true."""
    require_nvim()
    opts = {"debounce_ms": 20, "python": {"env": sys.prefix, "host": "own"}, "engine": {"device": "cpu"}}
    s = start_nvim(tmp_path / "nv", opts, manifest=False, extra_env={"RWKV_NVIM_CPU_PRECISION": ""})  # measure
    status = "table.concat(require('rwkv').status_lines(), '\\n')"
    try:
        s.wait_for("require('rwkv').status().loaded", timeout=120, what="the model, loaded without a keystroke")
        assert "precision: fp32 (auto: measuring this CPU in the background)" in s.lua(f"return {status}")
        s.cmd("setlocal filetype=python")
        t0 = time.monotonic()
        s.feed("idef hello(name):<CR>return ")
        s.wait_for("require('rwkv.ghost').get() ~= nil", timeout=30, what="the first ghost text")
        first = time.monotonic() - t0
        print("\nfirst ghost text with the CPU not measured yet: " + json.dumps({"first_ghost_s": round(first, 2)}))
        s.feed("<Esc>")
        s.wait_for(f"not {status}:find('measuring this CPU', 1, true) and {status}:find('precision: ', 1, true)",
                   timeout=180, what="the background measurement's verdict in :RwkvStatus")
        lines = s.lua("return require('rwkv').status_lines()")
        assert [ln for ln in lines if ln.startswith("precision: ") and "(auto:" in ln], "\n".join(lines)
        s.feed("o    x = ")
        s.wait_for("require('rwkv.ghost').get() ~= nil", timeout=60, what="a ghost text after the switch")
        assert not s.errors_in_messages(), s.messages()
    finally:
        s.close()


def test_no_preload_while_the_environment_is_being_built(tmp_path):
    """A build in progress has made the environment's python before its packages: the
    start-up preload must not start the host from it (CI saw "No module named 'pynvim'")."""
    require_nvim()
    opts = {"debounce_ms": 20, "python": {"env": sys.prefix, "host": "own"}, "engine": {"device": "cpu"}}
    s = start_nvim(tmp_path / "nv", opts, manifest=False, extra_env={"RWKV_NVIM_CPU_PRECISION": "fp32"})
    try:
        # a build is running (if the deferred preload already started a host: stop it)
        s.lua("require('rwkv.build').running = true; require('rwkv.host').reset()")
        assert s.lua("return require('rwkv').preload()") is False
        assert not s.lua("return require('rwkv.host').state.started")
        s.lua("require('rwkv.build').running = false")
        assert s.lua("return require('rwkv').preload()") is True      # the build is done: it loads
        s.wait_for("require('rwkv').status().loaded", timeout=120, what="the model")
        assert not s.errors_in_messages(), s.messages()
    finally:
        s.close()
