"""Remote backend: the same requests, answered by an existing inference server.

``RemoteCompleter`` has the interface of ``completer.Completer`` (complete, accept,
add_chunk, prime_step, cache_stats, build_prompt) and is what ``service`` runs when
``EngineConfig.backend`` is not "local". It loads no model: the prompt is built by the
same ``PromptBuilder`` (the RWKV World tokenizer only) and sent over HTTP (httpx) to

* ``"llama.cpp"``: llama-server. RWKV models get the local engine's suffix-first FIM
  prompt on ``/completion`` (as token ids when the server's vocabulary is ours, which
  ``/tokenize`` tells; else the start token plus the text); models with FIM tokens get
  ``/infill`` (``input_extra`` = ring chunks, ``input_prefix``, ``input_suffix``,
  ``prompt`` = the cursor line up to the cursor). Candidates come from ``n_cmpl`` (the
  prompt is read once and its state copied, at most the server's slot count), streamed
  with ``timings_per_token`` (cache_n / prompt_n even when the stream is cut short);
  ``cache_prompt`` lets the server resume from its saved state of the shared prefix (for
  a recurrent model llama-server keeps states 4 and 4 + n_ubatch tokens before the end of
  each prompt, so a keystroke on the cursor line costs it about 5 tokens).
* ``"openai"``: an OpenAI-compatible ``/v1/completions`` (vLLM, SGLang, Ollama, ...):
  ``prompt`` (+ ``suffix`` in "infill" mode), ``n`` candidates, SSE streaming; an optional
  field the server refuses (suffix, logprobs, stream_options, top_k, seed) is dropped
  once and the request repeated.

The prompt puts what changes least first (ring chunks, far prefix) and the cursor line
last, so a server's prefix cache is reused between keystrokes.

Streamed text goes through the local engine's stop rules and ranking
(``candidates.apply_text_rules`` / ``rank_candidates``): the same candidates a local
decode of the same tokens would give. The stream is closed as soon as every candidate
stopped, the decode budget (``time_budget_ms`` after the first streamed piece: llama-server
sends its headers before it reads the prompt) or
``timeout_total_ms`` ran out, or ``should_stop()`` says the request was superseded: a
helper thread polls ``should_stop`` every few ms and shuts the socket down, so even a
read blocked on a slow server returns at once (and the server sees the disconnect and
stops generating).

Failures raise :class:`RemoteError`: one line that names the server, the same text for
the same failure (the editor notifies each distinct message once). After a failure to
connect, requests fail at once with that message for ``RETRY_AFTER_S`` seconds instead
of waiting on the network at every keystroke. Request bodies (buffer text) are never
logged; the API key is read from the environment variable ``api_key_env`` names.

``probe(config)`` is the ``:checkhealth`` check (reachability, model, FIM mode).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from ..core.errors import one_line
from ..core.tokenizer import WorldTokenizer
from .config import EngineConfig
from .context_ring import ContextRing
from .prompt_layout import Prompt, PromptBuilder, clip_bytes, validate_request, window_split

log = logging.getLogger("rwkv_engine")

MAX_RESPONSE_BYTES = 4 << 20     # a completion stream is ~100 KB; stop reading beyond this
MAX_ERROR_BYTES = 16 << 10       # of an error body
RETRY_AFTER_S = 2.0              # after a failed connect, fail fast this long
WATCH_POLL_S = 0.005             # should_stop / deadline polling while blocked on the network
RWKV_VOCAB_TYPE = 5              # llama.cpp's LLAMA_VOCAB_TYPE_RWKV (/v1/models "meta")
TOKENIZE_PROBE = "✿prefix✿✿suffix✿\n    return x\n✿middle✿"

ShouldStop = Optional[Callable[[], bool]]


class RemoteError(RuntimeError):
    """A remote request failed; the message is one line naming the server."""


class _Superseded(Exception):
    """should_stop() turned true while the request was on the network."""


def _httpx():
    try:
        import httpx
    except ImportError as e:                       # pragma: no cover - a dependency
        raise RemoteError(f"the remote backend needs httpx ({one_line(e)}): pip install 'httpx>=0.24'") from None
    return httpx


# -- Server-Sent Events -----------------------------------------------------------------
def sse_data(chunks: Iterable[bytes], max_bytes: int = MAX_RESPONSE_BYTES) -> Iterator[str]:
    """The ``data`` of each Server-Sent Event in a byte stream (the WHATWG rules, minus
    ``event``/``id``/``retry``, which no completion server needs): lines end in \\n, \\r\\n or
    \\r; the ``data:`` lines of one event join with \\n; an empty line ends the event;
    ``:`` lines are comments (keep-alive pings). An unfinished event at the end of the
    stream is dropped. More than ``max_bytes`` in all raises ``OverflowError``."""
    buf, data, total = b"", [], 0
    for chunk in chunks:
        total += len(chunk)
        if total > max_bytes:
            raise OverflowError(max_bytes)
        buf += chunk
        keep_cr = buf.endswith(b"\r")               # maybe the first half of \r\n
        if keep_cr:
            buf = buf[:-1]
        lines = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        buf = lines.pop() + (b"\r" if keep_cr else b"")
        for line in lines:
            if not line:
                if data:
                    yield b"\n".join(data).decode("utf-8", "replace")
                    data = []
            elif not line.startswith(b":"):
                field, _, value = line.partition(b":")
                if field == b"data":
                    data.append(value[1:] if value.startswith(b" ") else value)


# -- HTTP ---------------------------------------------------------------------------------
def _display_url(url) -> str:
    """scheme://host[:port][/path] of an httpx.URL, without credentials or query."""
    port = f":{url.port}" if url.port else ""
    return f"{url.scheme}://{url.host}{port}{url.path.rstrip('/')}"


