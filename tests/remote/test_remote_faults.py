"""Remote backend against a loopback fake server (tests/support/fake_completion_server.py): the
fault matrix (refused, DNS, 4xx, 5xx, malformed / truncated SSE, slow streams and their
cancellation, a 10 MB answer), OpenAI `n` candidates over SSE, the API key from the
environment, the SSE reader, the config rule and the :checkhealth probe."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from fake_completion_server import ClientGone, FakeServer, free_port, llama_events
from pipeline_fixtures import Recorder, SOURCE_LINES, make_request
from rwkv_engine.pipeline.config import EngineConfig
from rwkv_engine.pipeline.remote_backend import RemoteError, ServerBackend, probe, server_backend, sse_data

LINES = SOURCE_LINES[:12]


def config(url: str, backend: str = "llama.cpp", **kw) -> EngineConfig:
    opts = dict(backend=backend, url=url, candidates=2, max_tokens=16, max_lines=4, temperature=1.0,
                top_p=1.0, n_prefix=24, n_suffix=8, near_prefix=8, near_suffix=4,
                timeout_connect_ms=1000, timeout_first_byte_ms=3000, timeout_total_ms=10000,
                time_budget_ms=5000)
    opts.update(kw)
    return EngineConfig(**opts)


def request(rid: int = 1, row: int = 9):
    return make_request(LINES, row, rid=rid)


def failure(rc: ServerBackend, rid: int = 1) -> str:
    with pytest.raises(RemoteError) as info:
        rc.complete(request(rid))
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 300, msg
    return msg


@pytest.fixture
def srv():
    with FakeServer() as s:
        yield s


# -- the happy paths ---------------------------------------------------------------------------
def test_llama_cpp_candidates_stream_and_stats(srv):
    rc = server_backend(config(srv.url))
    parts = []
    res = rc.complete(request(7), on_partial=parts.append)
    assert res["id"] == 7
    assert sorted(c["text"] for c in res["candidates"]) == ["alpha()", "beta()"]
    assert parts and parts[-1] == res["candidates"][0]["text"]
    assert all(res["candidates"][0]["text"].startswith(p) for p in parts)    # the ghost text only grows
    s = res["stats"]
    assert s["backend"] == "llama.cpp" and s["server_ms"] == 3.0 and s["fim_mode"] == "rwkv"
    assert (s["reused_tokens"], s["prefilled_tokens"], s["prompt_tokens"]) == (0, 5, 5)
    for key in ("decoded_tokens", "ms_prefill", "ms_decode", "ms_total", "candidates", "cache_hits",
                "speculative", "stop_reasons"):
        assert key in s
    (post,) = srv.posts("/completion")
    body = post["body"]
    assert body["n_cmpl"] == 2 and body["stream"] is True and body["cache_prompt"] is True
    assert body["n_predict"] == 16 and body["temperature"] == 1.0
    # no /tokenize on the fake: the prompt goes as the start token + text, FIM markers last
    assert body["prompt"][0] == 0 and isinstance(body["prompt"][1], str)
    text = body["prompt"][1]
    assert text.index("✿prefix✿✿suffix✿") < text.index("✿middle✿") and text.endswith(LINES[9])
    assert rc.cache_stats()["server"]["requests"] == 1


def test_greedy_asks_for_one_candidate_and_slots_cap_n_cmpl(srv):
    rc = server_backend(config(srv.url, temperature=0.0, candidates=4))
    rc.complete(request())
    assert srv.posts("/completion")[-1]["body"]["n_cmpl"] == 1
    srv.routes["/props"] = lambda h, b: h.send_json(200, {"total_slots": 2})
    rc = server_backend(config(srv.url, candidates=4))
    rc.complete(request())
    assert srv.posts("/completion")[-1]["body"]["n_cmpl"] == 2


def test_openai_n_candidates_over_sse_with_suffix_and_usage(srv):
    srv.routes["/v1/models"] = lambda h, b: h.send_json(200, {"data": [{"id": "qwen-coder"}]})
    srv.texts = ["one()", "two()", "three()"]
    rc = server_backend(config(srv.url + "/", backend="openai", candidates=3))
    assert rc.base == srv.url + "/v1"
    parts = []
    res = rc.complete(request(), on_partial=parts.append)
    assert sorted(c["text"] for c in res["candidates"]) == ["one()", "three()", "two()"]
    assert res["candidates"][0]["text"] == "one()"          # best mean logprob
    assert parts
    (post,) = srv.posts("/v1/completions")
    body = post["body"]
    assert body["n"] == 3 and body["stream"] is True and body["model"] == "qwen-coder"
    assert body["prompt"].endswith(LINES[9]) and "✿" not in body["prompt"]
    assert body["suffix"].startswith("\n")                   # "auto" on a non-RWKV model: FIM by suffix
    s = res["stats"]
    assert (s["reused_tokens"], s["prefilled_tokens"], s["fim_mode"]) == (40, 10, "infill")


def test_openai_rwkv_model_gets_the_rwkv_prompt(srv):
    srv.routes["/v1/models"] = lambda h, b: h.send_json(200, {"data": [{"id": "rwkv7-g1-1.5b"}]})
    rc = server_backend(config(srv.url + "/v1", backend="openai"))
    rc.complete(request())
    body = srv.posts("/v1/completions")[-1]["body"]
    assert "✿middle✿" in body["prompt"] and "suffix" not in body


def test_infill_model_gets_infill_then_plain_when_refused(tmp_path):
    warnings = []
    with FakeServer(rwkv=False) as srv:
        srv.routes["/infill"] = lambda h, b: h.send_json(501, {"error": {
            "code": 501, "message": "Infill is not supported by this model: prefix token is missing. ",
            "type": "not_supported_error"}})
        rc = server_backend(config(srv.url), on_warning=warnings.append)
        rc.add_chunk("x = 1\ny = 2\nz = 3\n", "other.py")
        rc.prime_step()                                     # into the ring
        res = rc.complete(request())
        assert res["candidates"]
        (inf,) = srv.posts("/infill")
        assert inf["body"]["input_extra"] == [{"filename": "other.py", "text": "x = 1\ny = 2\nz = 3\n"}]
        assert inf["body"]["prompt"] == LINES[9] and inf["body"]["input_prefix"].endswith(LINES[8] + "\n")
        plain = srv.posts("/completion")[-1]["body"]["prompt"]
        assert isinstance(plain, str) and plain.endswith(LINES[9]) and "✿" not in plain
        rc.complete(request(2))
        assert len(srv.posts("/infill")) == 1 and len(warnings) == 1 and "fim" in warnings[0]


def test_idle_priming_warms_the_server_with_the_new_ring_chunks(srv):
    rc = server_backend(config(srv.url))
    rc.add_chunk("alpha = 1\nbeta = 2\ngamma = 3\n", "a.py")
    assert rc.prime_step() is True and rc.prime_step() is False      # no request yet: ring only
    rc.complete(request())
    assert rc.prime_step() is False                 # the server read that prompt already
    rc.add_chunk("delta = 4\nepsilon = 5\nzeta = 6\n", "b.py")
    assert rc.prime_step() is True                  # into the ring
    assert rc.prime_step() is True                  # one request for the new prompt
    warm = srv.posts("/completion")[-1]["body"]
    assert warm["stream"] is False and warm["n_predict"] == 1 and warm["cache_prompt"] is True
    assert "epsilon" in warm["prompt"][1]
    assert rc.last_prime["prefilled_tokens"] == 40
    assert rc.prime_step() is False
    n = len(srv.posts("/completion"))
    rc.complete(request(2))                         # the request itself is unchanged
    assert len(srv.posts("/completion")) == n + 1


# -- faults ----------------------------------------------------------------------------------------
def test_connection_refused_is_one_message_repeated_fast():
    url = f"http://127.0.0.1:{free_port()}"
    rc = server_backend(config(url))
    msg = failure(rc)
    assert msg == f"llama.cpp server {url}: connection refused (is the server running?)"
    t0 = time.perf_counter()
    assert failure(rc, 2) == msg                       # the same text: notified once
    assert time.perf_counter() - t0 < 0.1              # and no network wait while typing


def test_dns_failure_names_the_host():
    rc = server_backend(config("http://rwkv-nonexistent.invalid:1"))
    msg = failure(rc)
    assert msg.startswith("llama.cpp server http://rwkv-nonexistent.invalid:1: ")
    assert "resolve" in msg or "cannot connect" in msg or "no connection" in msg, msg
    assert failure(rc, 2) == msg


@pytest.mark.parametrize("status,body,want", [
    (400, {"error": {"code": 400, "message": "Field 'n_cmpl': Value must be between 1 <= value <= 4",
                     "type": "invalid_request_error"}},
     "HTTP 400 from /completion: Field 'n_cmpl': Value must be between 1 <= value <= 4"),
    (404, {"detail": "Not Found"}, "HTTP 404 from /completion: Not Found"),
    (500, {"error": "boom\nwith a second line"}, "HTTP 500 from /completion: boom with a second line"),
    (503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
     "HTTP 503 from /completion: Loading model"),
])
def test_http_errors_are_one_line_and_stable(srv, status, body, want):
    srv.routes["/completion"] = lambda h, b: h.send_json(status, body)
    rc = server_backend(config(srv.url))
    msg = failure(rc)
    assert msg == f"llama.cpp server {srv.url}: {want}"
    assert failure(rc, 2) == msg


def test_unauthorized_hints_at_the_api_key(srv):
    srv.routes["/v1/completions"] = lambda h, b: h.send_json(401, {"error": {"message": "Incorrect API key"}})
    msg = failure(server_backend(config(srv.url, backend="openai")))
    assert msg.endswith("HTTP 401 from /v1/completions: Incorrect API key (check the API key: engine option api_key_env)")


def test_malformed_sse(srv):
    srv.routes["/completion"] = lambda h, b: h.sse_events([{"index": 0, "content": "a", "stop": False},
                                                          "{not json"])
    assert failure(server_backend(config(srv.url))).endswith("malformed answer from /completion (an event is not JSON)")
    srv.routes["/completion"] = lambda h, b: h.sse_events([[1, 2]])
    assert failure(server_backend(config(srv.url))).endswith("malformed answer from /completion (unexpected JSON)")


def test_truncated_sse(srv):
    events = llama_events(["hello()", "world()"])

    def cut_mid_chunk(h, body):                 # the connection drops inside a chunk
        h.start_sse()
        for ev in events[:4]:
            h.chunk(b"data: " + json.dumps(ev).encode() + b"\n\n")
        h.wfile.write(b"400\r\ndata: {\"index\": 0, \"con")
        h.wfile.flush()
        h.close_connection = True

    srv.routes["/completion"] = cut_mid_chunk
    rc = server_backend(config(srv.url))
    msg = failure(rc)
    assert msg.endswith("the answer from /completion ended early (connection closed)")
    assert failure(rc, 2) == msg

    # a well-formed stream that just stops before the final messages
    srv.routes["/completion"] = lambda h, b: h.sse_events(events[:4])
    assert failure(rc, 3).endswith("the answer from /completion ended early (truncated stream)")


def test_a_kept_alive_connection_closed_by_the_server_is_retried_once(srv):
    served = []

    def once_per_connection(h, body):           # a server that drops idle connections
        if getattr(h, "served", False):         # (one handler per connection)
            h.close_connection = True           # closes without an answer
            return
        h.served = True
        served.append(h)
        h.sse_events(llama_events(["ok()"]))

    srv.routes["/completion"] = once_per_connection
    rc = server_backend(config(srv.url, candidates=1))
    for rid in (1, 2, 3):
        assert rc.complete(request(rid))["candidates"][0]["text"] == "ok()"
    assert len(srv.posts("/completion")) == 5 and len(served) == 3


def test_error_event_inside_the_stream(srv):
    srv.routes["/completion"] = lambda h, b: h.sse_events([
        {"index": 0, "content": "a", "stop": False},
        {"error": {"code": 500, "message": "the context is full", "type": "server_error"}}])
    assert failure(server_backend(config(srv.url))).endswith("error from /completion: the context is full")


def test_a_10_mb_answer_is_capped(srv):
    line = json.dumps({"index": 0, "content": "x" * 1000, "stop": False}).encode()

    def huge_stream(h, body):
        h.start_sse()
        try:
            for _ in range(10_000):             # 10 MB of events, none of which ends the row
                h.chunk(b"data: " + line + b"\n\n")
        except (BrokenPipeError, ConnectionResetError):
            raise ClientGone() from None
        h.end_chunks()

    srv.routes["/completion"] = huge_stream
    rc = server_backend(config(srv.url, max_tokens=4096, max_lines=1000, time_budget_ms=60_000))
    t0 = time.perf_counter()
    msg = failure(rc)
    assert msg.endswith("answer from /completion larger than 4 MB; stopped reading"), msg
    assert time.perf_counter() - t0 < 20
    # one 10 MB body that is not a stream
    srv.routes["/completion"] = lambda h, b: h.send_body(200, b"[" + b" " * (10 << 20) + b"]")
    assert failure(rc, 2).endswith("larger than 4 MB; stopped reading")


def _headers_then_wait(h, body):
    h.start_sse()                               # llama-server: headers at once, events later
    h.wait_or_gone(5.0)


@pytest.mark.parametrize("route", [lambda h, b: h.wait_or_gone(5.0), _headers_then_wait],
                         ids=["no-headers", "headers-only"])
def test_first_byte_timeout(srv, route):
    srv.routes["/completion"] = route
    rc = server_backend(config(srv.url, timeout_first_byte_ms=300))
    t0 = time.perf_counter()
    msg = failure(rc)
    assert msg.endswith("no answer from /completion within 300 ms (timeout_first_byte_ms)"), msg
    assert time.perf_counter() - t0 < 3


def test_decode_budget_keeps_the_text_so_far(srv):
    def slow(h, body):
        h.start_sse()
        for k in range(200):
            h.chunk(b"data: " + json.dumps({"index": 0, "content": "ab"[k % 2], "stop": False}).encode() + b"\n\n")
            h.wait_or_gone(0.05)
        h.end_chunks()

    srv.routes["/completion"] = slow
    rc = server_backend(config(srv.url, candidates=1, time_budget_ms=400, max_tokens=4096, max_lines=1000))
    t0 = time.perf_counter()
    res = rc.complete(request())
    took = time.perf_counter() - t0
    assert 0.3 < took < 3, took
    assert res["candidates"][0]["text"].startswith("abab")
    assert res["stats"]["stop_reasons"] == ["time"]


@pytest.mark.parametrize("route", [lambda h, b: h.wait_or_gone(5.0), _headers_then_wait],
                         ids=["no-headers", "headers-only"])
def test_total_timeout(srv, route):
    srv.routes["/completion"] = route
    rc = server_backend(config(srv.url, timeout_first_byte_ms=60_000, timeout_total_ms=400))
    t0 = time.perf_counter()
    assert failure(rc).endswith("no answer from /completion within 400 ms (timeout_total_ms)")
    assert time.perf_counter() - t0 < 3


def test_the_decode_budget_starts_at_the_first_piece_not_at_the_headers(srv):
    def slow_prompt(h, body):
        h.start_sse()
        h.wait_or_gone(0.8)                     # reading the prompt
        for ev in llama_events(["done()"]):
            h.chunk(b"data: " + json.dumps(ev).encode() + b"\n\n")
        h.end_chunks()

    srv.routes["/completion"] = slow_prompt
    rc = server_backend(config(srv.url, candidates=1, time_budget_ms=300))
    res = rc.complete(request())
    assert [c["text"] for c in res["candidates"]] == ["done()"]
    assert res["stats"]["ms_prefill"] >= 700           # time to the first piece


@pytest.mark.parametrize("where", ["body", "first_byte"])
def test_a_superseded_request_releases_a_slow_stream_at_once(srv, where):
    started = threading.Event()

    def stalls(h, body):
        if where == "body":
            h.start_sse()
            h.chunk(b"data: " + json.dumps({"index": 0, "content": "sl", "stop": False}).encode() + b"\n\n")
        started.set()
        h.wait_or_gone(30.0)                    # then nothing for 30 s

    srv.routes["/completion"] = stalls
    rc = server_backend(config(srv.url, timeout_first_byte_ms=60_000, timeout_total_ms=60_000))
    stop = threading.Event()
    out, times = [], {}

    def run():
        out.append(rc.complete(request(), should_stop=stop.is_set))
        times["returned"] = time.monotonic()

    t = threading.Thread(target=run)
    t.start()
    assert started.wait(10)
    time.sleep(0.1)                             # blocked in a read now
    times["stop"] = time.monotonic()
    stop.set()
    t.join(10)
    assert out == [None]
    release = times["returned"] - times["stop"]
    assert release < 0.25, f"the superseded request held the worker {release * 1000:.0f} ms"
    deadline = time.monotonic() + 2
    while not srv.disconnects and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.disconnects and srv.disconnects[0] - times["stop"] < 0.5     # the server saw it go
    print(f"\nrelease of a superseded request ({where}): {release * 1000:.1f} ms")
    # and the next request works on a fresh connection
    srv.routes["/completion"] = lambda h, b: h.sse_events(llama_events(["next()"]))
    assert rc.complete(request(2))["candidates"][0]["text"] == "next()"


def test_service_a_newer_request_is_not_delayed_by_a_slow_stream(srv):
    from rwkv_engine.pipeline.service import CompletionService
    calls = []

    def first_slow(h, body):
        calls.append(time.monotonic())
        if len(calls) == 1:
            h.start_sse()
            h.chunk(b"data: " + json.dumps({"index": 0, "content": "x", "stop": False}).encode() + b"\n\n")
            h.wait_or_gone(30.0)
        else:
            h.sse_events(llama_events(["fast()"]))

    srv.routes["/completion"] = first_slow
    rec = Recorder()
    svc = CompletionService(config(srv.url, candidates=1), on_event=rec.on_event)
    svc.start()
    try:
        assert rec.ready.wait(60)
        assert rec.events[-1][0] == "ready" and rec.events[-1][1]["device"] == "remote"
        first_done = []
        got_partial = threading.Event()
        svc.submit(request(1), lambda p: got_partial.set(), first_done.append)
        assert got_partial.wait(30)
        t0 = time.monotonic()
        svc.submit(request(2), None, rec.on_done)
        assert rec.finished.wait(30)
        took = time.monotonic() - t0
        assert [r["id"] for r in rec.done] == [2] and rec.done[0]["candidates"][0]["text"] == "fast()"
        assert first_done == [] and took < 2.0, took
        assert srv.disconnects
        st = svc.status()
        assert st["model"] == f"llama.cpp server {srv.url}" and st["last"]["backend"] == "llama.cpp"
        assert st["load"]["superseded"] == 1
        print(f"\nservice: newer request answered {took * 1000:.0f} ms after it was submitted")
    finally:
        svc.close()


def test_service_is_not_ready_before_the_server_answered():
    """Issue 21: no "ready" while nothing listens; the first answer makes it ready."""
    from rwkv_engine.pipeline.service import CompletionService
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    rec = Recorder()
    svc = CompletionService(config(url), on_event=rec.on_event)
    svc.start()
    try:
        assert rec.ready.wait(60)
        assert [k for k, _ in rec.events] == ["loading", "error"], rec.events
        assert "connection refused" in rec.events[-1][1]["message"]
        st = svc.status()
        assert st["loaded"] is False and st["device"] == "remote" and "connection refused" in st["error"]
        svc.submit(request(1), None, rec.on_done)       # still down: an error, still not ready
        assert rec.finished.wait(30) and rec.done[-1]["error"] and not rec.kinds("ready")
        with FakeServer(port=port):
            deadline = time.monotonic() + 30
            while not rec.kinds("ready") and time.monotonic() < deadline:
                rec.finished.clear()
                svc.submit(request(2), None, rec.on_done)
                assert rec.finished.wait(30)
                time.sleep(0.2)
            assert rec.kinds("ready") and rec.kinds("ready")[0]["device"] == "remote"
            assert rec.done[-1]["candidates"] and svc.status()["loaded"] is True
            assert svc.status()["error"] is None
    finally:
        svc.close()


def test_service_reports_each_failure_with_the_same_message(srv, caplog):
    from rwkv_engine.pipeline.service import CompletionService
    caplog.set_level(logging.ERROR, logger="rwkv_engine")
    srv.routes["/completion"] = lambda h, b: h.send_json(503, {"error": {"message": "Loading model"}})
    rec = Recorder()
    svc = CompletionService(config(srv.url), on_event=rec.on_event)
    svc.start()
    try:
        assert rec.ready.wait(60)
        for rid in (1, 2, 3):
            rec.finished.clear()
            svc.submit(request(rid), None, rec.on_done)
            assert rec.finished.wait(30)
        errors = {r["error"] for r in rec.done}
        assert errors == {f"llama.cpp server {srv.url}: HTTP 503 from /completion: Loading model"}
        assert {i["message"] for i in rec.kinds("error")} == errors
        assert svc.status()["last_error"]["message"] in errors
        # one log line per failure, no traceback: the message explains it (ExplainedError)
        failed = [r for r in caplog.records if "failed" in r.getMessage()]
        assert len(failed) == 3 and not [r for r in failed if r.exc_info]
    finally:
        svc.close()


# -- API key -------------------------------------------------------------------------------------
def test_api_key_comes_from_the_env_var_and_is_never_logged(srv, monkeypatch, caplog):
    secret = "sk-test-5ecret-value"
    monkeypatch.setenv("RWKV_TEST_API_KEY", secret)
    caplog.set_level(logging.DEBUG)
    rc = server_backend(config(srv.url, backend="openai", api_key_env="RWKV_TEST_API_KEY"))
    rc.complete(request())
    for r in srv.requests:
        assert r["headers"].get("Authorization") == f"Bearer {secret}", r["path"]
    srv.routes["/v1/completions"] = lambda h, b: h.send_json(401, {"error": {"message": "bad key"}})
    msg = failure(rc, 2)
    assert secret not in msg
    assert secret not in caplog.text and LINES[9] not in caplog.text      # nor the buffer text
    # the key is never read from the configuration text, and a missing variable says which
    monkeypatch.delenv("RWKV_TEST_API_KEY")
    with pytest.raises(RemoteError, match="the environment variable RWKV_TEST_API_KEY .* is not set"):
        server_backend(config(srv.url, backend="openai", api_key_env="RWKV_TEST_API_KEY"))


# -- pieces -------------------------------------------------------------------------------------------
def test_sse_reader():
    stream = [b"data: {\"a\"", b": 1}\r", b"\n\r\n: ping\n\ndata: x\ndata: y\n", b"\nevent: e\nid: 3\ndata:z\n\n",
              b"data: unfinished"]
    assert list(sse_data(stream)) == ['{"a": 1}', "x\ny", "z"]
    with pytest.raises(OverflowError):
        list(sse_data([b"data: " + b"x" * 100], max_bytes=50))


def test_config_needs_a_url_for_a_server():
    with pytest.raises(ValueError, match=r"^engine option url = None: must be set when backend is 'openai'$"):
        EngineConfig(backend="openai")
    with pytest.raises(ValueError, match="url"):
        server_backend(EngineConfig(backend="llama.cpp", url="ftp://x"))
    assert EngineConfig().backend == "local"


def test_probe(srv):
    ok = probe({"backend": "llama.cpp", "url": srv.url})
    assert ok["ok"] and ok["model"] == "fake-model" and ok["fim"] == "rwkv" and ok["slots"] == 4
    down = probe({"backend": "openai", "url": f"http://127.0.0.1:{free_port()}"})
    assert not down["ok"] and "connection refused" in down["error"]
    assert probe({})["ok"] and probe({"backend": "llama.cpp"})["error"].startswith("engine option url")


@pytest.mark.nvim
def test_health_server_lua(srv, tmp_path, monkeypatch):
    """lua/rwkv/health_server.lua reports the backend, the server and its model."""
    import sys
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "editor"))
    from test_config_schema import run_lua
    code = r"""
