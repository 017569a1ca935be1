"""``:checkhealth rwkv`` for the remote backend: reach the server, show its model and FIM mode."""
from __future__ import annotations

import os
import time
from typing import Dict

from ...core.errors import one_line
from ..config import EngineConfig
from .servers import server_backend

# -- :checkhealth --------------------------------------------------------------------------------
def probe(config, timeout_ms: int = 3000) -> dict:
    """Reach the configured server once (short timeouts): {"backend", "url", "ok", "ms",
    "model", "fim", "slots", "ids", "error", "api_key"}. ``config``: an EngineConfig or its
    dict. Never raises for a server problem (``ok`` False and ``error`` say what)."""
    try:
        cfg = config if isinstance(config, EngineConfig) else EngineConfig.from_dict(config)
    except ValueError as e:                             # a bad option: setup() says the same
        return {"ok": False, "error": one_line(e)}
    out: Dict[str, object] = {"backend": cfg.backend, "url": cfg.url, "ok": False}
    if cfg.backend == "local":
        out["ok"] = True
        return out
    if cfg.api_key_env:
        out["api_key"] = (f"from ${cfg.api_key_env}" if os.environ.get(cfg.api_key_env, "").strip()
                          else f"${cfg.api_key_env} is not set")
    fast = cfg.replace(timeout_connect_ms=min(cfg.timeout_connect_ms, timeout_ms),
                       timeout_first_byte_ms=min(cfg.timeout_first_byte_ms, timeout_ms),
                       timeout_total_ms=min(cfg.timeout_total_ms, timeout_ms))
    t0 = time.perf_counter()
    try:
        rc = server_backend(fast)
    except Exception as e:                              # bad url, missing API key, no httpx
        out["error"] = one_line(e)
        return out
    try:
        out["url"] = rc.display_url
        info = rc.detect()
        out.update(ok=True, model=info.get("model"), fim=info.get("fim"), slots=info.get("slots"),
                   ids=info.get("ids"), vocab_type=info.get("vocab_type"), models=info.get("models"))
    except Exception as e:
        out["error"] = one_line(e)
    finally:
        rc.close()
    out["ms"] = round((time.perf_counter() - t0) * 1000, 1)
    return out