class _Http:
    """One httpx client (one connection: the worker sends one request at a time) that
    turns every failure into a one-line RemoteError and can abort the request in flight
    from another thread (``abort``: shut the socket down; a blocked read returns)."""

    def __init__(self, config: EngineConfig, label: str, connect_ms: int, read_ms: int):
        httpx = _httpx()
        self.httpx = httpx
        self.label = label
        self.connect_ms, self.read_ms = connect_ms, read_ms
        headers = {"User-Agent": "rwkv.nvim"}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env, "")
            if not key.strip():
                raise RemoteError(f"{label}: the environment variable {config.api_key_env} "
                                  f"(engine option api_key_env) is not set")
            headers["Authorization"] = f"Bearer {key.strip()}"
        self.client = httpx.Client(
            headers=headers, follow_redirects=False, verify=True,
            timeout=httpx.Timeout(connect=connect_ms / 1000, read=read_ms / 1000,
                                  write=max(connect_ms, read_ms) / 1000, pool=connect_ms / 1000),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
        self._sock: Optional[socket.socket] = None      # socket of the (only) connection
        self._fresh = False                               # the request in flight connected anew
        self.watch: Optional["_Watch"] = None            # the _Watch of the request in flight
        self._lock = threading.Lock()

    def close(self) -> None:
        self.client.close()

    # socket tracking: httpcore's trace extension reports each new connection's stream
    def _trace(self, event: str, info: dict) -> None:
        if event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            self._fresh = True
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if sock is not None:
                with self._lock:
                    self._sock = sock

    def abort(self) -> None:
        with self._lock:
            sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _fail(self, what: str) -> RemoteError:
        return RemoteError(f"{self.label}: {what}")

    def describe(self, e: Exception, path: str, answered: bool) -> RemoteError:
        """The one-line RemoteError for an httpx exception (stable text per kind)."""
        httpx = self.httpx
        if isinstance(e, httpx.ConnectTimeout):
            return self._fail(f"no connection within {self.connect_ms} ms")
        if isinstance(e, httpx.ReadTimeout):
            if answered:
                return self._fail(f"the answer from {path} stalled for more than {self.read_ms} ms")
            return self._fail(f"no answer from {path} within {self.read_ms} ms (timeout_first_byte_ms)")
        if isinstance(e, (httpx.WriteTimeout, httpx.PoolTimeout)):
            return self._fail(f"could not send the request within {max(self.connect_ms, self.read_ms)} ms")
        if isinstance(e, httpx.ConnectError):
            text = str(e)
            low = text.lower()
            if "refused" in low:
                return self._fail("connection refused (is the server running?)")
            if any(s in low for s in ("name or service not known", "nodename nor servname",
                                      "temporary failure in name resolution", "no address associated",
                                      "getaddrinfo failed", "name resolution")):
                return self._fail("cannot resolve the host name")
            if "certificate" in low or "ssl" in low:
                return self._fail(f"TLS failed: {one_line(text)}")
            return self._fail(f"cannot connect: {one_line(text) or type(e).__name__}")
        if isinstance(e, (httpx.RemoteProtocolError, httpx.ReadError)):
            if answered:
                return self._fail(f"the answer from {path} ended early (connection closed)")
            return self._fail(f"the connection closed before an answer from {path}")
        if isinstance(e, httpx.UnsupportedProtocol):
            return self._fail("unsupported address (use http:// or https://)")
        if isinstance(e, httpx.HTTPError):
            return self._fail(f"{type(e).__name__}: {one_line(e)}")
        return self._fail(one_line(e))

    def _status_error(self, resp, path: str) -> RemoteError:
        body = b""
        try:
            for chunk in resp.iter_bytes():
                body += chunk
                if len(body) > MAX_ERROR_BYTES:
                    break
        except self.httpx.HTTPError:
            pass
        msg = _error_message(body[:MAX_ERROR_BYTES])
        hint = ""
        if resp.status_code in (401, 403):
            hint = " (check the API key: engine option api_key_env)"
        return self._fail(f"HTTP {resp.status_code} from {path}" + (f": {msg}" if msg else "") + hint)

    def open(self, method: str, url: str, path: str, payload: Optional[dict], timeout_read_ms: int = 0):
        """Send a request; returns the streaming response (status < 400) or raises RemoteError.

        A kept-alive connection that the server closed just as the request went out (it
        fails before any answer) is retried once on a new connection, unless the failure
        was our own abort (the _Watch in charge fired)."""
        httpx = self.httpx
        ext = {"trace": self._trace}
        if timeout_read_ms:
            ext["timeout"] = {"connect": self.connect_ms / 1000, "read": timeout_read_ms / 1000,
                              "write": self.connect_ms / 1000, "pool": self.connect_ms / 1000}
        for attempt in (0, 1):
            self._fresh = False                       # _trace: a new connection was made
            try:
                req = self.client.build_request(method, url, json=payload, extensions=ext)
                resp = self.client.send(req, stream=True)
                break
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
                watch = self.watch
                if attempt == 0 and not self._fresh and not (watch is not None and watch.fired):
                    log.debug("rwkv.nvim: %s: a kept-alive connection was closed (%s); retrying",
                              self.label, type(e).__name__)
                    continue
                raise self.describe(e, path, answered=False) from None
            except httpx.HTTPError as e:
                raise self.describe(e, path, answered=False) from None
        stream = resp.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            with self._lock:
                self._sock = sock
        if resp.status_code >= 400:
            try:
                raise self._status_error(resp, path)
            finally:
                resp.close()
        return resp

    def get_json(self, url: str, path: str, timeout_ms: int = 0):
        resp = self.open("GET", url, path, None, timeout_ms)
        return self.read_json(resp, path)

    def post_json(self, url: str, path: str, payload: dict, timeout_ms: int = 0):
        resp = self.open("POST", url, path, payload, timeout_ms)
        return self.read_json(resp, path)

    def read_json(self, resp, path: str):
        body = b""
        try:
            for chunk in resp.iter_bytes():
                body += chunk
                if len(body) > MAX_RESPONSE_BYTES:
                    raise self._fail(f"answer from {path} larger than {MAX_RESPONSE_BYTES >> 20} MB; stopped reading")
        except self.httpx.HTTPError as e:
            raise self.describe(e, path, answered=True) from None
        finally:
            resp.close()
        try:
            return json.loads(body.decode("utf-8", "replace"))
        except ValueError:
            raise self._fail(f"malformed answer from {path} (not JSON)") from None


def _error_message(body: bytes) -> str:
    """The server's error text from an error body: {"error": {"message"}}, {"error": "..."},
    {"detail": ...}, {"message": ...} or the text itself; one line, at most 160 characters."""
    text = body.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        err = obj.get("error", obj.get("detail", obj.get("message")))
        if isinstance(err, dict):
            err = err.get("message") or err.get("type") or json.dumps(err)
        if isinstance(err, list) and err:
            err = err[0].get("msg", err[0]) if isinstance(err[0], dict) else err[0]
        if err is not None:
            text = str(err)
    text = " ".join(text.split())
    return text[:157] + "..." if len(text) > 160 else text


class _Watch:
    """While a request is on the network, polls ``should_stop`` and ``deadline`` on a helper
    thread; when either fires, aborts the connection so that a read blocked on the server
    returns at once. ``fired``: None, "stop" or "deadline"."""

    def __init__(self, http: _Http, should_stop: ShouldStop, deadline: Optional[float]):
        self.http, self.should_stop, self.deadline = http, should_stop, deadline
        self.fired: Optional[str] = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rwkv-remote-watch", daemon=True)

    def __enter__(self) -> "_Watch":
        self.http.watch = self
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(1.0)
        self.http.watch = None

    def check(self) -> Optional[str]:
        """Poll now (on the worker, between events)."""
        if self.fired is None:
            if self.should_stop is not None and self.should_stop():
                self.fired = "stop"
            elif self.deadline is not None and time.monotonic() >= self.deadline:
                self.fired = "deadline"
        return self.fired

    def _run(self) -> None:
        while not self._done.wait(WATCH_POLL_S):
            if self.check() is not None:
                self.http.abort()
                return


# -- the completer ----------------------------------------------------------------------------
class RemoteModel:
    """What the service reads of ``completer.model``: where it runs, no torch."""

    def __init__(self, backend: str, url: str):
        self.path = url
        self.backend = backend
        self.device = "remote"         # :RwkvStatus "device: remote", "ready on remote"
        self.dtype = "n/a"
        self.use_kernel = False
        self.tokenizer = None


class RemoteCompleter:
    """``Completer``'s interface over a llama-server or an OpenAI-compatible server."""

    def __init__(self, config: Optional[EngineConfig] = None,
                 on_warning: Optional[Callable[[str], None]] = None, tokenizer=None,
                 preload: bool = True):
        """``preload``: import the stop rules and ranking now (``candidates``, which imports
        torch: ~2 s) rather than in the first request; probe() skips it."""
        cfg = self.config = config if config is not None else EngineConfig(backend="llama.cpp",
                                                                             url="http://127.0.0.1:8080")
        if cfg.backend not in ("llama.cpp", "openai"):
            raise ValueError(f"engine option backend = {cfg.backend!r}: not a remote backend")
        self.on_warning = on_warning
        httpx = _httpx()
        try:
            url = httpx.URL(cfg.url or "")
        except Exception:
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"engine option url = {cfg.url!r}: must be an http:// or https:// address")
        self.display_url = _display_url(url)
        self.label = f"{cfg.backend} server {self.display_url}"
        base = str(url.copy_with(query=None, fragment=None)).rstrip("/")
        if cfg.backend == "openai":
            if base.endswith("/completions"):
                base = base[: -len("/completions")]
            elif not url.path.strip("/"):
                base += "/v1"
        elif base.endswith("/v1"):
            base = base[:-3]
        self.base = base
        self.http = _Http(cfg, self.label, cfg.timeout_connect_ms, cfg.timeout_first_byte_ms)
        self.model = RemoteModel(cfg.backend, self.display_url)
        self.tokenizer = tokenizer if tokenizer is not None else WorldTokenizer.default()
        self.ring = ContextRing(cfg.ring_n_chunks, cfg.ring_chunk_size, cfg.ring_queue)
        self.builder = PromptBuilder(cfg, self.tokenizer)
        self.server: Optional[dict] = None       # what _detect found out (model, slots, fim, ids)
        self.last_stats: dict = {}
        self.last_prime: dict = {}
        self._dropped: set = set()                # optional request fields the server refused
        self._down: Optional[Tuple[float, str]] = None   # (until, message) after a failed connect
        self._last: Optional[dict] = None         # the last request (prime_step warms its prompt)
        self._warmed: Optional[tuple] = None
        self._totals = {"requests": 0, "reused_tokens": 0, "prefilled_tokens": 0, "errors": 0}
        if preload:
            from . import candidates  # noqa: F401

    # -- Completer's interface -------------------------------------------------------------
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
        """Move a queued chunk into the ring; once the ring changed the last request's prompt,
        warm the server's prompt cache with the new one (llama.cpp, "rwkv" prompts: a request
        for one token with cache_prompt), so the next keystroke does not wait for the server
        to read the new chunks. A failure here is not reported (the next request will be)."""
        promoted = self.ring.promote()
        if promoted or self._last is None or self.config.backend != "llama.cpp":
            return promoted
        if self.server is None or self.server.get("fim") != "rwkv" or self._down is not None:
            return False
        try:
            prompt = self.build_prompt(self._last)
        except Exception:
            return False
        key = tuple(prompt.tokens())
        if key == self._warmed:
            return False
        t0 = time.perf_counter()
        payload = {"prompt": self._rwkv_prompt(prompt), "n_predict": 1, "cache_prompt": True,
                   "stream": False, "temperature": 0.0, "n_probs": 0}
        try:
            with _Watch(self.http, should_stop, None) as watch:
                try:
                    res = self.http.post_json(self.base + "/completion", "/completion", payload)
                except RemoteError:
                    if watch.fired:
                        return False
                    raise
        except RemoteError as e:
            log.debug("rwkv.nvim: warming the server cache failed: %s", e)
            self._warmed = key                    # do not retry the same prompt at every idle pass
            return False
        self._warmed = key
        timings = (res.get("timings") if isinstance(res, dict) else None) or {}
        self.last_prime = {"what": "request", "done": True, "reused_tokens": timings.get("cache_n"),
                           "prefilled_tokens": timings.get("prompt_n"),
                           "ms": round((time.perf_counter() - t0) * 1000, 2)}
        return True

    # -- server facts ----------------------------------------------------------------------
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

    def detect(self, should_stop: ShouldStop = None) -> dict:
        """Model name, slot count, FIM mode and whether our token ids fit (cached)."""
        if self.server is not None:
            return self.server
        try:
            with _Watch(self.http, should_stop, None) as watch:
                try:
                    info = (self._detect_llama_cpp() if self.config.backend == "llama.cpp"
                            else self._detect_openai())
                except RemoteError:
                    if watch.fired == "stop":
                        raise _Superseded() from None
                    raise
        except RemoteError as e:
            self._note_failure(e)
            raise
        self.server = info
        return info

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

    def _detect_llama_cpp(self) -> dict:
        cfg = self.config
        props = self._optional_json("/props") or {}
        models = self._optional_json("/v1/models") or {}
        entry = (models.get("data") or [{}])[0] if isinstance(models, dict) else {}
        meta = (entry.get("meta") if isinstance(entry, dict) else None) or {}
        name = (cfg.remote_model or props.get("model_alias") or entry.get("id")
                or os.path.basename(str(props.get("model_path") or "")) or "?")
        slots = props.get("total_slots")
        info = {"backend": "llama.cpp", "model": name,
                "slots": int(slots) if isinstance(slots, int) and slots > 0 else 1,
                "vocab_type": meta.get("vocab_type"), "n_ctx": meta.get("n_ctx"), "ids": False}
        rwkv = meta.get("vocab_type") == RWKV_VOCAB_TYPE
        fim = cfg.fim if cfg.fim != "auto" else ("rwkv" if rwkv else "infill")
        info["fim"] = fim
        if fim == "rwkv":
            tok = self._optional_json("/tokenize", {"content": TOKENIZE_PROBE}) or {}
            info["ids"] = tok.get("tokens") == self.tokenizer.encode(TOKENIZE_PROBE)
        return info

    def _detect_openai(self) -> dict:
        cfg = self.config
        models = self._optional_json("/models") or {}
        data = models.get("data") if isinstance(models, dict) else None
        entries = [m for m in data or [] if isinstance(m, dict) and m.get("id")]
        ids = [m["id"] for m in entries]
        name = cfg.remote_model or (ids[0] if ids else None)
        entry = next((m for m in entries if m["id"] == name), {})
        rwkv_vocab = (entry.get("meta") or {}).get("vocab_type") == RWKV_VOCAB_TYPE   # llama-server's /v1
        fim = cfg.fim
        if fim == "auto":
            fim = "rwkv" if rwkv_vocab or (name and "rwkv" in name.lower()) else "infill"
        return {"backend": "openai", "model": name or "?", "models": ids[:8], "slots": None,
                "fim": fim, "ids": False}

    # -- one request -----------------------------------------------------------------------
    def _complete(self, request, prompt: Prompt, on_partial, should_stop, t0) -> Optional[dict]:
        from .candidates import StopRules
        cfg = self.config
        info = self.detect(should_stop)
        single_line = bool(prompt.line_suffix.strip())
        rules = StopRules(max_tokens=cfg.max_tokens, max_lines=1 if single_line else cfg.max_lines,
                          stop_strings=list(cfg.stop), indent=prompt.indent,
                          blank_line_ends_block=prompt.indent == 0, deadline=None)
        stops = list(cfg.stop) + (["\n"] if single_line else [])
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
        if self.config.backend == "openai":
            for field in ("stream_options", "logprobs", "top_k", "seed"):
                if field in low and field not in self._dropped:
                    self._dropped.add(field)
                    return True
        return False

    def _sampling(self, stops: List[str]) -> dict:
        cfg = self.config
        return {"temperature": cfg.temperature, "top_p": cfg.top_p,
                "presence_penalty": cfg.alpha_presence, "frequency_penalty": cfg.alpha_frequency,
                "stop": stops, "seed": cfg.seed, "stream": True}

    def _rwkv_prompt(self, prompt: Prompt):
        """llama-server: the token ids (when its vocabulary is ours) or [start token, text];
        an OpenAI server: the text (its tokenizer adds what the model starts with)."""
        tokens = prompt.tokens()
        if self.server and self.server.get("ids"):
            return tokens
        start = tokens[:1] if tokens[:1] == [0] else []
        text = self.tokenizer.decode(tokens[len(start):])
        return start + [text] if start and self.config.backend == "llama.cpp" else text

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

    def _request(self, info: dict, request: dict, prompt: Prompt, n: int, stops: List[str]):
        cfg = self.config
        fim = info["fim"]
        if cfg.backend == "llama.cpp":
            n = min(n, max(1, info.get("slots") or 1))
            payload = dict(self._sampling(stops), n_predict=cfg.max_tokens, top_k=cfg.top_k,
                           min_p=0.0, typical_p=1.0, repeat_penalty=1.0, cache_prompt=True,
                           return_tokens=True, n_probs=1, n_cmpl=n, timings_per_token=True)
            if fim == "infill":
                above, middle, after = self._texts(request, prompt)
                payload.update(input_prefix=above, input_suffix=after, prompt=middle,
                               input_extra=[{"filename": c.filename or "untitled",
                                             "text": "".join(ln + "\n" for ln in c.lines)}
                                            for c in self.ring.chunks])
                return "/infill", self.base + "/infill", payload
            if fim == "plain":
                above, middle, _ = self._texts(request, prompt)
                payload["prompt"] = above + middle
            else:
                payload["prompt"] = self._rwkv_prompt(prompt)
            return "/completion", self.base + "/completion", payload
        payload = dict(self._sampling(stops), max_tokens=cfg.max_tokens, n=n, logprobs=1,
                       stream_options={"include_usage": True})
        payload["stop"] = stops[:4] or None
        if cfg.top_k > 0:
            payload["top_k"] = cfg.top_k
        if info.get("model") and info["model"] != "?":
            payload["model"] = info["model"]
        if fim == "rwkv":
            payload["prompt"] = self._rwkv_prompt(prompt)
        else:
            above, middle, after = self._texts(request, prompt)
            payload["prompt"] = above + middle
            if fim == "infill":
                payload["suffix"] = after
        for field in self._dropped:
            payload.pop(field, None)
        payload = {k: v for k, v in payload.items() if v is not None}
        return "/v1/completions", self.base + "/completions", payload

    def _stream(self, path, url, payload, n, prompt, rules, on_partial, should_stop, t0, info):
        from .candidates import Row, apply_text_rules, rank_candidates, _stream_row
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
                    for piece in _pieces(obj, self.label, path):
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
                        streamed = _stream_row(rows, streamed, shown, prompt.after_lines)
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
            "backend": self.config.backend, "server_ms": server_ms, "fim_mode": info["fim"],
        }
        self._totals["requests"] += 1
        self._totals["reused_tokens"] += reused
        self._totals["prefilled_tokens"] += stats["prefilled_tokens"]
        self.last_stats = stats
        return {"id": None,
                "candidates": [{"text": c["text"], "logprob": round(c["logprob"], 4)
                                if c["logprob"] != float("-inf") else -1e9} for c in ranked],
                "stats": stats}