local calls = {}
local h = {}
for _, k in ipairs({ "start", "ok", "info", "warn", "error" }) do
  h[k] = function(msg, advice) table.insert(calls, { k, msg, advice }) end
end
local hr = require("rwkv.health_server")
hr.check(h, { python = _G.arg[1], engine = vim.json.decode(_G.arg[2]) })
hr.check(h, { python = _G.arg[1], engine = { backend = "llama.cpp", url = _G.arg[3] } })
hr.check(h, { python = _G.arg[1], engine = {} })
io.stdout:write(vim.json.encode(calls))
"""
    down = f"http://127.0.0.1:{free_port()}"
    calls = run_lua(tmp_path, code, sys.executable, json.dumps({"backend": "llama.cpp", "url": srv.url}), down)
    kinds = [c[0] for c in calls]
    text = "\n".join(str(c[1]) for c in calls)
    assert kinds.count("start") == 3 and "ok" in kinds and "error" in kinds, calls
    assert f"llama.cpp server {srv.url}" in text and "fake-model" in text and "rwkv" in text
    assert "connection refused" in text
    assert "token healing: off with a server" in text      # the server cannot constrain its first tokens


def test_closing_the_service_closes_the_backends_http_client(srv):
    """Issue 22: service.close() left the remote backend's connection pool open."""
    from rwkv_engine.pipeline.service import CompletionService
    srv.routes["/completion"] = lambda h, b: h.sse_events(llama_events(["done()"]))
    rec = Recorder()
    svc = CompletionService(config(srv.url, candidates=1), on_event=rec.on_event)
    svc.start()
    try:
        assert rec.ready.wait(60)
        svc.submit(request(1), None, rec.on_done)
        assert rec.finished.wait(30) and rec.done[0]["candidates"]
        client = svc._completer.http.client
        assert not client.is_closed
    finally:
        svc.close()
    assert client.is_closed


