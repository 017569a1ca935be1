"""A tiny loopback stand-in for the Hugging Face Hub, for download tests.

It answers exactly the requests huggingface_hub 2.4 makes for one model repository
(see /work/shared/ANCHORS.md "Testing downloads without Hugging Face"):

    GET  /api/models/{repo}/tree/main?recursive=true&expand=false   -> JSON file list
    HEAD /{repo}/resolve/main/{file}                                -> metadata headers
    GET  /{repo}/resolve/main/{file}   (optionally with Range)      -> bytes (200 or 206)

Anything else gets a 404 (huggingface_hub also asks `/api/agent-harnesses`; a 404 is
fine there). Unknown repositories answer 404 with `X-Error-Code: RepoNotFound` and
unknown files 404 with `X-Error-Code: EntryNotFound`, as the real Hub does.

Fault injection: a file listed in `FakeHub.drop_first_get` gets its first full GET
cut off after half of its bytes (headers announce the full length, then the socket is
closed), so a client must resume with a Range request. `FakeHub.fail_status` makes
every resolve request answer that HTTP status instead.

Usage:
    with FakeHub({"rwkv7-g1a-0.1b-20250728-ctx4096.pth": data}) as hub:
        env["HF_ENDPOINT"] = hub.url
        ...
        hub.requests  # [(method, path, headers)] in arrival order
"""
from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

DEFAULT_REPO = "BlinkDL/rwkv7-g1"
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # 40 hex: a fake X-Repo-Commit
_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class FakeHub:
    """A loopback HTTP server serving `files` (name -> bytes) as repository `repo`."""

    def __init__(self, files: dict[str, bytes], repo: str = DEFAULT_REPO):
        self.repo = repo
        self.files = dict(files)
        self.drop_first_get: set[str] = set()
        self.fail_status: int | None = None
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._dropped: set[str] = set()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "FakeHub is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_HubHandler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hf-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers for tests -------------------------------------------------------
    def gets(self, filename: str) -> list[dict[str, str]]:
        """Headers of every GET that asked for `filename` (in order)."""
        path = f"/{self.repo}/resolve/main/{filename}"
        with self._lock:
            return [h for m, p, h in self.requests if m == "GET" and p == path]

    def _log(self, method: str, path: str, headers: dict[str, str]) -> None:
        with self._lock:
            self.requests.append((method, path, headers))

    def _should_drop(self, filename: str) -> bool:
        with self._lock:
            if filename in self.drop_first_get and filename not in self._dropped:
                self._dropped.add(filename)
                return True
            return False


def etag_of(data: bytes) -> str:
    """The ETag the fake hub sends for `data` (a sha256, like an LFS file on the Hub)."""
    return hashlib.sha256(data).hexdigest()


class _HubHandler(BaseHTTPRequestHandler):
    fake: FakeHub  # set by FakeHub.start on a per-server subclass
    protocol_version = "HTTP/1.0"  # one request per connection: a dropped socket is unambiguous
    timeout = 30  # never let a stuck client pin a server thread forever

    def log_message(self, format, *args) -> None:  # keep pytest output quiet
        pass

    # -- dispatch ----------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._handle(send_body=False)

    def do_GET(self) -> None:
        self._handle(send_body=True)

    def _handle(self, send_body: bool) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        self.fake._log(self.command, path, {k.lower(): v for k, v in self.headers.items()})
        repo = self.fake.repo

        if path == f"/api/models/{repo}/tree/main" and send_body:
            return self._send_tree()
        if path.startswith("/api/models/") and path.split("/tree/")[0] != f"/api/models/{repo}":
            return self._send_error(404, "RepoNotFound")

        prefix = f"/{repo}/resolve/main/"
        if path.startswith(prefix):
            return self._send_file(path[len(prefix):], send_body)
        if "/resolve/" in path:
            return self._send_error(404, "RepoNotFound")
        return self._send_error(404, None)

    # -- responses ---------------------------------------------------------------
    def _send_error(self, status: int, error_code: str | None) -> None:
        body = json.dumps({"error": f"fake hub: {status}"}).encode()
        self.send_response(status)
        if error_code:
            self.send_header("X-Error-Code", error_code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_tree(self) -> None:
        entries = [
            {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for name, data in sorted(self.fake.files.items())
        ]
        body = json.dumps(entries).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_file(self, filename: str, send_body: bool) -> None:
        if self.fake.fail_status is not None:
            return self._send_error(self.fake.fail_status, None)
        data = self.fake.files.get(filename)
        if data is None:
            return self._send_error(404, "EntryNotFound")

        size = len(data)
        start, end = 0, size - 1
        status = 200
        match = _RANGE.match(self.headers.get("Range", "")) if send_body else None
        if match:
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else size - 1
            status = 206
        body = data[start:end + 1]

        self.send_response(status)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{etag_of(data)}"')
        self.send_header("X-Linked-Size", str(size))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not send_body:
            return

        if status == 200 and self.fake._should_drop(filename):
            # Announce the whole file, send half of it, then cut the connection.
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.wfile.write(body)