def _whole_body(chunks: Iterable[bytes]) -> Iterator[str]:
    """A non-streamed (JSON) answer as one event, capped like a stream."""
    body, total = [], 0
    for chunk in chunks:
        total += len(chunk)
        if total > MAX_RESPONSE_BYTES:
            raise OverflowError(MAX_RESPONSE_BYTES)
        body.append(chunk)
    text = b"".join(body).decode("utf-8", "replace")
    if text.strip():
        yield text


_LLAMA_STOP = {"eos": "eos", "word": "stop", "limit": "max_tokens"}
_OAI_STOP = {"stop": "stop", "length": "max_tokens"}


def _pieces(obj, label: str, path: str) -> List[dict]:
    """One event -> [{index, text, tokens, logprobs, final, reason, timings, usage}].

    llama-server /completion and /infill: {index, content, tokens, stop, stop_type,
    completion_probabilities, timings}; a non-streamed answer may be a list of those.
    OpenAI: {choices: [{index, text, logprobs: {token_logprobs}, finish_reason}], usage}.
    {"error": ...} in a stream is the server's error."""
    if isinstance(obj, list):
        out = []
        for x in obj:
            out.extend(_pieces(x, label, path))
        return out
    if not isinstance(obj, dict):
        raise RemoteError(f"{label}: malformed answer from {path} (unexpected JSON)")
    if "error" in obj and obj["error"]:
        msg = _error_message(json.dumps(obj).encode())
        raise RemoteError(f"{label}: error from {path}: {msg}")
    if "choices" in obj:
        out = []
        for ch in obj.get("choices") or []:
            if not isinstance(ch, dict):
                continue
            lp = ch.get("logprobs") or {}
            lps = lp.get("token_logprobs") if isinstance(lp, dict) else None
            if lps is None and isinstance(lp, dict) and isinstance(lp.get("content"), list):
                lps = [c.get("logprob") for c in lp["content"] if isinstance(c, dict)]
            fin = ch.get("finish_reason")
            out.append({"index": int(ch.get("index") or 0), "text": ch.get("text") or "",
                        "logprobs": [float(x) for x in lps or [] if isinstance(x, (int, float))],
                        "final": fin is not None, "reason": _OAI_STOP.get(fin, "stop") if fin else "",
                        "timings": obj.get("timings") if fin else None})
        if obj.get("usage"):
            out.append({"index": -1, "usage": obj["usage"]})
        return out
    if "content" in obj or "stop" in obj:
        probs = obj.get("completion_probabilities") or []
        lps = [float(p["logprob"]) for p in probs if isinstance(p, dict) and "logprob" in p]
        toks = obj.get("tokens") or []
        final = bool(obj.get("stop"))
        return [{"index": int(obj.get("index") or 0), "text": obj.get("content") or "",
                 "tokens": [int(t) for t in toks if isinstance(t, int)],
                 "logprobs": lps, "final": final,
                 "reason": _LLAMA_STOP.get(obj.get("stop_type"), "eos") if final else "",
                 "timings": obj.get("timings")}]          # every event with timings_per_token
    raise RemoteError(f"{label}: malformed answer from {path} (unexpected JSON)")


def _request_copy(req: dict) -> dict:
    keep = ("id", "buf", "filename", "lines", "first", "row", "col")
    return {k: (list(req[k]) if k == "lines" else req[k]) for k in keep if k in req}


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
        rc = RemoteCompleter(fast, preload=False)
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


def probe_main(argv: Optional[List[str]] = None) -> int:
    """``python -c 'from rwkv_engine.pipeline.remote_backend import probe_main; probe_main()' JSON``:
    prints probe()'s dict as JSON for the engine options given as JSON (argv[1])."""
    import sys
    args = sys.argv[1:] if argv is None else argv
    try:
        opts = json.loads(args[0]) if args and args[0].strip() else {}
        if isinstance(opts, list) and not opts:
            opts = {}
        res = probe(opts)
    except Exception as e:                              # a bad option: say so, as JSON
        res = {"ok": False, "error": one_line(e)}
    print(json.dumps(res))
    return 0
