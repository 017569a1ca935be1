"""The backend interface (rwkv_engine/pipeline/backend.py): the local engine and both server
protocols implement ``CompletionBackend``; the service runs a backend it has never heard of
(registered through the factory) and never asks a backend's name."""
from __future__ import annotations

import ast
import inspect
import re
import threading
from pathlib import Path

import pytest

from pipeline_fixtures import Recorder, SOURCE_LINES, fast_config, make_request, one_torch_thread  # noqa: F401
from rwkv_engine.pipeline import backend
from rwkv_engine.pipeline.backend import (BackendKind, CompletionBackend, Description, SwitchesModel, backend_kind,
                                          register_backend)
from rwkv_engine.pipeline.completer import Completer
from rwkv_engine.pipeline.config import BACKENDS, EngineConfig
from rwkv_engine.pipeline.remote_backend import LlamaServerBackend, OpenAICompatBackend, server_backend
from rwkv_engine.pipeline.service import CompletionService

WAIT = 60.0
PIPELINE = Path(backend.__file__).resolve().parent
INTERFACE = ["accept", "add_chunk", "cache_stats", "close", "complete", "describe", "prime_step", "warm_up"]


def server_config(kind: str) -> EngineConfig:
    return EngineConfig(backend=kind, url="http://127.0.0.1:9", candidates=2)


def wait_until(cond, timeout=WAIT) -> bool:
    pause = threading.Event()
    for _ in range(int(timeout / 0.02)):
        if cond():
            return True
        pause.wait(0.02)
    return cond()


# -- both backends are the interface -----------------------------------------------------------
def test_the_interface_is_what_the_service_calls():
    methods = sorted(n for n, v in vars(CompletionBackend).items() if callable(v) and not n.startswith("_"))
    assert methods == INTERFACE
    assert "primes_neighbours_when_idle" in CompletionBackend.__annotations__


@pytest.mark.parametrize("cls", [Completer, LlamaServerBackend, OpenAICompatBackend], ids=lambda c: c.__name__)
def test_every_backend_has_the_interfaces_signatures(cls):
    for name in INTERFACE:
        want = inspect.signature(getattr(CompletionBackend, name))
        got = inspect.signature(getattr(cls, name))
        shape = [(p.name, p.kind, p.default) for p in got.parameters.values()]
        assert shape == [(p.name, p.kind, p.default) for p in want.parameters.values()], (cls, name)
    assert isinstance(cls.primes_neighbours_when_idle, bool)


def test_the_local_engine_and_the_servers_are_backends(tiny_model, tmp_path):
    local = Completer(fast_config(tmp_path), model=tiny_model)
    servers = [server_backend(server_config("llama.cpp")), server_backend(server_config("openai"))]
    try:
        assert isinstance(local, CompletionBackend) and isinstance(local, SwitchesModel)
        assert [type(s) for s in servers] == [LlamaServerBackend, OpenAICompatBackend]
        for s in servers:
            assert isinstance(s, CompletionBackend) and not isinstance(s, SwitchesModel)
        assert local.primes_neighbours_when_idle and not any(s.primes_neighbours_when_idle for s in servers)
        for b in [local, *servers]:
            about = b.describe()
            assert sorted(about) == sorted(Description.__annotations__)
            assert all(isinstance(v, str) for v in about.values()), about
        about = local.describe()
        assert re.fullmatch(r"q8: (avx512-vnni|avx512bw|avx2|neon-dotprod|neon|scalar)", about.pop("cpu_kernels"))
        assert about == {"model": "default", "path": str(tiny_model.path), "device": "cpu",
                         "dtype": "float32", "precision": "float32", "precision_why": ""}
        assert servers[1].describe() == {"model": "openai server http://127.0.0.1:9", "path": "http://127.0.0.1:9",
                                         "device": "remote", "dtype": "n/a", "precision": "n/a",
                                         "precision_why": "", "cpu_kernels": ""}
    finally:
        for s in servers:
            s.close()


