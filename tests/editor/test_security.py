"""Issue 8, security: checkpoints never run code, caches are private, no network unless
a download is asked for, buffer text is never logged unless debug logging is on."""
from __future__ import annotations

import os
import socket
import stat
import sys
import threading
from pathlib import Path

import pytest
import torch

import rwkv_engine
from rwkv_engine.core.checkpoint import CheckpointError
from nvim_harness import REPO, require_nvim, shared_kernel_dir, start_nvim
from pipeline_fixtures import SOURCE_LINES, fast_config, make_request, one_torch_thread  # noqa: F401
from reliability_helpers import SUGGEST, fresh_buffer, host_log_text, live_opts, wait_done

sys.path.insert(0, str(REPO / "rplugin" / "python3"))

WAIT = 120.0


# -- checkpoints load with weights_only=True ------------------------------------------------
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


class _CustomClass:                       # a class torch's weights_only unpickler does not allow
    pass


@pytest.mark.parametrize("payload", ["exec", "custom_class", "nested"])
def test_checkpoint_that_would_run_code_is_refused(payload, tmp_path, tiny_model_path):
    marker = tmp_path / "pwned"
    sd = torch.load(tiny_model_path, weights_only=True)
    if payload == "exec":
        sd["blocks.0.att.evil"] = _RunsCode(str(marker))
    elif payload == "custom_class":
        sd["meta"] = _CustomClass()
    else:
        sd["meta"] = {"a": [1, {"b": _RunsCode(str(marker))}]}
    p = tmp_path / f"{payload}.pth"
    torch.save(sd, p)
    with pytest.raises(CheckpointError) as ei:
        rwkv_engine.load_model(p)
    assert "refused" in str(ei.value) and "\n" not in str(ei.value)
    assert not marker.exists()


def test_every_torch_load_uses_weights_only(monkeypatch, tiny_model_path):
    seen = []
    real = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    rwkv_engine.load_model(tiny_model_path)
    assert seen and all(w is True for w in seen)
    # and no engine module calls pickle / torch.load any other way
    for py in (REPO / "rwkv_engine").rglob("*.py"):
        text = py.read_text()
        assert "pickle.load" not in text, py
        for line in text.splitlines():
            if "torch.load(" in line and not line.lstrip().startswith(("#", '"', "'")):
                assert "weights_only=True" in line, (py, line)


# -- private caches -------------------------------------------------------------------------
def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_state_disk_cache_dirs_0700_files_0600(tmp_path, tiny_model):
    from rwkv_engine.pipeline.completer import Completer
    root = tmp_path / "xdg" / "deep" / "rwkv.nvim"          # missing parents are created private
    old = os.umask(0o022)
    try:
        c = Completer(fast_config(tmp_path, cache_dir=str(root), ring_chunk_size=4), model=tiny_model)
        c.add_chunk("\n".join(SOURCE_LINES[:6]), "other.py")
        while c.prime_step():
            pass
        c.complete(make_request(SOURCE_LINES[:12], 9))
    finally:
        os.umask(old)
    states = root / "states"
    files = [p for p in states.iterdir() if p.is_file()]
    assert files, "no snapshot was written to the disk tier"
    for d in (tmp_path / "xdg", tmp_path / "xdg" / "deep", root, states):
        assert _mode(d) == 0o700, (d, oct(_mode(d)))
    for f in files:
        assert _mode(f) == 0o600, (f, oct(_mode(f)))


def test_kernel_cache_dirs_are_private():
    root = Path(shared_kernel_dir())
    if not root.is_dir():
        pytest.skip("no kernel has been built on this machine yet")
    for d in [root] + [p for p in root.rglob("*") if p.is_dir()]:
        assert _mode(d) & 0o077 == 0, (d, oct(_mode(d)))


def test_kernel_cache_files_are_0600():
    import torch
    from rwkv_engine.core.kernel_loader import get_wkv7
    if get_wkv7(torch.device("cpu")) is None:
        pytest.skip("no CPU kernel can be built here")
    root = Path(shared_kernel_dir())
    if not root.is_dir():
        pytest.skip("no kernel has been built on this machine yet")
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files
    for f in files:
        assert _mode(f) & 0o077 == 0, (f, oct(_mode(f)))


# -- no network ---------------------------------------------------------------------------------
@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return attempts


def test_loading_completing_priming_use_no_network(no_network, tmp_path, tiny_model_path):
    from rwkv_engine.pipeline.service import CompletionService
    events, done = [], threading.Event()
    results = []
    svc = CompletionService(fast_config(tmp_path, model=str(tiny_model_path)),
                            on_event=lambda k, i: events.append((k, i)))
    svc.start()
    try:
        svc.add_chunk("\n".join(SOURCE_LINES[:6]), "other.py")
        svc.prime()
        svc.submit(make_request(SOURCE_LINES[:12], 9), None, lambda r: (results.append(r), done.set()))
        assert done.wait(WAIT), events
        assert results[0]["candidates"] and not [e for e in events if e[0] == "error"]
        svc.accept(results[0]["id"], results[0]["candidates"][0]["text"])
    finally:
        svc.close()
    assert no_network == []


def test_a_model_name_not_downloaded_does_not_download(no_network, tmp_path, monkeypatch):
    from rwkv_engine.pipeline.loading import resolve_model_path
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError) as ei:
        resolve_model_path(fast_config(tmp_path, model="g1-0.1b", download_dir=str(tmp_path / "dl")))
    assert "download" in str(ei.value)
    assert no_network == []


# -- buffer text never logged unless debug ----------------------------------------------------
SECRET = "SECRET_a1b2c3_DO_NOT_LOG"


@pytest.mark.nvim
def test_buffer_text_is_logged_only_with_debug_on(tmp_path, tiny_model_path):
    require_nvim()
    root = tmp_path / "nv"
    opts = live_opts(tiny_model_path, tmp_path)
    env = {"NVIM_PYTHON_LOG_FILE": str(root / "py3log"), "NVIM_PYTHON_LOG_LEVEL": "INFO"}
    s = start_nvim(root, opts, extra_env=env)
    try:
        fresh_buffer(s, [f"token = '{SECRET}'", "", "def use(t):", "    return t", ""])
        s.feed("Goprint(")
        s.lua(f"{SUGGEST}.trigger()")
        wait_done(s)
        s.feed("<Esc>ggyG")                                     # a yank becomes a context chunk
        s.cmd("doautocmd CursorHold")
        s.cmd("RwkvStatus")
        s.feed("Gox = ")
        s.lua(f"{SUGGEST}.trigger()")
        wait_done(s)
        s.feed("<Esc>")
        log_file = Path(s.lua("return vim.fn.stdpath('log')")) / "rwkv.log"
        assert SECRET not in host_log_text(root)
        assert not log_file.exists() or SECRET not in log_file.read_text()
        assert SECRET not in s.messages()
        # debug on: requests are logged (so the check above can see a leak), privately
        opts["debug"] = True
        s.lua("require('rwkv').setup(...)", opts)
        s.feed("Goz = ")
        s.lua(f"{SUGGEST}.trigger()")
        wait_done(s)
        s.feed("<Esc>")
        s.wait_for(f"vim.fn.filereadable({str(log_file)!r}) == 1", timeout=30)
        assert SECRET in log_file.read_text()
        assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
        assert not s.errors_in_messages(), s.messages()
    finally:
        s.close()
