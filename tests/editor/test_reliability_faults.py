"""Issue 8, faults: a bad model file, no CUDA, out of memory, a kernel that does not
build, a dead Python host, an unusable disk cache -> one clear message, the editor
keeps working (and falls back where it can).

Engine-level tests drive ``CompletionService`` / the host ``Bridge`` directly (a fake
nvim records what would reach Lua); editor-level tests run headless Neovim.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from nvim_harness import REPO, require_nvim, start_nvim
from pipeline_fixtures import Recorder, SOURCE_LINES, fast_config, make_request, one_torch_thread  # noqa: F401
from rwkv_engine.core.random_checkpoint import make_state_dict
from reliability_helpers import FakeNvim, SUGGEST, fresh_buffer, host_log_text, live_opts, wait_done

WAIT = 120.0

sys.path.insert(0, str(REPO / "rplugin" / "python3"))


def run_one(svc, rec, rid=1):
    rec.finished.clear()
    svc.submit(make_request(SOURCE_LINES[:12], 9, rid=rid), None, rec.on_done)
    assert rec.finished.wait(WAIT), rec.events
    return rec.done[-1]


# -- unusable model files ---------------------------------------------------------------
def _bad_model(kind, tmp_path, tiny_model_path):
    p = tmp_path / f"{kind}.pth"
    if kind == "missing":
        return tmp_path / "nowhere.pth"
    if kind == "truncated":
        data = tiny_model_path.read_bytes()
        p.write_bytes(data[: len(data) // 3])
    elif kind == "not_rwkv7":
        torch.save({"model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)}, p)
    elif kind == "wrong_vocab":
        torch.save(make_state_dict(vocab=1000), p)
    return p


@pytest.mark.parametrize("kind", ["missing", "truncated", "not_rwkv7", "wrong_vocab"])
def test_unusable_model_gives_one_clear_error_and_requests_still_answer(kind, tmp_path, tiny_model_path):
    from rwkv_engine.pipeline.service import CompletionService
    path = _bad_model(kind, tmp_path, tiny_model_path)
    rec = Recorder()
    svc = CompletionService(fast_config(tmp_path, model=str(path)), on_event=rec.on_event)
    svc.start()
    try:
        assert rec.ready.wait(WAIT)
        (err,) = rec.kinds("error")
        assert "\n" not in err["message"] and path.stem in err["message"]
        res = run_one(svc, rec)                        # a request is answered (empty), no exception
        assert res["candidates"] == [] and res.get("error")
        assert svc.status()["error"] == err["message"] and not svc.status()["loaded"]
        assert len(rec.kinds("error")) == 1
    finally:
        svc.close()


# -- CUDA absent / out of memory ----------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the machine without CUDA")
def test_cuda_requested_without_cuda_falls_back_to_cpu_with_one_notice(tmp_path, tiny_model_path):
    from rwkv_engine.pipeline.service import CompletionService
    rec = Recorder()
    svc = CompletionService(fast_config(tmp_path, model=str(tiny_model_path), device="cuda"), on_event=rec.on_event)
    svc.start()
    try:
        assert rec.ready.wait(WAIT)
        assert rec.kinds("error") == [], rec.events
        (warn,) = rec.kinds("warning")
        assert "CUDA" in warn["message"] and "CPU" in warn["message"]
        assert rec.kinds("ready")[0]["device"] == "cpu"
        assert run_one(svc, rec)["candidates"]
        assert len(rec.kinds("warning")) == 1
    finally:
        svc.close()


class OomModel:
    """A model whose forward raises a CUDA out-of-memory error when ``when(tokens)``."""

    def __init__(self, inner, when, exc, device=None):
        self._inner, self._when, self._exc = inner, when, exc
        self.device = torch.device(device) if device else inner.device
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def forward(self, tokens, state=None):
        self.calls += 1
        if self._when(tokens):
            raise self._exc("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self._inner.forward(tokens, state)


OOM_ERRORS = [torch.cuda.OutOfMemoryError, RuntimeError]


@pytest.mark.parametrize("exc", OOM_ERRORS, ids=["OutOfMemoryError", "RuntimeError"])
def test_out_of_memory_retries_with_fewer_candidates(exc, tmp_path, tiny_model):
    from rwkv_engine.pipeline.service import CompletionService
    model = OomModel(tiny_model, lambda t: t.shape[0] > 1, exc)       # only batched decode fails
    rec = Recorder()
    svc = CompletionService(fast_config(tmp_path, candidates=4), on_event=rec.on_event, model=model)
    svc.start()
    try:
        assert rec.ready.wait(WAIT)
        res = run_one(svc, rec)
        assert len(res["candidates"]) == 1 and res["stats"]["decoded_tokens"] > 0
        assert rec.kinds("error") == []
        (warn,) = rec.kinds("warning")
        assert "memory" in warn["message"] and "1 candidate" in warn["message"]
        run_one(svc, rec, rid=2)                                      # remembered: no new warning
        assert len(rec.kinds("warning")) == 1 and rec.kinds("error") == []
    finally:
        svc.close()


@pytest.mark.parametrize("exc", OOM_ERRORS, ids=["OutOfMemoryError", "RuntimeError"])
def test_out_of_memory_on_the_gpu_falls_back_to_cpu_with_one_notice(exc, tmp_path, tiny_model, tiny_model_path):
    from rwkv_engine.pipeline.service import CompletionService
    # a "GPU" model (meta device: no tensor is ever made on it) that is always out of memory
    model = OomModel(tiny_model, lambda t: True, exc, device="meta")
    rec = Recorder()
    svc = CompletionService(fast_config(tmp_path, candidates=2, model=str(tiny_model_path)),
                            on_event=rec.on_event, model=model)
    svc.start()
    try:
        assert rec.ready.wait(WAIT)
        res = run_one(svc, rec)
        assert res["candidates"] and rec.kinds("error") == [], rec.events
        notes = [w["message"] for w in rec.kinds("warning")]
        assert sum("CPU" in m for m in notes) == 1, notes
        st = svc.status()
        assert st["device"] == "cpu" and st["loaded"] and st["error"] is None
        run_one(svc, rec, rid=2)
        assert [w["message"] for w in rec.kinds("warning")] == notes
    finally:
        svc.close()


# -- kernel build failure -----------------------------------------------------------------
KERNEL_PROBE = r"""
import sys, threading, warnings, torch
warnings.simplefilter("always")
import rwkv_engine
from rwkv_engine.pipeline.config import EngineConfig
from rwkv_engine.pipeline.service import CompletionService
path = sys.argv[1]
events = []
ready = threading.Event()
def on_event(kind, info):
    events.append((kind, info))
    if kind in ("ready", "error"):
        ready.set()
