"""rwkv.nvim remote plugin: the pynvim entry point.

Kept thin on purpose: this module is imported by :UpdateRemotePlugins and at every
python3 host start, so nothing heavy (torch, numpy, rwkv_engine.service) is imported
here. The engine is imported on a background thread on first use (see bridge.py).

Functions (all called from lua/rwkv/*.lua; async = rpcnotify, never blocks the editor):
    RwkvStart(opts, host)    async  create/reconfigure the engine (EngineConfig.from_dict);
                                    host = {debug, log_file} (debug logging, default off)
    RwkvRequest(request)     async  a completion request (latest wins)
    RwkvAccept(id, text)     async  text accepted from request id (speculative next)
    RwkvCancel()             async  drop the running request
    RwkvAddChunk(text, file) async  extra context for the ring
    RwkvPrime()              async  idle: compute a queued chunk's state
    RwkvDownload(name)       async  download a model on a background thread
    RwkvStatusInfo()         sync   the engine's status dict (cheap)
    RwkvPing()               sync   "ok" (health check: the plugin is loaded)
"""
from __future__ import annotations

import logging

import pynvim

from .bridge import Bridge, one_line

log = logging.getLogger(__name__)


def _arg(args, i, default=None):
    return args[i] if len(args) > i else default


@pynvim.plugin
class RwkvPlugin:
    def __init__(self, nvim) -> None:
        self.nvim = nvim
        self.bridge = Bridge(nvim)

    def _safe(self, fn, *args):
        # an exception escaping an rplugin handler is printed by pynvim as a traceback
        # in the user's face; log it and report one line instead
        try:
            return fn(*args)
        except Exception as exc:
            log.exception("rwkv: handler failed")
            self.bridge.event("error", {"message": f"internal error: {one_line(exc)}"})
            return None

    @pynvim.function("RwkvStart", sync=False)
    def start(self, args) -> None:
        self._safe(self.bridge.start, _arg(args, 0, {}), _arg(args, 1, {}))

    @pynvim.function("RwkvRequest", sync=False)
    def request(self, args) -> None:
        self._safe(self.bridge.request, _arg(args, 0))

    @pynvim.function("RwkvAccept", sync=False)
    def accept(self, args) -> None:
        self._safe(self.bridge.accept, _arg(args, 0, 0), _arg(args, 1, ""))

    @pynvim.function("RwkvCancel", sync=False)
    def cancel(self, args) -> None:
        self._safe(self.bridge.cancel)

    @pynvim.function("RwkvAddChunk", sync=False)
    def add_chunk(self, args) -> None:
        self._safe(self.bridge.add_chunk, _arg(args, 0), _arg(args, 1, ""))

    @pynvim.function("RwkvPrime", sync=False)
    def prime(self, args) -> None:
        self._safe(self.bridge.prime)

    @pynvim.function("RwkvDownload", sync=False)
    def download(self, args) -> None:
        self._safe(self.bridge.download, _arg(args, 0, ""))

    @pynvim.function("RwkvStatusInfo", sync=True)
    def status_info(self, args) -> dict:
        return self._safe(self.bridge.status) or {}

    @pynvim.function("RwkvPing", sync=True)
    def ping(self, args) -> str:
        return "ok"

    @pynvim.shutdown_hook
    def shutdown(self) -> None:
        self.bridge.close()