def test_the_factory_knows_the_options_values_and_nothing_else():
    assert backend_kind(EngineConfig()).loading_label(EngineConfig(model="g1-0.1b")) == "g1-0.1b"
    assert backend_kind(server_config("openai")).loading_label(server_config("openai")) == "openai server"
    odd = EngineConfig()
    odd.backend = "nowhere"                  # past the option schema, which would refuse it
    with pytest.raises(ValueError, match=r"engine option backend = 'nowhere': must be one of 'local', "):
        backend_kind(odd)
    with pytest.raises(ValueError, match="not a server backend"):
        server_backend(EngineConfig())


def test_closing_the_local_engine_drops_its_states_in_memory(completer_factory):
    c = completer_factory()
    req = make_request(SOURCE_LINES[:12], 9)
    c.complete(req)
    held = lambda: c.cache_stats()["device"]["entries"] + c.cache_stats()["host"]["entries"]  # noqa: E731
    assert held() > 0
    c.close()
    assert held() == 0
    assert c.complete(req)["candidates"] is not None        # cold, but it still serves


def test_warming_up_the_local_engine_warns_once_without_the_kernel(completer_factory, monkeypatch):
    from rwkv_engine.core import kernel_loader
    warnings, progress = [], []
    c = completer_factory()
    c.on_warning = warnings.append
    monkeypatch.setattr(c.model, "use_kernel", True)
    monkeypatch.setattr(kernel_loader, "kernels_disabled", lambda: False)

    def get_wkv7(device, progress=None):
        progress("building the WKV-7 kernel")
        return None

    monkeypatch.setattr(kernel_loader, "get_wkv7", get_wkv7)
    monkeypatch.setattr(kernel_loader, "kernel_status", lambda: {"cpu": "failed: no compiler"})
    monkeypatch.setattr(kernel_loader, "backend_for", lambda device: "cpu")
    c.warm_up(on_progress=progress.append)
    assert progress == ["building the WKV-7 kernel"]
    assert warnings == ["WKV-7 kernel unavailable, using the slower torch reference: no compiler"]


# -- the service never asks which backend it runs ----------------------------------------------
def test_the_service_never_reads_the_backend_option():
    tree = ast.parse((PIPELINE / "service.py").read_text(encoding="utf-8"))
    attrs = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "backend"]
    names = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in BACKENDS]
    assert not attrs and not names, f"service.py names a backend at lines {attrs + names}"


@pytest.mark.parametrize("module", ["server_backend.py", "llama_server.py", "openai_compat.py"])
def test_the_server_protocols_never_branch_on_the_backend_option(module):
    tree = ast.parse((PIPELINE / "remote_backend" / module).read_text(encoding="utf-8"))
    assert not [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "backend"]


class EchoBackend:
    """A backend the service has never heard of: its candidate repeats the cursor line."""

    def __init__(self, primes: bool, answers: bool):
        self.primes_neighbours_when_idle = primes
        self.answers = answers               # False: warm_up fails (a server not up yet)
        self.calls, self.closed = [], False

    def warm_up(self, on_progress=None) -> None:
        on_progress("echo: listening")
        if not self.answers:
            raise ConnectionError("echo: nobody answers yet")

    def complete(self, request, on_partial=None, should_stop=None):
        line = request["lines"][request["row"] - request["first"]]
        on_partial(line[:3])
        return {"id": request["id"], "candidates": [{"text": line, "logprob": 0.0}], "stats": {"echoed": 1}}

    def prime_step(self, should_stop=None) -> bool:
        self.calls.append("prime_step")
        return False

    def accept(self, request_id, text) -> bool:
        self.calls.append(("accept", request_id, text))
        return True

    def add_chunk(self, text, filename="") -> bool:
        self.calls.append(("add_chunk", filename))
        return True

    def cache_stats(self) -> dict:
        return {"echo": {"calls": len(self.calls)}}

    def describe(self) -> dict:
        return {"model": "echo model", "path": "echo://here", "device": "echo-device", "dtype": "text",
                "precision": "exact", "precision_why": "it repeats the line", "cpu_kernels": ""}

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def echo(monkeypatch):
    """Registers the kind "echo"; yields the list of the backends it built."""
    monkeypatch.setattr(backend, "_KINDS", dict(backend._KINDS))
    built, settings = [], {"primes": True, "answers": True}

    def build(config, on_warning, model):
        built.append(EchoBackend(**settings))
        return built[-1]

    register_backend("echo", BackendKind(lambda config: "echo, starting", build))
    return built, settings


