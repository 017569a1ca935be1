"""``ServerBackend``: what both server protocols share (see the package docstring).

The service's interface (``backend.CompletionBackend``), the prompt (the local engine's
``PromptBuilder`` over the same ring of chunks), the stop rules, the streamed-row choice
and ranking (``candidate_rules``), reading a streamed answer, the stats, failing fast
after a failed connect and the fallback from "infill" to "plain". A subclass speaks one
protocol: where its API lives (``_api_base``), what the server runs (``_detect_server``),
the request (``_request``, ``_rwkv_prompt``), the answer's events (``_event_pieces``),
and optionally a simpler request after a refusal (``_simpler_request``) and idle work
on the server (``_warm_server``).
"""
from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from typing import Callable, List, Optional, Tuple

from ...core.tokenizer import WorldTokenizer
from ..candidate_rules import Row, StopRules, apply_text_rules, rank_candidates, stream_row
from ..config import EngineConfig
from ..context_ring import ContextRing
from ..prompt_layout import FIM_MARK, Prompt, PromptBuilder, clip_bytes, validate_request, window_split
from .http import (MAX_RESPONSE_BYTES, RETRY_AFTER_S, RemoteError, ShouldStop, _display_url, _error_message,
                   _Http, _httpx, _Superseded, _Watch, _whole_body, sse_data)

log = logging.getLogger("rwkv_engine")

HttpCall = Tuple[str, str, dict]      # (path for messages, full URL, JSON body)


