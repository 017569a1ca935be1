"""Issue 11, part 3: one error path from the engine to the editor.

- the host bridge formats errors with the engine's formatter, also when the engine
  package itself cannot be imported;
- a malformed request is the caller's fault (MalformedRequest, only the result says
  so); every other failure of a request (CheckpointError, TokenizerError and plain
  ValueErrors included) is an engine failure: logged with its traceback, an "error"
  event, status()["last_error"] with its time, and the result's "error";
- load_model blames the file only for what is the file's fault;
- a failed load is retried by a start with the same options (a successful one is not);
- idle priming that raises stops with one warning instead of spinning.

Editor-level checks of the same path are in test_nvim_errors.py.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch

import rwkv_engine
from rwkv_engine.core.checkpoint import CheckpointError
from rwkv_engine.core.errors import one_line
from rwkv_engine.core.tokenizer import TokenizerError
from rwkv_engine.pipeline.prompt_layout import MalformedRequest, validate_request
from rwkv_engine.pipeline.service import CompletionService

from nvim_harness import REPO
from pipeline_fixtures import Recorder, SOURCE_LINES, fast_config, make_request, one_torch_thread  # noqa: F401
from rwkv_engine.core.random_checkpoint import make_state_dict
from reliability_helpers import FakeNvim, bridge_module

WAIT = 120.0
BUILD_LOG = ("Error building extension 'wkv7_cpu'\n[1/2] c++ -c wkv7_cpu.cpp\n"
             "FAILED: wkv7_cpu.o\n/x/wkv7_cpu.cpp:12:3: error: 'foo' was not declared in this scope\n")


def wait_until(cond, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True






# -- 1. one formatter ---------------------------------------------------------------------
def test_the_bridge_formats_with_the_engine_formatter():
    bridge = bridge_module()
    assert bridge.one_line(RuntimeError(BUILD_LOG)) == one_line(RuntimeError(BUILD_LOG)) \
        == "/x/wkv7_cpu.cpp:12:3: error: 'foo' was not declared in this scope"
    assert bridge.one_line(KeyError()) == "KeyError"
    import rwkv_engine.core.errors as errors
    assert bridge._load_errors_module() is errors


UNIMPORTABLE = r"""
import importlib.util, shutil, sys, threading, pathlib
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path = [p for p in sys.path if not p.startswith({repo!r}) or p.startswith(sys.prefix)]
assert importlib.util.find_spec("rwkv_engine") is None, "could not hide the installed package"
sys.path.insert(0, {rplugin!r})
from rwkv_nvim import bridge
engine = pathlib.Path({engine!r})
bridge.PLUGIN_ROOT, bridge.ERRORS_FILE = engine.parent, engine / "core" / "errors.py"

class Nvim:
    sent = []
    def async_call(self, fn, *a): fn(*a)
    def exec_lua(self, code, *args, async_=False): self.sent.append(args)

nv = Nvim()
b = bridge.Bridge(nv)
b.start({{}})
for t in threading.enumerate():
    if t.name == "rwkv-start":
        t.join(60)
