"""Between Neovim (pynvim, one event loop) and the completion service (one worker thread).

Rules kept here:
- The nvim API is touched only from the pynvim event loop. Service callbacks arrive on
  the worker thread and are forwarded with ``nvim.async_call`` (thread-safe) to Lua
  (``require('rwkv.suggest').on_partial/on_done``, ``require('rwkv').on_event``).
- ``rwkv_engine.pipeline.service`` (torch) is imported lazily, on a background thread, the first
  time the engine starts, so host start and :UpdateRemotePlugins stay fast.
- Nothing raises into pynvim (it would print a traceback while the user types): errors
  become one line in the "error" event, formatted by the engine's own formatter
  (``rwkv_engine.core.errors.one_line``, torch-free; see ``one_line`` below).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

LUA_SUGGEST = "require('rwkv.suggest')"
LUA_MAIN = "require('rwkv')"


# <plugin root>/rplugin/python3/rwkv_nvim/bridge.py -> <plugin root>, which holds the
# package folder rwkv_engine/
PLUGIN_ROOT = Path(__file__).resolve().parents[3]


# import_engine runs on the start / download threads and, through one_line, on any thread
# that reports an error; reentrant because the engine's import may log a warning, whose
# forwarding formats it with one_line on the same thread
_IMPORT_LOCK = threading.RLock()


def import_engine() -> None:
    """Make ``rwkv_engine`` importable: the installed package, else this checkout's
    rwkv_engine/ (a plugin manager's clone whose Python has torch but not the package
    installed): the plugin root goes at the END of sys.path, so an installed package and
    every other module keep their precedence."""
    with _IMPORT_LOCK:
        if "rwkv_engine" in sys.modules or importlib.util.find_spec("rwkv_engine") is not None:
            return
        if (PLUGIN_ROOT / "rwkv_engine" / "__init__.py").is_file() and str(PLUGIN_ROOT) not in sys.path:
            sys.path.append(str(PLUGIN_ROOT))
            importlib.invalidate_caches()


# The error formatter: ONE implementation, the engine's rwkv_engine.core.errors (torch-free,
# standard library only). Loaded on the first error, never at import (host start and
# :UpdateRemotePlugins stay light):
#   1. as part of the package (import_engine: installed, else this checkout's rwkv_engine/);
#   2. if the package itself cannot be imported (its __init__ fails, a broken install),
#      the same file, this checkout's rwkv_engine/core/errors.py, loaded on its own, so that
#      the failure to import the engine is reported by the same function;
#   3. only when neither exists (no engine anywhere) a bare first line: there is no
#      formatter to share, and the message still has to reach the user.
ERRORS_FILE = PLUGIN_ROOT / "rwkv_engine" / "core" / "errors.py"
_errors_module: Any = None


def _load_errors_module() -> Any:
    global _errors_module
    with _IMPORT_LOCK:
        if _errors_module is not None:
            return _errors_module
        try:
            import_engine()
            from rwkv_engine.core import errors
        except Exception:
            errors = None
            if ERRORS_FILE.is_file():
                try:
                    spec = importlib.util.spec_from_file_location("_rwkv_nvim_engine_errors", ERRORS_FILE)
                    errors = importlib.util.module_from_spec(spec)
                    spec.loader.exec_module(errors)
                except Exception:
                    log.debug("cannot load %s", ERRORS_FILE, exc_info=True)
                    errors = None
        _errors_module = errors
        return errors


def one_line(error: Any) -> str:
    """The one line a user sees for ``error`` (an exception or a message), by the engine's
    formatter (see above)."""
    errors = _load_errors_module()
    if errors is not None:
        return errors.one_line(error)
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(error).__name__


def lua_dict(value: Any) -> dict:
    """A Lua table that arrived as a list (an empty table is sent as []) -> dict."""
    if isinstance(value, dict):
        return value
    if value in (None, [], ()):
        return {}
    raise ValueError(f"expected a table of options, got {type(value).__name__}")


def plain(value: Any) -> Any:
    """`value` with only msgpack-friendly types (dict/list/str/int/float/bool/None)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "item"):          # a 0-d tensor / numpy scalar
        try:
            return value.item()
        except Exception:
            pass
    return str(value)


