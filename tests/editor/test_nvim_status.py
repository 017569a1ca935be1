"""Issue 21 item 5: :RwkvStatus and :checkhealth say what is really in use.

- the request figures are those of the request whose candidates are on screen (a later
  request's "0 candidates" does not replace them), with how many are shown;
- long lines (the cache, the request figures) wrap between words at the screen width;
- with the remote backend and no server listening: no "ready", no "loaded", no "OK"
  about a local model in :checkhealth; once a server answers, "ready" (real host and
  engine, a fake llama-server on loopback).
"""
from __future__ import annotations

import pytest

from fake_completion_server import FakeServer, free_port
from nvim_harness import RECORDER, require_nvim, start_nvim

pytestmark = [pytest.mark.nvim, pytest.mark.slow]

SUGGEST = "require('rwkv.suggest')"

FAKE_STATUS = r"""
require('rwkv.host').status = function()
  return { loaded = true, model = 'fake', device = 'cpu', dtype = 'float32', error = vim.NIL,
           last_error = vim.NIL, last = _G.PY_LAST or {}, cpu_kernels = _G.PY_ISA or '',
           cache = { host = { bytes = 12345678, budget = 536870912, entries = 17 },
                     device = { bytes = 0, budget = 268435456, entries = 0 },
                     disk = { bytes = 2345678, budget = 1073741824, entries = 3 },
                     hits = { device = 0, host = 12, disk = 1, miss = 4 },
                     line_cache = { hits = 120, misses = 30 } } }
end
require('rwkv').on_event('ready', { model = 'fake', device = 'cpu', dtype = 'float32', load_ms = 1 })
"""


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    require_nvim()
    s = start_nvim(tmp_path_factory.mktemp("status"), {"debounce_ms": 10, "notify": False}, manifest=False)
    s.lua(RECORDER)
    s.lua(FAKE_STATUS)
    yield s
    s.close()


def test_status_counts_the_candidates_on_screen(ui):
    ui.cmd("enew!")
    ui.cmd("setlocal filetype=python")
    ui.feed("ix = ")
    ui.wait_for("_G.T.asked_here()", timeout=10)
    shown_id = ui.lua(f"return {SUGGEST}.state.sent.id")
    ui.lua(f"{SUGGEST}.on_done(...)", {"id": shown_id, "candidates": [{"text": t} for t in ("a", "b", "c")],
                                      "stats": {"candidates": 3, "ms_total": 7, "reused_tokens": 40}})
    ui.wait_for("require('rwkv.float').is_open()", timeout=10)
    # an older request Python finished later (no candidates), as the host also reports it
    stale = {"candidates": 0, "ms_total": 2, "reused_tokens": 1}
    ui.lua(f"{SUGGEST}.on_done(...)", {"id": shown_id - 1, "candidates": [], "stats": stale})
    ui.lua("_G.PY_LAST = ...", stale)
    lines = ui.lua("return require('rwkv').status_lines()")
    req = [ln for ln in lines if "candidates" in ln]
    assert len(req) == 1 and "3 candidates, 3 on screen" in req[0] and "40 reused" in req[0], lines
    assert f"#{shown_id}" in req[0]
    ui.feed("<Esc>")
    lines = ui.lua("return require('rwkv').status_lines()")
    assert [ln for ln in lines if ln.startswith("last request:")], lines  # nothing shown: the last one
    assert not [ln for ln in lines if "dtype" in ln], lines  # one precision line, no dtype beside it
    assert "precision: fp32 weights" in lines, lines
    assert not [ln for ln in lines if ln.startswith("cpu kernels")], lines   # none reported: no line
    ui.lua("_G.PY_ISA = 'q8: avx2'")
    try:
        assert "cpu kernels: q8: avx2" in ui.lua("return require('rwkv').status_lines()")
    finally:
        ui.lua("_G.PY_ISA = nil")


def test_status_wraps_between_words(ui):
    ui.cmd("set columns=60")
    try:
        ui.cmd("messages clear")
        ui.cmd("RwkvStatus")
        out = ui.messages().splitlines()
        assert len(out) > 5
        assert all(ui.nvim.funcs.strdisplaywidth(ln) < 60 for ln in out), out
        want = " ".join(" ".join(ui.lua("return require('rwkv').status_lines()")).split())
        assert " ".join(" ".join(out).split()) == want  # every word whole, in order
        cache = [ln for ln in out if ln.startswith("cache:")]
        assert cache and out[out.index(cache[0]) + 1].startswith("  ")  # continued, indented
    finally:
        ui.cmd("set columns=80")


def test_remote_backend_is_not_ready_before_the_server_answered(tmp_path):
    require_nvim()
    port = free_port()
    opts = {"debounce_ms": 20, "engine": {"backend": "llama.cpp", "url": f"http://127.0.0.1:{port}",
                                          "candidates": 2, "max_tokens": 8}}
    s = start_nvim(tmp_path / "nv", opts)
    try:
        s.cmd("setlocal filetype=python")
        s.feed("ix = ")
        s.wait_for("require('rwkv').status().error", timeout=120, what="the connection error")
        s.feed("<Esc>")
        msgs = s.messages()
        assert "connection refused" in msgs and "ready" not in msgs, msgs
        st = s.lua("return require('rwkv').status()")
        assert not st["loaded"]
        lines = s.lua("return require('rwkv').status_lines()")
        model = [ln for ln in lines if ln.startswith("model:")][0]
        assert "device: remote" in model and "no answer from the server yet" in model, lines
        assert "loaded" not in model and not [ln for ln in lines if ln.startswith("precision")], lines
        s.cmd("checkhealth rwkv")
        report = s.buffer_text()
        assert "ERROR" in report and "connection refused" in report
        assert "OK model" not in report and "OK loaded" not in report, report
        s.cmd("bwipeout!")
        with FakeServer(port=port):
            s.cmd("enew!")
            s.cmd("setlocal filetype=python")
            s.feed("iy = ")
            for ch in "abcdefgh":  # the engine retries a refused server after 2 s
                if s.lua("return require('rwkv').status().loaded"):
                    break
                s.feed(ch)
                s.lua("vim.wait(600)")
            s.wait_for("require('rwkv').status().loaded", timeout=30, what="ready once the server answered")
            assert "answered: ready" in s.messages()
            lines = s.lua("return require('rwkv').status_lines()")
            assert "the server answered" in [ln for ln in lines if ln.startswith("model:")][0], lines
    finally:
        s.close()