print(nv.sent[-1][1]["message"])
print(b.status()["error"])
print(getattr(bridge._errors_module, "__file__", None))
"""


@pytest.mark.parametrize("errors_file", [True, False], ids=["errors.py_reachable", "no_engine_at_all"])
def test_an_unimportable_engine_is_reported_by_the_same_formatter(tmp_path, errors_file):
    # an rwkv_engine/ whose package import fails with a multi-line message: the engine's
    # formatter picks the line naming the error, a first-line formatter would not
    engine = tmp_path / "root" / "rwkv_engine"
    (engine / "core").mkdir(parents=True)
    if errors_file:
        (engine / "__init__.py").write_text(
            'raise ImportError("while importing rwkv_engine\\nerror: torch is missing")\n')
        shutil.copy(REPO / "rwkv_engine" / "core" / "errors.py", engine / "core" / "errors.py")
    code = UNIMPORTABLE.format(repo=str(REPO), rplugin=str(REPO / "rplugin" / "python3"), engine=str(engine))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    event, status, formatter = out.stdout.splitlines()
    if errors_file:
        assert event == "cannot import the engine (error: torch is missing); see :checkhealth rwkv"
        assert formatter == str(engine / "core" / "errors.py")
    else:   # nothing to share: still one line
        assert event == "cannot import the engine (No module named 'rwkv_engine'); see :checkhealth rwkv"
        assert formatter == "None"
    assert status == event


def test_the_plugin_entry_still_imports_no_engine():
    code = ("import sys; sys.path.insert(0, 'rplugin/python3'); import rwkv_nvim; "
            "print([m for m in ('torch', 'numpy', 'rwkv_engine') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- 2. malformed request vs engine failure ------------------------------------------------
@pytest.fixture
def service(tiny_model, tmp_path):
    rec = Recorder()
    svc = CompletionService(fast_config(tmp_path, max_tokens=3), on_event=rec.on_event, model=tiny_model)
    svc.start()
    assert rec.ready.wait(WAIT)
    yield svc, rec
    svc.close()


def run(svc, rec, request):
    rec.finished.clear()
    svc.submit(request, None, rec.on_done)
    assert rec.finished.wait(WAIT), rec.events
    return rec.done[-1]


def test_validate_request_raises_malformed_request():
    with pytest.raises(MalformedRequest, match="outside") as info:
        validate_request({"lines": ["a"], "first": 0, "row": 3, "col": 0})
    assert isinstance(info.value, ValueError)
    assert not issubclass(CheckpointError, MalformedRequest) and not issubclass(TokenizerError, MalformedRequest)


def test_a_malformed_request_is_only_reported_in_its_result(service, caplog):
    svc, rec = service
    caplog.set_level(logging.INFO, logger="rwkv_engine")
    res = run(svc, rec, {"id": 5, "lines": ["x"], "first": 0, "row": 4, "col": 0})
    assert res["id"] == 5 and res["candidates"] == [] and "outside" in res["error"]
    assert rec.kinds("error") == [] and svc.status()["last_error"] is None
    assert not [r for r in caplog.records if r.exc_info]
    assert run(svc, rec, make_request(SOURCE_LINES[:12], 9, rid=6))["candidates"]   # the next one works


ENGINE_FAILURES = [
    CheckpointError("/m/model.pth: truncated or corrupt checkpoint"),
    TokenizerError("vocabulary has no token for byte 0xff"),
    ValueError("token id out of range for vocabulary size 65536"),       # forward's own check
    RuntimeError("CUDA error: an illegal memory access was encountered\nCompile with TORCH_USE_CUDA_DSA"),
]


@pytest.mark.parametrize("error", ENGINE_FAILURES, ids=lambda e: type(e).__name__)
def test_every_other_failure_is_an_engine_failure(service, monkeypatch, caplog, error):
    svc, rec = service
    caplog.set_level(logging.ERROR, logger="rwkv_engine")
    real = svc._completer.complete

    def boom(*a, **k):
        raise error
    monkeypatch.setattr(svc._completer, "complete", boom)
    assert svc.status()["last_error"] is None
    t0 = time.time()
    res = run(svc, rec, make_request(SOURCE_LINES[:12], 9, rid=1))
    msg = one_line(error)
    assert res["error"] == msg and res["candidates"] == [] and "\n" not in msg
    assert rec.kinds("error") == [{"message": msg}]
    last = svc.status()["last_error"]
    assert last["message"] == msg and t0 <= last["time"] <= time.time()
    logged = [r for r in caplog.records if r.name == "rwkv_engine" and r.exc_info]
    assert logged and logged[-1].exc_info[1] is error                  # with its traceback
    monkeypatch.setattr(svc._completer, "complete", real)             # the worker survives
    assert run(svc, rec, make_request(SOURCE_LINES[:12], 9, rid=2))["candidates"]
    assert svc.status()["last_error"] == last                         # kept until the next failure


# -- 3. load_model blames the file only for the file ----------------------------------------
def _raising_model(monkeypatch, error):
    import rwkv_engine.core.model as model_mod

    def fail(*a, **k):
        raise error
    monkeypatch.setattr(model_mod, "RWKV7", fail)


def test_no_kernel_image_is_not_the_files_fault(monkeypatch, tiny_model_path):
    _raising_model(monkeypatch, RuntimeError(
        "CUDA error: no kernel image is available for execution on the device\n"
        "CUDA kernel errors might be asynchronously reported at some other API call"))
    with pytest.raises(RuntimeError) as info:
        rwkv_engine.load_model(tiny_model_path)
    assert not isinstance(info.value, CheckpointError)
    msg = str(info.value)
    assert msg == ("could not put the model tiny.pth on cpu: "
                   "CUDA error: no kernel image is available for execution on the device")


@pytest.mark.parametrize("text", ["something unexpected happened", "HIP error: invalid device function"])
def test_other_runtime_errors_say_the_device_not_the_file(monkeypatch, tiny_model_path, text):
    _raising_model(monkeypatch, RuntimeError(text))
    with pytest.raises(RuntimeError, match="could not put the model") as info:
        rwkv_engine.load_model(tiny_model_path)
    assert not isinstance(info.value, CheckpointError) and text in str(info.value)


def test_out_of_memory_while_building_is_re_raised_as_is(monkeypatch, tiny_model_path):
    error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    _raising_model(monkeypatch, error)
    with pytest.raises(torch.cuda.OutOfMemoryError) as info:
        rwkv_engine.load_model(tiny_model_path)
    assert info.value is error


def test_a_missing_tensor_is_the_files_fault(monkeypatch, tiny_model_path):
    _raising_model(monkeypatch, KeyError("blocks.1.att.x_r"))
    with pytest.raises(CheckpointError, match=r"tiny\.pth: .*missing 'blocks\.1\.att\.x_r'"):
        rwkv_engine.load_model(tiny_model_path)


def test_a_tensor_of_the_wrong_size_is_the_files_fault(tmp_path):
    sd = make_state_dict()
    sd["blocks.1.att.x_k"] = torch.zeros(1, 1, 256)        # n_embd is 128: infer_shape does not look
    p = tmp_path / "badsize.pth"
    torch.save(sd, p)
    with pytest.raises(CheckpointError, match="badsize.pth: cannot build the model") as info:
        rwkv_engine.load_model(p)
    assert "\n" not in str(info.value)


# -- 4. a failed load is retried by the same options -----------------------------------------
def test_a_failed_load_is_retried_with_the_same_options_and_a_good_one_is_not(tmp_path, tiny_model_path):
    bridge = bridge_module()
    later = tmp_path / "later.pth"
    opts = {"model": str(later), "device": "cpu", "cache_dir": str(tmp_path / "cache"),
            "candidates": 2, "max_tokens": 3}
    nv = FakeNvim()
    b = bridge.Bridge(nv)
    try:
        b.start(opts)
        assert wait_until(lambda: nv.events("error") and not b._starting), nv.sent
        assert "later" in b.status()["error"] and not b.status()["loaded"]
        failed = b._running()
        b.start(dict(opts))
        assert wait_until(lambda: len(nv.events("error")) == 2 and not b._starting), nv.sent   # tried again
        assert len(nv.events("loading")) == 2 and b._running() is not failed
        shutil.copy(tiny_model_path, later)                                    # the model arrives
        b.start(dict(opts))
        assert wait_until(lambda: nv.events("ready")), nv.sent
        st = b.status()
        assert st["loaded"] and st["error"] is None
        assert "later" in st["last_error"]["message"]                          # still the last one
        loaded = b._running()
        b.start(dict(opts))                                                    # loaded: a no-op
        time.sleep(0.3)
        assert b._running() is loaded and len(nv.events("loading")) == 3
    finally:
        b.close()


# -- 5. priming that fails stops with one warning ---------------------------------------------
def test_priming_that_raises_stops_with_one_warning(service, monkeypatch):
    svc, rec = service
    calls = []

    def broken(should_stop=None):
        calls.append(1)
        raise RuntimeError("prime exploded\nsecond line")
    monkeypatch.setattr(svc._completer, "prime_step", broken)
    svc.add_chunk("alpha = 1\n", "a.py")
    svc.prime()
    assert wait_until(lambda: calls and not svc._prime_wanted)
    time.sleep(0.5)                                   # a spinning worker would call it again
    assert len(calls) == 1
    warns = rec.kinds("warning")
    assert warns == [{"message": "idle priming stopped: prime exploded"}], rec.events
    assert rec.kinds("error") == []
    assert svc.status()["last_error"]["message"] == "idle priming: prime exploded"
    svc.prime()                                       # stays off: no second failure, no warning
    time.sleep(0.3)
    assert len(calls) == 1 and len(rec.kinds("warning")) == 1
    assert run(svc, rec, make_request(SOURCE_LINES[:12], 9, rid=3))["candidates"]   # requests still run


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_a_gpu_that_cannot_run_the_model_falls_back_to_the_cpu_once(monkeypatch, tiny_model_path, device):
    """"no kernel image is available" (a torch build without this GPU's architecture) is
    the GPU's fault, not the file's: the model runs on the CPU, with one warning saying why."""
    from rwkv_engine.core import model as model_mod
    from rwkv_engine.pipeline.config import EngineConfig
    from rwkv_engine.pipeline.loading import load_configured_model

    real = model_mod.load_model

    def fake(path, device="cpu", dtype=None, **kw):
        if str(device).startswith("cuda"):
            raise RuntimeError("could not put the model tiny.pth on cuda: CUDA error: no kernel image "
                               "is available for execution on the device")
        return real(path, device=device, dtype=dtype, **kw)

    monkeypatch.setattr(model_mod, "load_model", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    warnings = []
    m = load_configured_model(EngineConfig(model=str(tiny_model_path), device=device), warnings.append)
    assert m.device.type == "cpu"
    assert len(warnings) == 1 and "no kernel image" in warnings[0] and "CPU" in warnings[0]
