"""HTTP for the remote backend: httpx with the three timeouts, a socket shut down from a
watcher thread when the request is superseded, Server-Sent Events, size caps, and
one-line errors that name the server (``RemoteError``)."""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Callable, Iterable, Iterator, Optional

from ...core.errors import ExplainedError, one_line
from ..config import EngineConfig

log = logging.getLogger("rwkv_engine")

MAX_RESPONSE_BYTES = 4 << 20     # a completion stream is ~100 KB; stop reading beyond this
MAX_ERROR_BYTES = 16 << 10       # of an error body
RETRY_AFTER_S = 2.0              # after a failed connect, fail fast this long
WATCH_POLL_S = 0.005             # should_stop / deadline polling while blocked on the network
RWKV_VOCAB_TYPE = 5              # llama.cpp's LLAMA_VOCAB_TYPE_RWKV (/v1/models "meta")
TOKENIZE_PROBE = "✿prefix✿✿suffix✿\n    return x\n✿middle✿"

ShouldStop = Optional[Callable[[], bool]]


class RemoteError(RuntimeError, ExplainedError):
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


