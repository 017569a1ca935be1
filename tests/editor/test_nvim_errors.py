"""Issue 11, part 3, in the editor: a request's error reaches the user once and shows in
:RwkvStatus with its time; a model that failed to load loads again after :RwkvDownload
+ :RwkvEnable (and a loaded one is not reloaded by the same options).

The first test replaces the Python side with the recorder (results injected the way
the rplugin delivers them); the second runs the real host and engine (tiny model served
by a loopback stand-in for the Hugging Face Hub).
"""
from __future__ import annotations

import re

import pytest

from nvim_harness import RECORDER, require_nvim, start_nvim
from reliability_helpers import SUGGEST, fresh_buffer, live_opts, python_status, wait_done

pytestmark = [pytest.mark.nvim]

WAIT = 300.0   # a first engine start may build the CPU kernel

# the fake Python side answers :RwkvStatus like a loaded engine
FAKE_STATUS = r"""
local remote = require('rwkv.host')
remote.status = function()
  return { loaded = true, model = 'fake', device = 'cpu', dtype = 'float32', error = vim.NIL,
           last_error = vim.NIL, cache = {}, last = {} }
end
require('rwkv').on_event('ready', { model = 'fake', device = 'cpu', dtype = 'float32', load_ms = 1 })
"""

# deliver the answer to the request at the cursor: no candidates, an error
FAIL_HERE = f"""
local msg, also_event = ...
local sg = {SUGGEST}
if also_event then  -- an engine failure: the service emits "error", then answers
  require('rwkv').on_event('error', {{ message = msg }})
end
sg.on_done({{ id = sg.state.sent.id, candidates = {{}}, stats = {{}}, error = msg }})
"""

TIME = re.compile(r"\d\d:\d\d:\d\d, \d+ s ago")


def _status_text(s) -> str:
    s.cmd("RwkvStatus")
    # a line longer than the screen is echoed wrapped, continued with two spaces: joined here
    return s.messages().split("rwkv: suggestions")[-1].replace("\n  ", " ")


def test_request_errors_notify_once_each_and_the_last_shows_in_status(tmp_path):
    require_nvim()
    s = start_nvim(tmp_path / "nv", {"debounce_ms": 10, "notify": False}, manifest=False)
    try:
        s.lua(RECORDER)
        s.cmd("setlocal filetype=python")
        s.feed("i")
        s.wait_for("require('rwkv.host').state.started", timeout=10, what="the engine start")
        s.lua(FAKE_STATUS)
        oom = "CUDA error: an illegal memory access was encountered"
        malformed = "cursor row 4 is outside the window of lines 0..0"
        # every keystroke's request fails the same way: one notification, not one per key
        for ch in "x = 1":
            s.feed(ch)
            s.wait_for("_G.T.asked_here()", timeout=10, what="a request at the cursor")
            s.lua(FAIL_HERE, oom, True)
        s.settle()
        notes = [m for m in s.messages().splitlines() if m.startswith("rwkv:")]
        assert notes == [f"rwkv: {oom}"], s.messages()
        # a request error that only its result carries (a malformed request) is reported too
        s.feed("y")
        s.wait_for("_G.T.asked_here()", timeout=10, what="a request at the cursor")
        s.lua(FAIL_HERE, malformed, False)
        s.feed("z")
        s.wait_for("_G.T.asked_here()", timeout=10, what="a request at the cursor")
        s.lua(FAIL_HERE, malformed, False)
        s.settle()
        notes = [m for m in s.messages().splitlines() if m.startswith("rwkv:")]
        assert notes == [f"rwkv: {oom}", f"rwkv: {malformed}"], s.messages()
        st = s.lua("return require('rwkv').status()")
        assert st["last_error"]["message"] == malformed and isinstance(st["last_error"]["time"], int)
        assert st.get("error") is None                                  # the engine still works
        assert s.lua("return require('rwkv').statusline()") == "rwkv:on"
        s.feed("<Esc>")
        text = _status_text(s)
        (line,) = [ln for ln in text.splitlines() if ln.startswith("last error")]
        assert TIME.search(line) and line.endswith(malformed), text
        assert oom not in text
    finally:
        s.close()


MODEL_FILE = "rwkv7-g1a-0.1b-20250728-ctx4096.pth"


def test_a_failed_load_loads_again_after_download_and_enable(tmp_path, tiny_model_path):
    """:RwkvDownload of the missing model, then :RwkvEnable loads it; the same options
    again (setup(), :RwkvEnable) do not reload a loaded model."""
    require_nvim()
    from fake_hf_server import FakeHub

    opts = live_opts("g1-0.1b", tmp_path, download_dir=str(tmp_path / "models"))
    with FakeHub({MODEL_FILE: tiny_model_path.read_bytes()}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        s = start_nvim(tmp_path / "nv", opts, extra_env=env)
        try:
            s.lua("""local m = require('rwkv'); local f = m.on_event; _G.E = {}
              m.on_event = function(kind, info) table.insert(_G.E, kind); return f(kind, info) end""")
            fresh_buffer(s)
            s.feed("ix = 1")
            s.wait_for("require('rwkv').status().error ~= nil", timeout=WAIT, what="the load error")
            err = s.lua("return require('rwkv').status().error")
            assert "g1-0.1b" in err and "download" in err
            assert s.lua("return require('rwkv').statusline()") == "rwkv:err"
            s.feed("<Esc>")
            text = _status_text(s)
            assert any(ln.startswith("error (") and TIME.search(ln) and "g1-0.1b" in ln
                       for ln in text.splitlines()), text
            s.cmd("RwkvDownload g1-0.1b")
            s.wait_for("vim.fn.execute('messages'):find('downloaded g1%-0%.1b') ~= nil", timeout=WAIT,
                       what="the download")
            s.cmd("RwkvEnable")
            s.wait_for("require('rwkv').status().loaded", timeout=WAIT, what="the model loaded again")
            assert s.lua("return require('rwkv').status().error") is None
            assert python_status(s).get("loaded") is True
            s.feed("o")
            s.feed("def f(x):<CR>return ")
            s.lua(f"{SUGGEST}.trigger()")
            wait_done(s, timeout=WAIT)
            assert s.lua("return require('rwkv').statusline()") != "rwkv:err"
            loads = s.lua("return vim.tbl_count(vim.tbl_filter(function(k) return k == 'loading' end, _G.E))")
            assert loads == 2
            # a loaded model: the same options are a no-op
            s.feed("<Esc>")
            s.cmd("RwkvEnable")
            s.lua("require('rwkv').setup(...)", opts)
            s.lua("vim.wait(500)")
            s.settle()
            assert s.lua("return vim.tbl_count(vim.tbl_filter(function(k) return k == 'loading' end, _G.E))") == 2
            assert python_status(s).get("loaded") is True
        finally:
            s.close()