def echo_service(**overrides):
    config = fast_config(None, **overrides)
    config.backend = "echo"                  # the option schema lists the built-in kinds only
    rec = Recorder()
    svc = CompletionService(config, on_event=rec.on_event)
    svc.start()
    return svc, rec


def test_the_service_runs_a_backend_it_does_not_know(echo):
    built, _ = echo
    svc, rec = echo_service(prime_after_ms=20)
    try:
        assert rec.ready.wait(WAIT)
        assert [k for k, _ in rec.events] == ["loading", "progress", "ready"], rec.events
        assert rec.events[0][1] == {"model": "echo, starting"}
        ready = rec.events[2][1]
        assert {k: ready[k] for k in ("model", "path", "device", "dtype", "precision")} == {
            "model": "echo model", "path": "echo://here", "device": "echo-device", "dtype": "text",
            "precision": "exact"}
        (b,) = built
        svc.add_chunk("x = 1\n", "other.py")
        svc.submit(make_request(SOURCE_LINES[:12], 9, rid=4), rec.on_partial, rec.on_done)
        assert rec.finished.wait(WAIT)
        assert rec.done[0]["candidates"] == [{"text": SOURCE_LINES[9], "logprob": 0.0}]
        assert rec.partials == [{"id": 4, "text": SOURCE_LINES[9][:3]}]
        svc.accept(4, SOURCE_LINES[9])
        # primes_neighbours_when_idle: prime_after_ms after the suggestion, unasked
        assert wait_until(lambda: "prime_step" in b.calls and ("accept", 4, SOURCE_LINES[9]) in b.calls), b.calls
        assert b.calls[0] == ("add_chunk", "other.py")
        st = svc.status()
        assert st["loaded"] and st["model"] == "echo model" and st["device"] == "echo-device"
        assert st["precision_why"] == "it repeats the line" and st["last"] == {"echoed": 1}
        assert st["cache"]["echo"]["calls"] >= 1
    finally:
        svc.close()
    assert b.closed


def test_a_backend_that_does_not_prime_neighbours_is_primed_only_when_asked(echo):
    built, settings = echo
    settings["primes"] = False
    svc, rec = echo_service(prime_after_ms=20)
    try:
        assert rec.ready.wait(WAIT)
        svc.submit(make_request(SOURCE_LINES[:12], 9), None, rec.on_done)
        assert rec.finished.wait(WAIT)
        assert not wait_until(lambda: "prime_step" in built[0].calls, timeout=0.5)
        svc.prime()                          # the editor's CursorHold
        assert wait_until(lambda: "prime_step" in built[0].calls)
    finally:
        svc.close()


def test_a_backend_that_cannot_warm_up_is_ready_with_its_first_answer(echo):
    built, settings = echo
    settings["answers"] = False
    svc, rec = echo_service()
    try:
        assert rec.ready.wait(WAIT)
        assert [k for k, _ in rec.events] == ["loading", "progress", "error"], rec.events
        assert rec.events[-1][1]["message"] == "echo: nobody answers yet"
        st = svc.status()
        assert not st["loaded"] and st["device"] == "echo-device" and st["model"] == "echo model"
        svc.submit(make_request(SOURCE_LINES[:12], 9), None, rec.on_done)
        assert rec.finished.wait(WAIT) and rec.done[0]["candidates"]
        assert wait_until(lambda: rec.kinds("ready"))
        assert svc.status()["loaded"] and svc.status()["error"] is None
    finally:
        svc.close()
    assert built[0].closed
