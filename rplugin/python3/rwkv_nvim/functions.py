"""The remote functions of rwkv.nvim: ONE table behind both ways of hosting the plugin.

- the rplugin manifest path: ``RwkvPlugin`` in ``__init__.py`` turns every entry into a
  ``@pynvim.function`` (Neovim's shared python3 host, after :UpdateRemotePlugins);
- the plugin's own host: ``host.py`` (``python -m rwkv_nvim.host``, started by
  lua/rwkv/host.lua over an RPC channel) answers requests/notifications by these names.

Both call :func:`dispatch`, so a function behaves the same in either host. ``sync``:
answered (``rpcrequest``: the editor waits, keep them cheap); otherwise a notification
(``rpcnotify``: never blocks the editor). lua/rwkv/host.lua keeps the names of the
sync ones (``M.SYNC``; a test checks that both agree).

Nothing heavy is imported here (no torch): see ``__init__.py``.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
from typing import Any, Callable, Dict, NamedTuple

from .bridge import Bridge, one_line

log = logging.getLogger(__name__)

# "manifest" (Neovim's python3 host) or "own" (host.py sets it): only changes the
# advice given when the environment lacks torch
HOST_KIND = {"kind": "manifest"}


def _arg(args: Any, i: int, default: Any = None) -> Any:
    return args[i] if isinstance(args, (list, tuple)) and len(args) > i else default


def missing_torch_message() -> str:
    """Why the engine cannot start in this interpreter, or "" when torch is there."""
    try:
        if importlib.util.find_spec("torch") is not None:
            return ""
    except Exception:   # a broken torch install: let the engine's import report it
        return ""
    if HOST_KIND["kind"] == "own":
        return (f"torch is not installed in the plugin's Python environment ({sys.prefix}): "
                "run :RwkvBuild to repair it (see :checkhealth rwkv)")
    return ""           # the shared host: the bridge's own message ("cannot import the engine")


def _start(bridge: Bridge, args: Any) -> None:
    problem = missing_torch_message()
    if problem:
        bridge.configure_host(_arg(args, 1, {}))
        bridge._fail_start(problem)
        return
    bridge.start(_arg(args, 0, {}), _arg(args, 1, {}))


class Function(NamedTuple):
    sync: bool
    call: Callable[[Bridge, list], Any]
    default: Any = None    # returned by a sync function whose call failed


# name -> (sync, bridge call); see the module docstring
FUNCTIONS: Dict[str, Function] = {
    # create/reconfigure the engine (EngineConfig.from_dict); args: engine options, host
    # options {debug, log_file}
    "RwkvStart": Function(False, _start),
    # a completion request (latest wins)
    "RwkvRequest": Function(False, lambda b, a: b.request(_arg(a, 0))),
    # text accepted from request id (speculative next)
    "RwkvAccept": Function(False, lambda b, a: b.accept(_arg(a, 0, 0), _arg(a, 1, ""))),
    # drop the running request
    "RwkvCancel": Function(False, lambda b, a: b.cancel()),
    # extra context for the ring: text, file name
    "RwkvAddChunk": Function(False, lambda b, a: b.add_chunk(_arg(a, 0), _arg(a, 1, ""))),
    # idle: compute a queued chunk's state
    "RwkvPrime": Function(False, lambda b, a: b.prime()),
    # download a model on a background thread
    "RwkvDownload": Function(False, lambda b, a: b.download(_arg(a, 0, ""))),
    # the engine's status dict (cheap; pid and rss_bytes of this host)
    "RwkvStatusInfo": Function(True, lambda b, a: b.status(), {}),
    # "ok": the plugin is loaded
    "RwkvPing": Function(True, lambda b, a: "ok"),
}


def dispatch(bridge: Bridge, name: str, args: Any) -> Any:
    """Call function ``name`` with ``args`` (the list Neovim sent). Never raises: an
    exception escaping a handler would be printed by pynvim as a traceback in the user's
    face; it is logged and reported as one line (an "error" event) instead."""
    fn = FUNCTIONS.get(name)
    if fn is None:
        bridge.event("error", {"message": f"internal error: unknown function {name}"})
        return None
    try:
        result = fn.call(bridge, args if isinstance(args, list) else list(args or []))
    except Exception as exc:
        log.exception("rwkv: handler %s failed", name)
        bridge.event("error", {"message": f"internal error: {one_line(exc)}"})
        return fn.default
    return fn.default if (fn.sync and result is None) else result
