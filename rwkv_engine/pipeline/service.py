"""Completion service: one worker thread owns the model; the latest request wins.

The Neovim plugin (and anything else) talks to ``CompletionService`` from its own
thread; every method except ``close`` returns at once. The worker thread

* loads the model (events "loading", then "ready" or "error"; "progress" while a
  kernel builds; "warning" for a fallback: no CUDA -> CPU, kernel -> reference,
  out of memory -> fewer candidates or the CPU),
* runs the newest submitted request; an older one stops between prefill pieces or
  decode steps and calls nothing (it is *superseded*),
* applies queued chunks and accepts between requests,
* does idle priming (``prime()``) only while no request is waiting; a request that
  arrives during priming waits for at most one prefill piece; if priming fails it is
  switched off for this service with one "warning".

The backend (``backend.CompletionBackend``: the local engine or a server) is built by
the kind ``backend.backend_kind(config)`` picks; the service never asks which one it runs.

Failures: a malformed request (``MalformedRequest``, the caller's fault) only gets
its one-line message in the result's "error". Every other exception while serving is
an engine failure: logged with its traceback, emitted as an "error" event, kept as
``status()["last_error"]`` ({"message", "time"}: epoch seconds) and returned in the
result's "error".

Callbacks (``on_partial``, ``on_done``, ``on_event``) run on the worker thread.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Callable, List, Optional, Tuple

from ..core.checkpoint import CheckpointError
from ..core.errors import ExplainedError, one_line
from .backend import CompletionBackend, SwitchesModel, backend_kind
from .config import EngineConfig
from .prompt_layout import MalformedRequest

log = logging.getLogger("rwkv_engine")

Callback = Optional[Callable[[dict], None]]
IDLE_BEFORE_MEASURING_S = 1.0     # the background CPU measurement steps only after this much quiet


class CompletionService:
    def __init__(self, config: Optional[EngineConfig] = None,
                 on_event: Optional[Callable[[str, dict], None]] = None, model=None):
        """``model``: an already loaded model to use instead of loading ``config.model``."""
        self.config = config if config is not None else EngineConfig()
        self.on_event = on_event
        self._model = model
        self._cv = threading.Condition()
        self._generation = 0                  # bumped by submit/cancel/close: older work stops
        self._pending: Optional[Tuple[int, int, dict, Callback, Callback]] = None
        self._chunks: List[Tuple[str, str]] = []
        self._accepts: List[Tuple[int, str]] = []
        self._prime_wanted = False
        self._prime_at: Optional[float] = None     # monotonic time idle priming starts by itself
        self._prime_failed: Optional[str] = None   # priming raised once: it stays off
        self._closing = False
        self._thread: Optional[threading.Thread] = None
        self._completer: Optional[CompletionBackend] = None
        self._ready_after: Optional[float] = None   # load start of a backend whose server did not answer yet
        self._swap = None                     # a model measured faster on this CPU, to switch to
        self._measuring: Optional[threading.Thread] = None     # the background CPU measurement
        self._last_request_end = 0.0          # monotonic; the background measurement waits after it
        self._ids = itertools.count(1)
        self._status = {"loaded": False, "model": self.config.model or "default", "device": "",
                        "dtype": "", "precision": "", "precision_why": "", "cpu_kernels": "",
                        "error": None, "cache": {}, "last": {},
                        "last_error": None}     # {"message", "time"} of the last engine failure
        # request accounting (status()["load"]): at most one request computes at a time
        self._counts = {"submitted": 0, "finished": 0, "superseded": 0, "running": 0, "max_running": 0}

    # -- caller side ----------------------------------------------------------------------
    def start(self) -> None:
        with self._cv:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="rwkv-engine", daemon=True)
        self._thread.start()

    def submit(self, request: dict, on_partial: Callback = None, on_done: Callback = None) -> int:
        """Queue ``request`` (replacing any older one); returns its id."""
        rid = request.get("id")
        if rid is None:
            rid = next(self._ids)
            request = dict(request, id=rid)
        with self._cv:
            self._generation += 1
            self._counts["submitted"] += 1
            if self._pending is not None:
                self._counts["superseded"] += 1
            self._pending = (self._generation, rid, request, on_partial, on_done)
            self._prime_at = None           # re-armed when this request has finished
            self._cv.notify_all()
        return rid

    def add_chunk(self, text: str, filename: str = "") -> None:
        with self._cv:
            self._chunks.append((text, filename))
            self._cv.notify_all()

    def prime(self) -> None:
        with self._cv:
            if self._prime_failed is not None:     # reported once already; requests still run
                return
            self._prime_wanted = True
            self._cv.notify_all()

    def accept(self, request_id: int, text: str) -> None:
        with self._cv:
            self._accepts.append((request_id, text))
            self._cv.notify_all()

    def cancel(self) -> None:
        with self._cv:
            self._generation += 1
            if self._pending is not None:
                self._counts["superseded"] += 1
            self._pending = None

    def status(self) -> dict:
        with self._cv:
            s = dict(self._status)
            s["cache"] = dict(s["cache"])
            s["last"] = dict(s["last"])
            s["last_error"] = dict(s["last_error"]) if s["last_error"] else None
            s["load"] = dict(self._counts)
            s["busy"] = self._pending is not None or self._counts["running"] > 0
        return s

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._closing = True
            self._generation += 1
            self._pending = None
            self._cv.notify_all()
            thread, measuring = self._thread, self._measuring
        end = time.monotonic() + timeout
        for t in (thread, measuring):     # the measurement stops at its next step (< 1 s)
            if t is not None and t is not threading.current_thread():
                t.join(max(0.0, end - time.monotonic()))

    # -- worker side ----------------------------------------------------------------------
    def _emit(self, kind: str, info: dict) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, info)
            except Exception:                         # a broken listener must not kill the worker
                log.exception("rwkv.nvim: on_event(%s) failed", kind)

    def _failed(self, error: BaseException, what: str, traceback: Optional[bool] = None) -> str:
        """An engine failure: logged (with its traceback unless ``traceback`` is False or, by
        default, its message explains it all: ``ExplainedError``), kept as
        status()["last_error"], emitted as one "error" event. Returns the one-line message."""
        msg = one_line(error)
        if traceback is None:
            traceback = not isinstance(error, ExplainedError)
        log.error("rwkv.nvim: %s failed: %s", what, msg, exc_info=error if traceback else None)
        with self._cv:
            self._status["last_error"] = {"message": msg, "time": time.time()}
        self._emit("error", {"message": msg})
        return msg

    def _load(self) -> None:
        kind = backend_kind(self.config)                # the one place that looks at the option
        name = kind.loading_label(self.config)          # "g1-0.1b", "llama.cpp server"
        self._emit("loading", {"model": name})
        t0 = time.perf_counter()
        try:
            self._completer = kind.build(self.config, self._warning, self._model)
        except Exception as e:                          # CheckpointError, RuntimeError, OSError...
            with self._cv:
                self._status["error"] = one_line(e)
            # an unusable model file is the user's to fix: its message says it all
            self._failed(e, f"loading {name}", traceback=not isinstance(e, CheckpointError))
            return
        about = self._completer.describe()
        name = about["model"]                           # "llama.cpp server http://host:port"
        with self._cv:
            self._status.update(model=name, device=about["device"])
        if not self._warmed_up(name, t0):
            return                                      # "ready" comes with its first answer
        self._ready(t0)
        c = self._completer
        if isinstance(c, SwitchesModel) and (getattr(c.model, "precision", None) or {}).get("pending"):
            self._measuring = threading.Thread(target=self._precision_in_background, name="rwkv-precision",
                                               daemon=True)
            self._measuring.start()

    def _warmed_up(self, name: str, t0: float) -> bool:
        """``warm_up`` (the kernel built, the server asked what it runs). When it raises (a
        server that does not answer: refused, DNS, TLS, timeout) the status says why and the
        first request it answers makes the service "ready"."""
        try:
            self._completer.warm_up(on_progress=lambda msg: self._emit("progress", {"message": msg}))
            return True
        except Exception as e:
            with self._cv:
                self._status.update(loaded=False, error=one_line(e))
            self._ready_after = t0
            self._failed(e, f"connecting to {name}")
            return False

    def _ready(self, t0: float) -> None:
        about = self._completer.describe()
        info = {"model": about["model"], "path": about["path"], "device": about["device"],
                "dtype": about["dtype"], "precision": about["precision"],
                "load_ms": round((time.perf_counter() - t0) * 1000, 1)}
        with self._cv:
            self._status.update(loaded=True, device=about["device"], dtype=about["dtype"], error=None,
                                path=about["path"], precision=about["precision"],
                                precision_why=about["precision_why"], cpu_kernels=about["cpu_kernels"],
                                cache=self._completer.cache_stats())
        self._emit("ready", info)

    def _describe_status(self) -> None:
        """Device, dtype and precision as the backend says now (a CPU fallback, a switched model)."""
        about = self._completer.describe()
        with self._cv:
            self._status.update({k: about[k] for k in ("device", "dtype", "precision", "precision_why",
                                                       "cpu_kernels")})

    # -- CPU precision, measured while the editor is idle ---------------------------------
    def _precision_in_background(self) -> None:
        """``dtype = "auto"`` on a CPU without a cached verdict, or a model not yet checked
        in the mode this CPU's verdict picked: the model serves in fp32 (safe everywhere)
        while this thread measures the CPU (``core.cpu_precision``, ~10-20 s of CPU), then
        checks the picked lossy mode on this model (``core.model_precision``, ~1 s at
        0.1B), stepping only while no request waits or runs and none finished within
        ``IDLE_BEFORE_MEASURING_S``; then the worker switches to the chosen mode between
        requests (``_swap``), or keeps fp32 when this model fails the gate. Status says
        "measuring this CPU" / "checking this model ... in the background" until then."""
        from ..core.cpu_precision import MeasurementStopped
        from .loading import cpu_precision_for, load_configured_model, resolve_cpu_precision

        def pause() -> None:
            with self._cv:
                while True:
                    if self._closing:
                        raise MeasurementStopped("the engine is closing")
                    busy = self._pending is not None or self._counts["running"] > 0
                    quiet = time.monotonic() - self._last_request_end
                    if not busy and quiet >= IDLE_BEFORE_MEASURING_S:
                        return
                    self._cv.wait(IDLE_BEFORE_MEASURING_S if busy else IDLE_BEFORE_MEASURING_S - quiet)

        try:
            path = getattr(self._completer.model, "path", None)
            resolve_cpu_precision(self.config, path, pause=pause)          # this CPU's verdict, cached
            current = self._completer.model
            mode, record = cpu_precision_for(self.config, path, measure_now=False)
            if record.get("pending"):                # a lossy pick, not checked on this model yet
                current.precision = record
                self._describe_status()              # "... checking this model in the background"
                mode, record = cpu_precision_for(self.config, path, self._warning, pause=pause)
            if mode == current.precision.get("mode"):
                current.precision = record           # fp32 stays: chosen, or this model failed the gate
                self._describe_status()
                return
            model = load_configured_model(self.config, self._warning)       # finds both cached
        except MeasurementStopped:
            return
        except Exception as e:                      # never fatal: fp32 stays, status says why
            log.warning("rwkv.nvim: background CPU precision measurement failed", exc_info=True)
            with self._cv:
                self._status["precision"] = f"fp32 (auto: not measured: {one_line(e, 80)})"
                self._status["precision_why"] = one_line(e, 160)
            return
        with self._cv:
            if not self._closing:
                self._swap = model
                self._cv.notify_all()

    def _warning(self, message: str) -> None:
        self._emit("warning", {"message": message})

    def _run(self) -> None:
        try:
            self._load()
        except Exception as e:                          # never leave the caller waiting silently
            with self._cv:
                self._status["error"] = one_line(e)
            self._failed(e, "engine start")
        while True:
            with self._cv:
                while not (self._closing or self._pending or self._chunks or self._accepts or self._swap
                           or (self._prime_wanted and self._completer is not None)):
                    if self._prime_at is not None and time.monotonic() >= self._prime_at:
                        self._prime_at = None          # idle since the last suggestion: prime
                        self._prime_wanted = self._prime_failed is None
                        continue
                    self._cv.wait(None if self._prime_at is None
                                  else max(0.0, self._prime_at - time.monotonic()))
                if self._closing:
                    break
                chunks, self._chunks = self._chunks, []
                accepts, self._accepts = self._accepts, []
                job, self._pending = self._pending, None
                swap, self._swap = self._swap, None
            try:
                if swap is not None and isinstance(self._completer, SwitchesModel):
                    self._completer.switch_model(swap)       # between requests; the ring is kept
                    self._describe_status()
                    with self._cv:               # its states are cold: prime them while idle
                        self._prime_wanted = self._prime_failed is None
                self._work(chunks, accepts, job)
            except Exception as e:                      # never let the worker die silently
                self._failed(e, "engine work")
        if self._completer is not None:                 # its HTTP client, its cached states
            try:
                self._completer.close()
            except Exception as e:
                log.info("rwkv.nvim: closing the backend: %s", one_line(e))

    def _work(self, chunks, accepts, job) -> None:
        c = self._completer
        if c is None:
            if job is not None:
                _, rid, _, _, on_done = job
                with self._cv:
                    self._counts["finished"] += 1
                if on_done is not None:
                    on_done({"id": rid, "candidates": [], "stats": {}, "error": self._status["error"]})
            with self._cv:
                self._prime_wanted = False
            return
        for text, filename in chunks:
            c.add_chunk(text, filename)
        for rid, text in accepts:
            c.accept(rid, text)
        if job is not None:
            self._run_request(c, job)
        elif self._prime_wanted:
            self._prime(c)

    def _run_request(self, c, job) -> None:
        gen, rid, request, on_partial, on_done = job

        def superseded() -> bool:
            return self._generation != gen or self._closing

        def partial(text: str) -> None:
            if on_partial is not None and not superseded():
                on_partial({"id": rid, "text": text})

        with self._cv:
            self._counts["running"] += 1
            self._counts["max_running"] = max(self._counts["max_running"], self._counts["running"])
        try:
            result = self._complete(c, rid, request, partial, superseded)
        finally:
            with self._cv:
                self._counts["running"] -= 1
                self._last_request_end = time.monotonic()
                self._cv.notify_all()
        if result is None or superseded():
            with self._cv:
                self._counts["superseded"] += 1
            return
        result["id"] = rid
        with self._cv:
            self._counts["finished"] += 1
            if result.get("stats"):
                self._status["last"] = result["stats"]
            self._status["cache"] = c.cache_stats()
        self._describe_status()                         # the CPU after running out of GPU memory
        if self.config.prime_after_ms > 0 and self._prime_failed is None and c.primes_neighbours_when_idle:
            with self._cv:              # prime the neighbouring lines once the editor is idle
                self._prime_at = time.monotonic() + self.config.prime_after_ms / 1000
        if self._ready_after is not None and not result.get("error"):
            t0, self._ready_after = self._ready_after, None
            self._ready(t0)                             # the server answered at last
        if on_done is not None:
            on_done(result)

    def _complete(self, c, rid, request, partial, superseded) -> Optional[dict]:
        try:
            return c.complete(request, on_partial=partial, should_stop=superseded)
        except MalformedRequest as e:                   # the caller's fault: only the result says so
            log.info("rwkv.nvim: malformed request %s: %s", rid, one_line(e))
            return {"id": rid, "candidates": [], "stats": {}, "error": one_line(e)}
        except Exception as e:                          # engine failure: CheckpointError, tokenizer, OOM, ...
            return {"id": rid, "candidates": [], "stats": {}, "error": self._failed(e, f"request {rid}")}

    def _prime(self, c) -> None:
        def interrupted() -> bool:
            return self._pending is not None or self._closing or bool(self._chunks)

        while not interrupted():
            try:
                more = c.prime_step(should_stop=interrupted)
            except Exception as e:
                # out of memory was already handled (Completer's memory policy); anything
                # else would fail again on every idle pass: priming goes off for good with
                # one warning (the worker loop would otherwise spin on _prime_wanted)
                msg = one_line(e)
                log.error("rwkv.nvim: idle priming failed: %s", msg, exc_info=e)
                with self._cv:
                    self._prime_wanted = False
                    self._prime_failed = msg
                    self._status["last_error"] = {"message": f"idle priming: {msg}", "time": time.time()}
                self._emit("warning", {"message": f"idle priming stopped: {msg}"})
                break
            if not more:
                with self._cv:
                    self._prime_wanted = False
                break
        with self._cv:
            self._status["cache"] = c.cache_stats()