def clean_text(text: str) -> str:
    """``text`` as pynvim decoded it (invalid UTF-8 -> lone surrogates, "surrogateescape")
    with every invalid byte replaced by U+FFFD, so that it can be encoded again."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def clean_request(request: dict) -> dict:
    """A request whose strings all encode as UTF-8; the cursor column follows the
    cursor line's replacement characters (an invalid byte becomes 3 bytes)."""
    lines = request.get("lines")
    if not isinstance(lines, list):
        return request
    out = dict(request)
    for key in ("filename", "filetype"):
        if isinstance(out.get(key), str):
            out[key] = clean_text(out[key])
    new_lines = [clean_text(x) if isinstance(x, str) else x for x in lines]
    r, col = out.get("row", 0) - out.get("first", 0), out.get("col")
    if isinstance(r, int) and 0 <= r < len(lines) and isinstance(col, int) and isinstance(lines[r], str) \
            and new_lines[r] is not lines[r]:
        head = lines[r].encode("utf-8", "surrogateescape")[:max(0, col)]
        out["col"] = len(head.decode("utf-8", "replace").encode("utf-8"))
    out["lines"] = new_lines
    return out


class _WarningForwarder(logging.Handler):
    """Engine log warnings (disk cache unusable, kernel fallback, ...) -> one "warning"
    event per kind of warning (per message template), so the user sees each once."""

    def __init__(self, bridge: "Bridge") -> None:
        super().__init__(logging.WARNING)
        self.bridge = bridge
        self.seen: set = set()

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno != logging.WARNING or record.msg in self.seen:
            return
        self.seen.add(record.msg)
        try:
            msg = one_line(Exception(record.getMessage()))
        except Exception:
            msg = str(record.msg)
        for prefix in ("rwkv.nvim: ", "rwkv: "):
            msg = msg[len(prefix):] if msg.startswith(prefix) else msg
        self.bridge.event("warning", {"message": msg})