def test_the_remote_backend_runs_without_importing_torch():
    """Issue 22: the remote path (service, prompt, text rules, HTTP) never imports torch:
    a request, idle priming and status through CompletionService in a fresh interpreter."""
    script = textwrap.dedent("""
        import sys, threading
        sys.path.insert(0, %r)
        from fake_completion_server import FakeServer, llama_events
        from pipeline_fixtures import SOURCE_LINES, make_request
        from rwkv_engine.pipeline.config import EngineConfig
        from rwkv_engine.pipeline.service import CompletionService
        with FakeServer() as srv:
            srv.routes["/completion"] = lambda h, b: h.sse_events(llama_events(["done()", "x = 1"]))
            ready, done = threading.Event(), []
            svc = CompletionService(EngineConfig(backend="llama.cpp", url=srv.url, candidates=2),
                                    on_event=lambda k, i: ready.set() if k in ("ready", "error") else None)
            svc.start()
            assert ready.wait(30)
            fin = threading.Event()
            svc.submit(make_request(SOURCE_LINES[:12], 9), None, lambda r: (done.append(r), fin.set()))
            assert fin.wait(30) and done[0]["candidates"], done
            svc.add_chunk("def helper():\\n    return 1\\n", "other.py")
            svc.prime()
            svc.status()
            svc.close()
        heavy = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        assert not heavy, heavy[:5]
        print("NO_TORCH")
    """) % str(Path(__file__).resolve().parents[1] / "support")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "NO_TORCH" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]
