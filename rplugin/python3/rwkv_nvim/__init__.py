"""rwkv.nvim remote plugin: the pynvim entry point of the rplugin-manifest path.

Two ways to host the plugin, one code path (the table in ``functions.py``):
- the plugin's own host (default once ``:RwkvBuild`` made the plugin's environment):
  ``python -m rwkv_nvim.host``, started by lua/rwkv/host.lua (see host.py);
- Neovim's shared python3 host through the rplugin manifest (:UpdateRemotePlugins):
  this class, whose methods are generated from the same table.

Kept thin on purpose: this module is imported by :UpdateRemotePlugins and at every
python3 host start, so nothing heavy (torch, numpy, rwkv_engine.service) is imported
here. The engine is imported on a background thread on first use (see bridge.py).

Functions (all called from lua/rwkv/host.lua; async = rpcnotify, never blocks the editor):
    RwkvStart(opts, host)    async  create/reconfigure the engine (EngineConfig.from_dict);
                                    host = {debug, log_file} (debug logging, default off)
    RwkvRequest(request)     async  a completion request (latest wins)
    RwkvAccept(id, text)     async  text accepted from request id (speculative next)
    RwkvCancel()             async  drop the running request
    RwkvAddChunk(text, file) async  extra context for the ring
    RwkvPrime()              async  idle: compute a queued chunk's state
    RwkvDownload(name)       async  download a model on a background thread
    RwkvStatusInfo()         sync   the engine's status dict (cheap), with the host's pid/rss
    RwkvPing()               sync   "ok" (health check: the plugin is loaded)
"""
from __future__ import annotations

import pynvim

from .bridge import Bridge
from .functions import FUNCTIONS, dispatch


class RwkvPlugin:
    def __init__(self, nvim) -> None:
        self.nvim = nvim
        self.bridge = Bridge(nvim)

    @pynvim.shutdown_hook
    def shutdown(self) -> None:
        self.bridge.close()


def _handler(name: str, sync: bool):
    def handler(self, args):
        return dispatch(self.bridge, name, args)

    handler.__name__ = handler.__qualname__ = f"fn_{name}"
    return pynvim.function(name, sync=sync)(handler)


for _name, _fn in FUNCTIONS.items():
    setattr(RwkvPlugin, f"fn_{_name}", _handler(_name, _fn.sync))

RwkvPlugin = pynvim.plugin(RwkvPlugin)
