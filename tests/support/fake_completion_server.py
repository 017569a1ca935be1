"""A loopback stand-in for a completion server (llama-server / OpenAI-compatible), for the
remote backend's fault tests: ``http.server`` in a thread, one route function per path.

    with FakeServer() as srv:                       # llama-server-like defaults
        srv.routes["/completion"] = lambda h, body: h.send_json(503, {"error": {...}})
        ... server_backend(EngineConfig(backend="llama.cpp", url=srv.url)) ...
        srv.requests      # [{"method", "path", "headers", "body"}] as received
        srv.disconnects   # monotonic times at which a client closed a stream early

A route gets the handler (helpers: send_json, start_sse, chunk, end_chunks, sse_events,
wait_or_gone) and the decoded JSON body (None for GET).
"""
from __future__ import annotations

import json
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, List, Optional, Sequence


class ClientGone(Exception):
    """The client closed the connection (a cancelled request)."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *args):            # quiet
        pass

    # -- plumbing ----------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        fake = self.server.fake
        path = self.path.split("?")[0]
        fake.requests.append({"method": method, "path": path, "headers": dict(self.headers), "body": body})
        route = fake.routes.get(path)
        try:
            if route is None:
                self.send_json(404, {"error": {"code": 404, "message": "File Not Found"}})
            else:
                route(self, body)
        except (ClientGone, BrokenPipeError, ConnectionResetError):
            fake.disconnects.append(time.monotonic())
            self.close_connection = True

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    # -- responses ---------------------------------------------------------------------
    def send_json(self, status: int, obj, headers: Optional[dict] = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def send_body(self, status: int, data: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_sse(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def sse_events(self, events: Sequence, delay: float = 0.0, end: bool = True) -> None:
        """Each event (a dict -> JSON, or a str sent as is) as one `data:` event."""
        self.start_sse()
        for ev in events:
            payload = ev if isinstance(ev, str) else json.dumps(ev)
            self.chunk(b"data: " + payload.encode() + b"\n\n")
            if delay:
                self.wait_or_gone(delay)
        if end:
            self.end_chunks()

    def wait_or_gone(self, seconds: float) -> None:
        """Sleep, but raise ClientGone as soon as the client closes the connection."""
        deadline = time.monotonic() + seconds
        sock = self.connection
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            r, _, _ = select.select([sock], [], [], min(left, 0.01))
            if r:
                try:
                    if sock.recv(1, socket.MSG_PEEK) == b"":
                        raise ClientGone()
                except (ConnectionResetError, OSError):
                    raise ClientGone() from None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: "FakeServer"


# -- llama-server-like answers ---------------------------------------------------------------
def llama_events(texts: Sequence[str], stop_type: str = "eos", prompt_n: int = 5, cache_n: int = 0) -> List[dict]:
    """Streamed /completion events for candidates ``texts`` (one piece per character, a
    final message per candidate)."""
    out = []
    longest = max((len(t) for t in texts), default=0)
    for k in range(longest):
        for i, t in enumerate(texts):
            if k < len(t):
                out.append({"index": i, "content": t[k], "tokens": [1000 + k], "stop": False,
                            "completion_probabilities": [{"id": 1000 + k, "logprob": -0.1 * (i + 1)}]})
    for i, t in enumerate(texts):
        out.append({"index": i, "content": "", "tokens": [], "stop": True, "stop_type": stop_type,
                    "timings": {"cache_n": cache_n, "prompt_n": prompt_n, "prompt_ms": 1.0, "predicted_ms": 2.0}})
    return out


def openai_events(texts: Sequence[str], usage: Optional[dict] = None) -> List:
    out: List = []
    longest = max((len(t) for t in texts), default=0)
    for k in range(0, longest, 2):
        for i, t in enumerate(texts):
            if k < len(t):
                out.append({"id": "cmpl-1", "object": "text_completion",
                            "choices": [{"index": i, "text": t[k:k + 2], "finish_reason": None,
                                         "logprobs": {"token_logprobs": [-0.2 * (i + 1)]}}]})
    for i, _ in enumerate(texts):
        out.append({"id": "cmpl-1", "choices": [{"index": i, "text": "", "finish_reason": "stop"}]})
    if usage:
        out.append({"id": "cmpl-1", "choices": [], "usage": usage})
    out.append("[DONE]")
    return out


class FakeServer:
    def __init__(self, texts: Sequence[str] = ("alpha()", "beta()"), rwkv: bool = True, port: int = 0):
        self.texts = list(texts)
        self.requests: List[dict] = []
        self.disconnects: List[float] = []
        self.routes: Dict[str, Callable] = {
            "/props": lambda h, b: h.send_json(200, {"total_slots": 4, "model_alias": "fake-model"}),
            "/v1/models": lambda h, b: h.send_json(200, {"object": "list", "data": [
                {"id": "fake-rwkv7" if rwkv else "fake-coder",
                 "meta": {"vocab_type": 5 if rwkv else 2, "n_ctx": 4096}}]}),
            "/completion": self._completion,
            "/v1/completions": self._openai,
        }
        self._srv = _Server(("127.0.0.1", port), Handler)
        self._srv.fake = self
        self.url = f"http://127.0.0.1:{self._srv.server_address[1]}"
        self._thread = threading.Thread(target=self._srv.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-completion-server", daemon=True)
        self._thread.start()

    def _completion(self, h: Handler, body) -> None:
        body = body or {}
        if body.get("stream") is False:
            h.send_json(200, {"index": 0, "content": "x", "stop": True, "stop_type": "limit",
                              "timings": {"cache_n": 3, "prompt_n": 40, "prompt_ms": 5.0, "predicted_ms": 1.0}})
            return
        n = int(body.get("n_cmpl") or 1)
        h.sse_events(llama_events(self.texts[:n]))

    def _openai(self, h: Handler, body) -> None:
        n = int((body or {}).get("n") or 1)
        h.sse_events(openai_events(self.texts[:n], usage={"prompt_tokens": 50, "completion_tokens": 9,
                                                          "prompt_tokens_details": {"cached_tokens": 40}}))

    def posts(self, path: str) -> List[dict]:
        return [r for r in self.requests if r["path"] == path and r["method"] == "POST"]

    def close(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()

    def __enter__(self) -> "FakeServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def free_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