def setup_debug_log(path: str) -> Optional[logging.Handler]:
    """A DEBUG file handler (file mode 0600) on the plugin's and the engine's loggers."""
    try:
        p = Path(path).expanduser()
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(p), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.close(fd)
        os.chmod(p, 0o600)
        handler = logging.FileHandler(str(p), encoding="utf-8")
    except OSError as exc:
        log.warning("rwkv: cannot open the debug log %s (%s)", path, exc)
        return None
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("rwkv_nvim", "rwkv_engine"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    return handler


def host_process() -> dict:
    """This host process: its pid and resident memory (bytes; None when unknown)."""
    rss = None
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024          # "VmRSS:  123456 kB"
                    break
    except (OSError, ValueError, IndexError):
        try:
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # the peak, as a fallback
            rss = peak if sys.platform == "darwin" else peak * 1024
        except Exception:
            rss = None
    return {"pid": os.getpid(), "rss_bytes": rss}


def _load_failed(service) -> bool:
    """Whether ``service`` finished loading without a model (its status has an error)."""
    try:
        st = service.status()
    except Exception:
        return True
    return not st.get("loaded") and bool(st.get("error"))


class Bridge:
    """Owns the CompletionService for one Neovim instance."""

    def __init__(self, nvim) -> None:
        self.nvim = nvim
        self._lock = threading.Lock()
        self._service = None          # rwkv_engine.pipeline.service.CompletionService, once started
        self._options: Optional[dict] = None   # engine options of the running/starting service
        self._starting = False
        self._error: Optional[str] = None      # why the engine could not start (no service)
        self._last_error: Optional[dict] = None   # {"message", "time"} of the last "error" event
        self._pending_request: Optional[dict] = None   # arrived while the service was starting
        self._pending_chunks: list = []
        self._next_options: Optional[dict] = None
        self._debug = False                    # log requests (buffer text) to the debug log
        self._debug_handler: Optional[logging.Handler] = None
        self._forwarder = _WarningForwarder(self)
        logging.getLogger("rwkv_engine").addHandler(self._forwarder)

    # -- to Lua (from any thread) ------------------------------------------------------
    def _to_lua(self, code: str, *args: Any) -> None:
        def call() -> None:
            self.nvim.exec_lua(code, *args, async_=True)

        try:
            self.nvim.async_call(call)
        except Exception:  # the loop is closing (editor exit)
            log.debug("async_call failed", exc_info=True)

    def event(self, kind: str, info: dict) -> None:
        """Service event -> require('rwkv').on_event(kind, info)."""
        if kind == "error":
            self._last_error = {"message": info.get("message"), "time": time.time()}
        self._to_lua(f"return {LUA_MAIN}.on_event(...)", kind, plain(info))

    def _fail_start(self, message: str) -> None:
        self._error = message
        self.event("error", {"message": message})

    def _on_partial(self, msg: dict) -> None:
        self._to_lua(f"return {LUA_SUGGEST}.on_partial(...)", plain(msg))

    def _on_done(self, msg: dict) -> None:
        self._to_lua(f"return {LUA_SUGGEST}.on_done(...)", plain(msg))

    # -- engine lifecycle --------------------------------------------------------------
    def configure_host(self, host_options: Any) -> None:
        """Editor-side options of the host: ``debug`` (log requests) and ``log_file``."""
        try:
            opts = lua_dict(host_options)
        except ValueError:
            return
        self._debug = opts.get("debug") is True
        if self._debug and self._debug_handler is None and isinstance(opts.get("log_file"), str):
            self._debug_handler = setup_debug_log(opts["log_file"])
        if not self._debug and self._debug_handler is not None:
            for name in ("rwkv_nvim", "rwkv_engine"):
                logging.getLogger(name).removeHandler(self._debug_handler)
                logging.getLogger(name).setLevel(logging.NOTSET)
            self._debug_handler.close()
            self._debug_handler = None

    def start(self, options: Any, host_options: Any = None) -> None:
        """Create (or re-create with new options) the service; loads in the background."""
        self.configure_host(host_options)
        try:
            options = lua_dict(options)
        except ValueError as exc:
            self._fail_start(one_line(exc))
            return
        with self._lock:
            if self._starting:
                self._next_options = options     # applied when the current start finishes
                return
            # the same options: nothing to do, unless that engine failed to load (a model
            # downloaded since, a file fixed): then :RwkvEnable / setup() loads again
            if self._service is not None and options == self._options and not _load_failed(self._service):
                return
            self._starting = True
            self._error = None
            self._options = options
            old, self._service = self._service, None
        threading.Thread(target=self._start_thread, args=(options, old),
                         name="rwkv-start", daemon=True).start()

    def _start_thread(self, options: dict, old) -> None:
        service = None
        try:
            if old is not None:
                old.close()
            import_engine()
            from rwkv_engine.pipeline.config import EngineConfig
            from rwkv_engine.pipeline.service import CompletionService

            config = EngineConfig.from_dict(options)
            service = CompletionService(config, on_event=self.event)
            service.start()
        except Exception as exc:  # bad option, missing torch, ...
            message = one_line(exc)
            if isinstance(exc, ImportError):
                message = f"cannot import the engine ({message}); see :checkhealth rwkv"
            self._fail_start(message)
            service = None
        with self._lock:
            self._service = service
            self._starting = False
            request, self._pending_request = self._pending_request, None
            chunks, self._pending_chunks = self._pending_chunks, []
            next_options, self._next_options = self._next_options, None
        if next_options is not None and next_options != options:
            with self._lock:              # keep what arrived for the service that follows
                self._pending_request = self._pending_request or request
                self._pending_chunks = chunks + self._pending_chunks
            self.start(next_options)
            return
        if service is None:
            return
        for text, filename in chunks:
            self._guard(service.add_chunk, text, filename)
        if request is not None:
            self._guard(service.submit, request, self._on_partial, self._on_done)

    def _guard(self, fn: Callable, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            log.exception("rwkv service call failed")
            self.event("error", {"message": one_line(exc)})
            return None

    def _running(self):
        with self._lock:
            return self._service

    # -- requests from Lua (pynvim event loop) -----------------------------------------
    def request(self, request: Any) -> None:
        if not isinstance(request, dict):
            return
        request = clean_request(request)
        if self._debug:           # buffer text: only with setup({debug = true})
            log.debug("request %r", request)
        with self._lock:
            service = self._service
            if service is None:
                self._pending_request = request   # latest wins
                return
        self._guard(service.submit, request, self._on_partial, self._on_done)

    def accept(self, request_id: Any, text: Any) -> None:
        service = self._running()
        if service is not None and isinstance(text, str) and isinstance(request_id, (int, float)):
            self._guard(service.accept, int(request_id), clean_text(text))

    def cancel(self) -> None:
        with self._lock:
            self._pending_request = None
            service = self._service
        if service is not None:
            self._guard(service.cancel)

    def add_chunk(self, text: Any, filename: Any) -> None:
        if not isinstance(text, str):
            return
        text = clean_text(text)
        filename = clean_text(filename) if isinstance(filename, str) else ""
        if self._debug:
            log.debug("chunk from %s: %r", filename, text)
        with self._lock:
            service = self._service
            if service is None:
                self._pending_chunks.append((text, filename))
                del self._pending_chunks[:-64]
                return
        self._guard(service.add_chunk, text, filename)

    def prime(self) -> None:
        service = self._running()
        if service is not None:
            self._guard(service.prime)

    def status(self) -> dict:
        """The service's status; "error": why it is unusable (None when it works),
        "last_error": {"message", "time"} of the newest failure (the service's or this
        bridge's own: a start that failed, a call that raised); "pid", "rss_bytes": this
        host process (:RwkvStatus)."""
        service = self._running()
        if service is None:
            return plain({"loaded": False, "starting": self._starting, "error": self._error,
                          "model": (self._options or {}).get("model"), "last_error": self._last_error,
                          **host_process()})
        try:
            st = dict(service.status())
        except Exception as exc:
            return {"loaded": False, "error": one_line(exc), "last_error": self._last_error, **host_process()}
        st.update(host_process())
        if st.get("error") is None and self._error:
            st["error"] = self._error
        mine, theirs = self._last_error, st.get("last_error")
        if mine and (not isinstance(theirs, dict) or mine.get("time", 0) > theirs.get("time", 0)):
            st["last_error"] = mine
        return plain(st)

    def download(self, name: Any) -> None:
        threading.Thread(target=self._download_thread, args=(str(name),),
                         name="rwkv-download", daemon=True).start()

    def _download_thread(self, name: str) -> None:
        try:
            import_engine()
            from rwkv_engine.core.download import DownloadError, download
        except Exception as exc:
            self.event("download", {"ok": False, "message": f"download unavailable: {one_line(exc)}"})
            return
        try:
            path = download(name, local_dir=(self._options or {}).get("download_dir"), progress=False)
        except DownloadError as exc:
            self.event("download", {"ok": False, "message": f"download of {name} failed: {one_line(exc)}"})
        except Exception as exc:  # a bug or an unexpected failure: still one line
            log.exception("download failed")
            self.event("download", {"ok": False, "message": f"download of {name} failed: {one_line(exc)}"})
        else:
            self.event("download", {"ok": True,
                                    "message": f"downloaded {name} to {path} (use it with engine.model = {name!r})"})

    def close(self) -> None:
        logging.getLogger("rwkv_engine").removeHandler(self._forwarder)
        with self._lock:
            service, self._service = self._service, None
        if service is not None:
            try:
                service.close()
            except Exception:
                log.debug("close failed", exc_info=True)
