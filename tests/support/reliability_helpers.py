"""Shared helpers of the reliability / security tests (issue 8).

- ``RECORDER``: Lua that replaces the Python side with a recorder (like test_nvim_e2e's),
  plus probes: the time spent in the plugin's typing handlers and every draw checked
  against the cursor position it is drawn for.
- ``live_opts``: options for a headless nvim running the real engine on the tiny model.
- ``wait_done``: wait until the request at the cursor has been answered.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from nvim_harness import RECORDER, REPO, NvimSession  # noqa: F401  (RECORDER re-exported)

SUGGEST = "require('rwkv.suggest')"


# Lua: time every plugin handler that runs on the typing path / on a result, and check
# every ghost-text draw against the position it is drawn at. Install after setup().
PROBES = r"""
_G.P = { max_ms = {}, calls = {}, stale_draws = 0, draws = 0, remote = {} }
local sg = require('rwkv.suggest')
local function timed(mod, name)
  local f = mod[name]
  mod[name] = function(...)
    local t0 = vim.uv.hrtime()
    local r = { f(...) }
    local ms = (vim.uv.hrtime() - t0) / 1e6
    _G.P.max_ms[name] = math.max(_G.P.max_ms[name] or 0, ms)
    _G.P.calls[name] = (_G.P.calls[name] or 0) + 1
    return unpack(r)
  end
end
for _, n in ipairs({ 'on_change', 'request', 'on_partial', 'on_done', 'reset', 'hide' }) do timed(sg, n) end
-- the autocmds captured the old functions: re-create them with the timed ones
vim.api.nvim_create_autocmd({ 'TextChangedI', 'CursorMovedI' }, { group = 'rwkv', callback = function() sg.on_change() end })
for _, au in ipairs(vim.api.nvim_get_autocmds({ group = 'rwkv', event = 'TextChangedI' })) do
  if au.desc == 'rwkv: suggest while typing' then vim.api.nvim_del_autocmd(au.id) end
end
local ghost = require('rwkv.ghost')
local show = ghost.show
ghost.show = function(buf, row, col, ...)
  _G.P.draws = _G.P.draws + 1
  local cur = vim.api.nvim_win_get_cursor(0)
  if buf ~= vim.api.nvim_get_current_buf() or row ~= cur[1] - 1 or col ~= cur[2]
      or vim.api.nvim_get_mode().mode:sub(1, 1) ~= 'i' then
    _G.P.stale_draws = _G.P.stale_draws + 1
  end
  return show(buf, row, col, ...)
end
local remote = require('rwkv.host')
local call = remote.call
remote.call = function(name, ...)
  _G.P.remote[name] = (_G.P.remote[name] or 0) + 1
  return call(name, ...)
end
"""

# remote functions that are rpcnotify (never wait for Python)
ASYNC_FUNCTIONS = {"RwkvStart", "RwkvRequest", "RwkvAccept", "RwkvCancel", "RwkvAddChunk", "RwkvPrime",
                   "RwkvDownload"}


def live_opts(model: Path, root: Path, **engine) -> dict:
    opts = {
        "debounce_ms": 10,
        "engine": {
            "model": str(model), "device": "cpu", "candidates": 2, "max_tokens": 6, "seed": 0,
            "temperature": 1.0, "time_budget_ms": 5000, "cache_dir": str(root / "engine-cache"),
            "n_prefix": 32, "n_suffix": 8, "near_prefix": 8, "near_suffix": 4,
        },
    }
    opts["engine"].update(engine)
    return opts


def wait_done(s: NvimSession, timeout: float = 300, what: str = "") -> dict:
    """Wait until the last request sent was answered (on_done); returns its stats."""
    s.wait_for(f"{SUGGEST}.state.sent ~= nil and {SUGGEST}.state.sent.done", timeout=timeout,
               what=what or "the answer to the request at the cursor")
    return s.lua(f"return {SUGGEST}.state.last or vim.empty_dict()")


def python_status(s: NvimSession) -> dict:
    return s.lua("return require('rwkv.host').status()") or {}


def host_log_text(root: Path) -> str:
    """Everything the Python host and nvim logged under a session root."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and (p.name.endswith(".log") or "py3log" in p.name or p.name.startswith("nvim.log")):
            out.append(p.read_text(errors="replace"))
    return "\n".join(out)


def fresh_buffer(s: NvimSession, lines: Optional[list] = None, filetype: str = "python") -> None:
    s.feed("<Esc>")
    s.settle()
    s.cmd("enew!")
    s.cmd(f"setlocal filetype={filetype}")
    if lines is not None:
        s.nvim.current.buffer[:] = lines


def bridge_module():
    """rplugin/python3/rwkv_nvim/bridge.py, imported the way the python3 host does."""
    import sys
    sys.path.insert(0, str(REPO / "rplugin" / "python3"))
    try:
        from rwkv_nvim import bridge
    finally:
        sys.path.pop(0)
    return bridge


class FakeNvim:
    """What the host Bridge sends to Lua, recorded (async_call runs the callback now)."""

    def __init__(self):
        import threading
        self.sent = []
        self.lock = threading.Lock()

    def async_call(self, fn, *args):
        fn(*args)

    def exec_lua(self, code, *args, async_=False):
        with self.lock:
            self.sent.append((code, args))

    def events(self, kind):
        with self.lock:
            return [a[1] for c, a in self.sent if "on_event" in c and a[0] == kind]