class ServerBackend(ABC):
    """The service's backend over one completion server (one request at a time)."""

    option = ""                          # the ``backend`` option value this protocol answers
    primes_neighbours_when_idle = False  # a server caches the prompts it read, not neighbours

    def __init__(self, config: EngineConfig, on_warning: Optional[Callable[[str], None]] = None,
                 tokenizer=None):
        cfg = self.config = config
        self.on_warning = on_warning
        httpx = _httpx()
        try:
            url = httpx.URL(cfg.url or "")
        except Exception:
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"engine option url = {cfg.url!r}: must be an http:// or https:// address")
        self.display_url = _display_url(url)
        self.label = f"{self.option} server {self.display_url}"
        self.base = self._api_base(url, str(url.copy_with(query=None, fragment=None)).rstrip("/"))
        self.http = _Http(cfg, self.label, cfg.timeout_connect_ms, cfg.timeout_first_byte_ms)
        self.tokenizer = tokenizer if tokenizer is not None else WorldTokenizer.default()
        self.ring = ContextRing(cfg.ring_n_chunks, cfg.ring_chunk_size, cfg.ring_queue)
        # no token healing: servers cannot constrain the first tokens to the healed text, so
        # the prompt keeps every token up to the cursor (:checkhealth says so)
        self.builder = PromptBuilder(cfg, self.tokenizer, heal=False)
        self.server: Optional[dict] = None       # what detect found out (model, slots, fim, ids)
        self.last_stats: dict = {}
        self.last_prime: dict = {}
        self._down: Optional[Tuple[float, str]] = None   # (until, message) after a failed connect
        self._last: Optional[dict] = None         # the last request (prime_step warms its prompt)
        self._warmed: Optional[tuple] = None      # token ids of the last prompt the server read
        self._totals = {"requests": 0, "reused_tokens": 0, "prefilled_tokens": 0, "errors": 0}

    # -- the protocol's part -----------------------------------------------------------------
    @abstractmethod
    def _api_base(self, url, base: str) -> str:
        """The address the API paths go after: ``base`` is the configured ``url`` (httpx.URL)
        without query, fragment and trailing "/"."""

    @abstractmethod
    def _detect_server(self) -> dict:
        """{"backend", "model", "slots", "fim", "ids", ...} asked of the server."""

    @abstractmethod
    def _request(self, info: dict, request: dict, prompt: Prompt, n: int, stops: List[str]) -> HttpCall:
        """The completion request for ``n`` candidates in ``info["fim"]`` mode."""

    @abstractmethod
    def _rwkv_prompt(self, prompt: Prompt):
        """The "rwkv" prompt as this protocol sends it."""

    @abstractmethod
    def _event_pieces(self, obj: dict) -> Optional[List[dict]]:
        """One event of the answer -> [{index, text, tokens, logprobs, final, reason, timings,
        usage}]; None when it is not this protocol's event."""

    def _simpler_request(self, message: str) -> bool:
        """After the HTTP error ``message`` (lower case): whether a simpler request may work
        (and is set up). Beyond the fallback to "plain", nothing by default."""
        return False

    def _warm_server(self, should_stop: ShouldStop) -> bool:
        """Idle work on the server once the ring is settled; True = it did some."""
        return False

    # -- the service's interface (backend.CompletionBackend) --------------------------------
    def warm_up(self, on_progress: Optional[Callable[[str], None]] = None) -> None:
        """Ask the server what it runs (``detect``); raises RemoteError when it does not answer."""
        self.detect()

    def describe(self) -> dict:
        return {"model": self.label, "path": self.display_url, "device": "remote", "dtype": "n/a",
                "precision": "n/a", "precision_why": "", "cpu_kernels": ""}

    def add_chunk(self, text: str, filename: str = "") -> bool:
        return self.ring.add(text, filename)

    def accept(self, request_id, text: str) -> bool:
        """Nothing to do: the next request's prompt holds the accepted text and the server's
        prompt cache resumes from the shared prefix."""
        return False

    def cache_stats(self) -> dict:
        return {"server": dict(self._totals),
                "ring": {"chunks": len(self.ring.chunks), "queued": len(self.ring.queue)},
                "line_cache": {"hits": self.builder.lines.hits, "misses": self.builder.lines.misses}}

    def build_prompt(self, request: dict) -> Prompt:
        self.ring.evict_similar(self.builder.around_cursor(request))
        return self.builder.build(request, list(self.ring.chunks))

    def close(self) -> None:
        self.http.close()

    def complete(self, request: dict, on_partial: Optional[Callable[[str], None]] = None,
                 should_stop: ShouldStop = None) -> Optional[dict]:
        """Candidates for ``request`` from the server; None when ``should_stop`` turned true."""
        t0 = time.perf_counter()
        prompt = self.build_prompt(request)           # MalformedRequest before any network
        self._fail_fast()
        try:
            out = self._complete(request, prompt, on_partial, should_stop, t0)
        except _Superseded:
            return None
        except RemoteError:
            self._totals["errors"] += 1
            raise
        self._last = _request_copy(request)
        self._warmed = tuple(prompt.tokens())        # the server has read this prompt already
        out["id"] = request.get("id")
        return out

    def prime_step(self, should_stop: ShouldStop = None) -> bool:
        """Move a queued chunk into the ring; once none is left, the protocol's idle work on
        the server (``_warm_server``). A failure here is not reported (the next request is)."""
        if self.ring.promote():
            return True
        if self._last is None:
            return False
        return self._warm_server(should_stop)

    # -- server facts ----------------------------------------------------------------------
    def detect(self, should_stop: ShouldStop = None) -> dict:
        """Model name, slot count, FIM mode and whether our token ids fit (cached)."""
        if self.server is not None:
            return self.server
        try:
            with _Watch(self.http, should_stop, None) as watch:
                try:
                    info = self._detect_server()
                except RemoteError:
                    if watch.fired == "stop":
                        raise _Superseded() from None
                    raise
        except RemoteError as e:
            self._note_failure(e)
            raise
        self.server = info
        return info

    def _fail_fast(self) -> None:
        if self._down is not None:
            until, msg = self._down
            if time.monotonic() < until:
                raise RemoteError(msg)
            self._down = None

    def _note_failure(self, e: RemoteError) -> None:
        msg = str(e)
        if any(s in msg for s in ("connection refused", "cannot resolve", "no connection within",
                                  "cannot connect", "TLS failed")):
            self._down = (time.monotonic() + RETRY_AFTER_S, msg)
            self.server = None                    # it may come back as another server / model

    def _warn(self, message: str) -> None:
        if self.on_warning is not None:
            self.on_warning(message)
        else:
            log.warning("rwkv.nvim: %s", message)

    def _optional_json(self, path: str, payload: Optional[dict] = None):
        """GET (or POST ``payload``) ``path``; None when the server answers 4xx/5xx or
        garbage (an endpoint it does not have). Connection failures still raise."""
        url = self.base + path
        try:
            if payload is None:
                return self.http.get_json(url, path)
            return self.http.post_json(url, path, payload)
        except RemoteError as e:
            if " HTTP " in f" {e}" or "malformed answer" in str(e):
                return None
            raise

    # -- one request -----------------------------------------------------------------------
    def _complete(self, request, prompt: Prompt, on_partial, should_stop, t0) -> Optional[dict]:
        cfg = self.config
        info = self.detect(should_stop)
        single_line = bool(prompt.line_suffix.strip())
        rules = StopRules(max_tokens=cfg.max_tokens, max_lines=1 if single_line else cfg.max_lines,
                          stop_strings=list(cfg.stop), indent=prompt.indent,
                          blank_line_ends_block=prompt.indent == 0, deadline=None)
        stops = list(cfg.stop) + (["\n"] if single_line else []) + [FIM_MARK]   # G1 ends FIM on "✿"
        n = 1 if cfg.temperature == 0 else cfg.candidates   # greedy rows would all be equal
        for _ in range(3):                         # a refused optional field: drop it, once each
            path, url, payload = self._request(info, request, prompt, n, stops)
            try:
                return self._stream(path, url, payload, n, prompt, rules, on_partial, should_stop, t0, info)
            except RemoteError as e:
                if not self._adapt(info, str(e)):
                    self._note_failure(e)
                    raise
        raise RemoteError(f"{self.label}: the server refused every form of the request")

    def _adapt(self, info: dict, message: str) -> bool:
        """After an HTTP error: whether a simpler request may work (and is set up)."""
        if " HTTP " not in f" {message}":
            return False
        low = message.lower()
        if info["fim"] == "infill" and ("infill is not supported" in low or "suffix" in low
                                         or ("/infill" in message and ("404" in message or "501" in message))):
            info["fim"] = "plain"
            self._warn(f"{self.label} has no fill-in-the-middle for this model: sending the text "
                       f"before the cursor only (engine option fim)")
            return True
        return self._simpler_request(low)

    def _sampling(self, stops: List[str]) -> dict:
        cfg = self.config
        return {"temperature": cfg.temperature, "top_p": cfg.top_p,
                "presence_penalty": cfg.alpha_presence, "frequency_penalty": cfg.alpha_frequency,
                "stop": stops, "seed": cfg.seed, "stream": True}

    def _texts(self, request: dict, prompt: Prompt) -> Tuple[str, str, str]:
        """(lines above the cursor, cursor line up to the cursor, text after the cursor) for
        the "infill" and "plain" modes: the same window as the RWKV prompt."""
        cfg = self.config
        validate_request(request)
        lines, first, row = request["lines"], request["first"], request["row"]
        start, _ = window_split(first, row, cfg.n_prefix, cfg.near_prefix)
        above = "".join(clip_bytes(ln, cfg.max_line_bytes) + "\n" for ln in lines[start - first: row - first])
        below = lines[row - first + 1: row - first + 1 + cfg.n_suffix]
        after = prompt.line_suffix + "\n" + "".join(clip_bytes(ln, cfg.max_line_bytes) + "\n" for ln in below)
        return above, prompt.line_prefix, after

    def _stream(self, path, url, payload, n, prompt, rules, on_partial, should_stop, t0, info):
        cfg = self.config
        n = payload.get("n_cmpl", payload.get("n", n))
        rows = [Row() for _ in range(n)]
        active = [False] * n                        # the server sent something for this row
        final = [False] * n                         # ... and said it is finished
        shown, streamed = None, None
        timings: dict = {}
        usage: dict = {}
        t_first = None
        done_marker = False                         # OpenAI's "data: [DONE]"
        total_deadline = time.monotonic() + cfg.timeout_total_ms / 1000
        if log.isEnabledFor(logging.DEBUG):         # sizes only: buffer text is never logged
            log.debug("rwkv.nvim: %s %s (fim %s, %d candidates, prompt %d tokens)", self.label, path,
                      info["fim"], n, prompt.n_tokens)
        with _Watch(self.http, should_stop, total_deadline) as watch:
            resp = None
            try:
                try:
                    resp = self.http.open("POST", url, path, payload)
                except RemoteError:
                    if watch.fired == "stop":
                        raise _Superseded() from None
                    if watch.fired == "deadline":
                        raise RemoteError(f"{self.label}: no answer from {path} within "
                                          f"{cfg.timeout_total_ms} ms (timeout_total_ms)") from None
                    raise
                ctype = resp.headers.get("content-type", "")
                events = (sse_data(resp.iter_bytes()) if "event-stream" in ctype
                          else _whole_body(resp.iter_bytes()))
                for data in events:
                    if watch.check() == "stop":
                        raise _Superseded()
                    if t_first is None:             # llama-server sends its headers at once and
                        t_first = time.perf_counter()   # the first event after reading the prompt
                        watch.deadline = min(total_deadline, time.monotonic() + cfg.time_budget_ms / 1000)
                    if data.strip() == "[DONE]":
                        done_marker = True
                        break
                    try:
                        obj = json.loads(data)
                    except ValueError:
                        raise RemoteError(f"{self.label}: malformed answer from {path} "
                                          f"(an event is not JSON)") from None
                    for piece in self._pieces(obj, path):
                        if piece.get("usage"):
                            usage = piece["usage"]
                        i = piece.get("index", -1)
                        if not 0 <= i < n:
                            continue
                        active[i] = True
                        final[i] = final[i] or bool(piece.get("final"))
                        if piece.get("timings") and (i == 0 or not timings):
                            timings = piece["timings"]
                        row = rows[i]
                        if row.done:
                            continue
                        row.tokens.extend(piece.get("tokens") or [])
                        row.logprobs.extend(piece.get("logprobs") or [])
                        row.raw += piece.get("text") or ""
                        row.text, reason = apply_text_rules(row.raw, rules)
                        if not reason and piece.get("final"):
                            reason = piece.get("reason") or "eos"
                        if reason:
                            row.done, row.reason = True, reason
                    if on_partial is not None:
                        streamed = stream_row(rows, streamed, shown, prompt.after_lines)
                        if streamed is not None and rows[streamed].text != shown:
                            shown = rows[streamed].text
                            on_partial(shown)
                    if watch.check() == "deadline" or (all(r.done for r in rows) and not all(final)):
                        break                       # closing the stream stops the server too
                    # (when the server finished every row, read on: usage and [DONE] follow)
            except OverflowError:
                raise RemoteError(f"{self.label}: answer from {path} larger than "
                                  f"{MAX_RESPONSE_BYTES >> 20} MB; stopped reading") from None
            except self.http.httpx.HTTPError as e:
                if watch.fired == "stop":
                    raise _Superseded() from None
                if watch.fired != "deadline":
                    raise self.http.describe(e, path, answered=t_first is not None) from None
            finally:
                if resp is not None:
                    resp.close()
        if watch.fired == "stop" or (should_stop is not None and should_stop()):
            raise _Superseded()
        timed_out = watch.fired == "deadline"
        if timed_out and not any(active):           # the total timeout, before any piece
            raise RemoteError(f"{self.label}: no answer from {path} within {cfg.timeout_total_ms} ms "
                              f"(timeout_total_ms)")
        if not timed_out and not done_marker and (not any(active) or any(
                a and not r.done for a, r in zip(active, rows))):
            raise RemoteError(f"{self.label}: the answer from {path} ended early (truncated stream)")
        for r, a in zip(rows, active):
            if not r.done:
                r.done, r.reason = True, ("time" if timed_out else "stop" if a else "none")
        if streamed is not None:
            rows[streamed].streamed = True
        ranked = rank_candidates(rows, prompt.after_lines)
        t2 = time.perf_counter()
        return self._result(rows, ranked, prompt, info, timings, usage, t0, t_first or t2, t2)

    def _pieces(self, obj, path: str) -> List[dict]:
        """One event (or a non-streamed answer, maybe a list of them) -> its pieces;
        {"error": ...} in a stream is the server's error."""
        if isinstance(obj, list):
            out = []
            for x in obj:
                out.extend(self._pieces(x, path))
            return out
        if isinstance(obj, dict) and obj.get("error"):
            msg = _error_message(json.dumps(obj).encode())
            raise RemoteError(f"{self.label}: error from {path}: {msg}")
        pieces = self._event_pieces(obj) if isinstance(obj, dict) else None
        if pieces is None:
            raise RemoteError(f"{self.label}: malformed answer from {path} (unexpected JSON)")
        return pieces

    def _result(self, rows, ranked, prompt, info, timings, usage, t0, t_first, t2) -> dict:
        cached = timings.get("cache_n")
        fed = timings.get("prompt_n")
        if cached is None and usage:
            cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
            fed = max(0, int(usage.get("prompt_tokens") or 0) - cached) if usage.get("prompt_tokens") else None
        server_ms = None
        if timings:
            server_ms = round(float(timings.get("prompt_ms") or 0) + float(timings.get("predicted_ms") or 0), 2)
        decoded = sum(len(r.tokens) or len(r.logprobs) for r in rows)
        if not decoded and usage.get("completion_tokens"):
            decoded = int(usage["completion_tokens"])
        reused = int(cached or 0)
        stats = {
            "reused_tokens": reused, "prefilled_tokens": int(fed if fed is not None else prompt.n_tokens),
            "decoded_tokens": decoded,
            "ms_prefill": round((t_first - t0) * 1000, 2), "ms_decode": round((t2 - t_first) * 1000, 2),
            "ms_total": round((t2 - t0) * 1000, 2), "candidates": len(ranked),
            "cache_hits": {"device": int(reused > 0), "host": 0, "disk": 0, "miss": int(reused == 0)},
            "prompt_tokens": (reused + int(fed)) if fed is not None else prompt.n_tokens,
            "fim": prompt.fim if info["fim"] == "rwkv" else info["fim"] == "infill",
            "speculative": False, "stop_reasons": [r.reason for r in rows],
            "backend": self.option, "server_ms": server_ms, "fim_mode": info["fim"],
        }
        self._totals["requests"] += 1
        self._totals["reused_tokens"] += reused
        self._totals["prefilled_tokens"] += stats["prefilled_tokens"]
        self.last_stats = stats
        return {"id": None,
                "candidates": [{"text": c["text"], "logprob": round(c["logprob"], 4)
                                if c["logprob"] != float("-inf") else -1e9} for c in ranked],
                "stats": stats}


def _request_copy(req: dict) -> dict:
    keep = ("id", "buf", "filename", "lines", "first", "row", "col")
    return {k: (list(req[k]) if k == "lines" else req[k]) for k in keep if k in req}
