"""The plugin's own Python host: ``python -m rwkv_nvim.host``.

lua/rwkv/host.lua starts it from the plugin's environment (``:RwkvBuild``) with
``jobstart({python, "-m", "rwkv_nvim.host"}, {rpc = true, env = {PYTHONPATH =
<plugin>/rplugin/python3}})`` the first time the plugin needs Python: no manifest, no
:UpdateRemotePlugins, no restart, and torch does not land in the python3 host that other
plugins share. It attaches to stdin/stdout with pynvim, builds the same Bridge as the
rplugin class and answers the same functions (``functions.FUNCTIONS``) by the same
``dispatch``: requests (sync functions) and notifications (the others).

Once attached it tells Lua it is up (``require('rwkv.host').on_host_ready(info)``);
a host that exits before that failed to start (the environment is broken), one that
exits after it died (remote.lua restarts it once).

stdout is the RPC channel: pynvim moves fd 1 away and points it at stderr, so a stray
print (or a compiler run by the kernel build) cannot corrupt the channel; stderr goes to
Neovim, which keeps its last lines for the error message.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, List

LUA_READY = "return require('rwkv.host').on_host_ready(...)"


def main() -> int:
    # the package's __init__ imported pynvim already: without it the host exits with
    # "No module named 'pynvim'" on stderr before attaching, which remote.lua reports
    import pynvim

    from . import functions
    from .bridge import Bridge

    pynvim.setup_logging("rwkv")         # $NVIM_PYTHON_LOG_FILE, like Neovim's own host
    functions.HOST_KIND["kind"] = "own"
    nvim = pynvim.attach("stdio")
    bridge = Bridge(nvim)

    def on_request(name: str, args: List[Any]) -> Any:
        return functions.dispatch(bridge, name, args)

    def on_notification(name: str, args: List[Any]) -> None:
        functions.dispatch(bridge, name, args)

    def on_setup() -> None:
        info = {"pid": os.getpid(), "python": sys.version.split()[0], "executable": sys.executable,
                "prefix": sys.prefix}
        nvim.exec_lua(LUA_READY, info, async_=True)

    try:
        nvim.run_loop(on_request, on_notification, on_setup)
    finally:
        bridge.close()
        logging.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