svc = CompletionService(EngineConfig(model=path, device="cpu", cache_disk_mb=0), on_event=on_event)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    svc.start()
    assert ready.wait(300), events
svc.close()
torch.manual_seed(0)
tokens = torch.randint(0, 65536, (2, 17))
fast = rwkv_engine.load_model(path)                        # kernel path (falls back)
ref = rwkv_engine.load_model(path, use_kernel=False)       # torch reference
a, sa = fast.forward(tokens, None)
b, sb = ref.forward(tokens, None)
assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(sa.wkv, sb.wkv))
kinds = [k for k, _ in events]
assert "error" not in kinds, events
notes = [i["message"] for k, i in events if k == "warning"]
assert len(notes) == 1 and "kernel" in notes[0], events
print("OK", notes[0])
"""


@pytest.mark.parametrize("how", ["broken_compiler", "unwritable_dir"])
def test_kernel_build_failure_warns_once_and_results_stay_correct(how, tmp_path, tiny_model_path):
    env = dict(os.environ, RWKV_NVIM_KERNEL_DIR=str(tmp_path / "kernels"))
    env.pop("RWKV_NVIM_NO_KERNEL", None)
    if how == "broken_compiler":
        env["CXX"] = "false"
    else:
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("")
        env["RWKV_NVIM_KERNEL_DIR"] = str(blocker / "kernels")      # mkdir fails: ENOTDIR
    proc = subprocess.run([sys.executable, "-c", KERNEL_PROBE, str(tiny_model_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("OK")


# -- disk cache unwritable / corrupted ------------------------------------------------------


def test_unwritable_disk_cache_one_warning_and_suggestions_continue(tmp_path, tiny_model_path):
    from rwkv_nvim.bridge import Bridge
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    nv = FakeNvim()
    bridge = Bridge(nv)
    try:
        bridge.start({"model": str(tiny_model_path), "device": "cpu", "cache_dir": str(blocker / "cache"),
                      "candidates": 2, "max_tokens": 3, "cache_disk_mb": 16}, {"debug": False})
        import time
        deadline = time.monotonic() + WAIT
        while not nv.events("ready") and not nv.events("error") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert nv.events("ready") and not nv.events("error"), nv.sent
        for rid in (1, 2, 3):
            bridge.request(make_request(SOURCE_LINES[:12], 9, rid=rid))
        while not [a for c, a in nv.sent if "on_done" in c and a[0]["id"] == 3] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [a for c, a in nv.sent if "on_done" in c and a[0]["id"] == 3]
        warns = nv.events("warning")
        assert len(warns) == 1 and "disk" in warns[0]["message"], warns
        assert not nv.events("error")
    finally:
        bridge.close()


def test_corrupted_disk_cache_files_one_warning_then_misses(tmp_path, tiny_model):
    from rwkv_nvim.bridge import Bridge
    from rwkv_engine.pipeline.state_cache import Snapshot, StateCache
    nv = FakeNvim()
    bridge = Bridge(nv)                     # forwards engine warnings to Lua
    try:
        cache = StateCache(tiny_model.model_id, "cpu", 1 << 20, 1 << 20, 16 << 20, tmp_path / "states")
        logits, state = tiny_model.forward(torch.tensor([[1, 2, 3]]), None)
        keys = [f"{i:032x}" for i in range(3)]
        for k in keys:
            cache.put(k, Snapshot(state, logits, 3), persist=True)
        for p in (tmp_path / "states").iterdir():
            p.write_bytes(p.read_bytes()[:100] + b"garbage")
        fresh = StateCache(tiny_model.model_id, "cpu", 1 << 20, 1 << 20, 16 << 20, tmp_path / "states")
        assert [fresh.get(k) for k in keys] == [None, None, None]     # misses, no exception
        assert list((tmp_path / "states").iterdir()) == []             # corrupt files are gone
        warns = nv.events("warning")
        assert len(warns) == 1 and "unreadable" in warns[0]["message"], warns
    finally:
        bridge.close()


# -- the editor: missing model, no CUDA + unusable cache, a dead host ----------------------------
@pytest.mark.nvim
def test_editor_missing_model_one_error_then_quiet(tmp_path, tiny_model_path):
    require_nvim()
    missing = tmp_path / "gone.pth"
    s = start_nvim(tmp_path / "nv", live_opts(missing, tmp_path))
    try:
        fresh_buffer(s)
        s.feed("ix = 1")
        s.wait_for("require('rwkv').status().error ~= nil", timeout=WAIT, what="the load error")
        s.feed("<CR>y = 2<CR>z")
        s.settle()
        s.lua("vim.wait(300)")
        errs = [m for m in s.messages().splitlines() if "gone" in m and "not found" in m]
        assert len(errs) == 1 and "Traceback" not in s.messages(), s.messages()
        assert s.lua("return require('rwkv').statusline()") == "rwkv:err"
        s.feed("<Esc>")
        s.cmd("RwkvStatus")
        assert "gone" in s.messages().splitlines()[-1] or "gone" in s.messages()
        assert s.buffer_text() == "x = 1\ny = 2\nz"
    finally:
        s.close()


@pytest.mark.nvim
def test_editor_no_cuda_bad_cache_dir_then_host_dies(tmp_path, tiny_model_path):
    require_nvim()
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    opts = live_opts(tiny_model_path, tmp_path, cache_dir=str(blocker), cache_disk_mb=8,
                     device="auto" if torch.cuda.is_available() else "cuda")
    s = start_nvim(tmp_path / "nv", opts)
    try:
        fresh_buffer(s)
        s.feed("idef f(x):<CR>return ")
        s.lua(f"{SUGGEST}.trigger()")
        wait_done(s)
        warns = [m for m in s.messages().splitlines() if m.startswith("rwkv:") and ("CPU" in m or "disk" in m)]
        assert len(warns) == (1 if torch.cuda.is_available() else 2), s.messages()
        assert s.lua("return require('rwkv').status().device") == "cpu" or torch.cuda.is_available()
        assert not s.errors_in_messages(), s.messages()
        # the Python host dies: the editor keeps working, one notice, :RwkvStatus says why
        pid = s.lua("return vim.fn.jobpid(vim.fn['remote#host#Require']('python3'))")
        os.kill(pid, signal.SIGKILL)
        s.wait_for("not require('rwkv.host').host_alive()", timeout=30)
        s.feed("<CR>y = 1<CR>z = 2")
        s.settle()
        s.lua("vim.wait(300)")
        s.feed("<Esc>")
        assert [ln.strip() for ln in s.nvim.current.buffer[-2:]] == ["y = 1", "z = 2"]
        notices = [m for m in s.messages().splitlines() if "suggestions stopped" in m]
        assert len(notices) == 1 and not s.errors_in_messages(), s.messages()
        assert s.lua("return require('rwkv').statusline()") == "rwkv:err"
        s.cmd("RwkvStatus")
        assert "python3 host exited" in s.messages()
        assert "Traceback" not in host_log_text(s.root)
    finally:
        s.close()
