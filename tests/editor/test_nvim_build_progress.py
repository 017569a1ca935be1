"""Issue 21 item 7: what lazy.nvim's build shows (lua/rwkv/build.lua).

The build process is replaced by a short script that prints what the quick start prints
(steps, a long line, a silent step) so that the progress lines can be checked in a
headless Neovim, driven the way lazy.nvim drives a build function (a coroutine whose
yields are progress messages; tests/editor/test_nvim_install.py runs the real build):
short lines, a silent step named again with its time, one clear last line that is also
in :messages.
"""
from __future__ import annotations

import sys

import pytest

from test_nvim_install import LAZY_BUILD

pytestmark = [pytest.mark.nvim]

SCRIPT = r"""
import time
print("[rwkv.nvim] installing torch==2.13.0 (TORCH_SPEC / TORCH_INDEX_URL choose another build; a large download the first time)", flush=True)
print("Collecting torch==2.13.0 from a very long index address that goes on and on and on and on and on", flush=True)
print("[rwkv.nvim] compiling the WKV-7 kernels (once; the first suggestion would wait for it otherwise)", flush=True)
time.sleep(2.6)
print("[rwkv.nvim] ready in 3s: /some/venv (Python 3.11.7, torch 2.13.0+cpu)", flush=True)
"""


def test_lazy_build_lines_are_short_name_the_silent_step_and_end_with_ready(nvim_session, tmp_path):
    s = nvim_session(manifest=False)
    script = tmp_path / "fake_build.py"
    script.write_text(SCRIPT)
    venv = tmp_path / "venv"
    s.lua("""local argv, dir = ...
      local b = require('rwkv.build')
      b.HEARTBEAT_S = 1
      b.plan = function() return { argv = argv, dir = dir, interpreter = argv[1] } end""",
          [sys.executable, "-u", str(script)], str(venv))
    s.lua(LAZY_BUILD)
    s.wait_for("_G.LAZY.done", timeout=60, what="the build")
    result = s.lua("return _G.LAZY")
    assert result.get("err") is None, result
    msgs = result["msgs"]
    assert all(len(m) <= 72 for m in msgs[:-1]), msgs           # lazy.nvim cuts at its width
    assert msgs[0].startswith("rwkv: installing torch==2.13.0")
    beats = [m for m in msgs if "still running" in m]
    assert beats and all(b.startswith("rwkv: compiling the WKV-7 kernels (still running, ") for b in beats), msgs
    last = msgs[-1]
    assert last == f"rwkv: the plugin's Python environment is ready (Python 3.11.7, torch 2.13.0+cpu, built in 3 s): {venv}" \
        or last.startswith("rwkv: the plugin's Python environment is ready (Python 3.11.7, torch 2.13.0+cpu, built in "), last
    assert str(venv) in last
    assert last in s.messages().splitlines()                    # and in :messages, where it stays
