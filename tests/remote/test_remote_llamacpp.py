"""Remote backend against a REAL llama-server (marked ``llamacpp``): an RWKV-7 GGUF made by
our exporter from a random checkpoint, served by llama.cpp's CPU build (bench/llama_cpp.py,
cached in ~/.cache/rwkv.nvim/llama.cpp).

- a request through the llama-server backend returns candidates (n_cmpl, streamed);
- greedy candidates equal the local engine's on the same checkpoint (f32 GGUF);
- the next keystroke re-uses the server's saved state (timings cache_n > 0);
- in headless Neovim: ghost text from the server, <Tab> accepts it, a killed server gives
  one message and the editor keeps working (marked ``nvim`` too).

Skips like tests/core/test_gguf_export.py: without a cached build and RWKV_LLAMA_CPP_BUILD=0,
without cmake/g++, or when the llama.cpp source cannot be downloaded.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e '.[gguf]')")

from pipeline_fixtures import SOURCE_LINES, make_request, type_text  # noqa: E402
from rwkv_engine.core.random_checkpoint import make_state_dict  # noqa: E402
from rwkv_engine.pipeline.config import EngineConfig  # noqa: E402
from rwkv_engine.pipeline.remote_backend import probe, server_backend  # noqa: E402
from llama_build import lc, llama_bins_or_skip  # noqa: E402

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
LINES = SOURCE_LINES[:24]


@pytest.fixture(scope="module")
def llama():
    return lc, llama_bins_or_skip()


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """(checkpoint, f32 GGUF): 2 layers x 128, the full World vocabulary, peaked logits."""
    from rwkv_engine.core.gguf_export import export_gguf
    d = tmp_path_factory.mktemp("remote-llama")
    ckpt = d / "tiny.pth"
    torch.save(make_state_dict(n_layer=2, n_embd=128, seed=11, trained_like=True), str(ckpt))
    gguf_path = d / "tiny-f32.gguf"
    export_gguf(ckpt, gguf_path, "f32")
    return ckpt, gguf_path


def start_server(llama, gguf_path):
    lc, bins = llama
    return lc.Server(gguf_path, bins=bins, ctx=8192, threads=2, extra=["-np", "4"])


@pytest.fixture(scope="module")
def server(llama, model_files):
    srv = start_server(llama, model_files[1])
    yield srv
    srv.close()


def remote_config(url, **kw) -> EngineConfig:
    opts = dict(backend="llama.cpp", url=url, candidates=3, max_tokens=8, max_lines=4, temperature=1.0,
                top_p=1.0, alpha_frequency=0.0, n_prefix=24, n_suffix=8, near_prefix=8, near_suffix=4,
                time_budget_ms=60_000, timeout_first_byte_ms=60_000, timeout_total_ms=120_000)
    opts.update(kw)
    return EngineConfig(**opts)


def test_candidates_from_llama_server(server):
    rc = server_backend(remote_config(server.url))
    parts = []
    res = rc.complete(make_request(LINES, 13), on_partial=parts.append)
    assert res["candidates"] and all(c["text"].strip() for c in res["candidates"])
    assert parts and res["candidates"][0]["text"].startswith(parts[-1])
    info = rc.server
    assert info["fim"] == "rwkv" and info["ids"] is True and info["slots"] == 4
    s = res["stats"]
    assert s["backend"] == "llama.cpp" and s["server_ms"] > 0 and s["prefilled_tokens"] > 0
    assert s["prompt_tokens"] == rc.build_prompt(make_request(LINES, 13)).n_tokens
    assert s["decoded_tokens"] > 0
    p = probe({"backend": "llama.cpp", "url": server.url})
    assert p["ok"] and p["fim"] == "rwkv" and p["ids"] and p["slots"] == 4 and p["model"]


@pytest.mark.parametrize("row,col", [(13, None), (9, 4), (21, 0), (23, None)],
                         ids=["end-of-line", "mid-line", "line-start", "last-line"])
def test_greedy_candidates_equal_the_local_engine(server, model_files, row, col):
    import rwkv_engine
    from rwkv_engine.pipeline.completer import Completer
    from rwkv_engine.pipeline.prompt_layout import PromptBuilder

    ckpt, _ = model_files
    greedy = dict(temperature=0.0, alpha_frequency=0.0, alpha_presence=0.0, candidates=2, max_tokens=24)
    local = Completer(remote_config(None, backend="local", cache_disk_mb=0, **greedy),
                      model=rwkv_engine.load_model(ckpt, device="cpu", use_kernel=False))
    # the server cannot constrain its first tokens to the healed bytes, so the remote
    # backend does not heal (PromptBuilder(heal=False)): compare with an unhealed local prompt
    local.builder = PromptBuilder(local.config, local.tokenizer, heal=False)
    remote = server_backend(remote_config(server.url, **greedy))
    req = make_request(LINES, row, col=col)
    ours = local.complete(req)
    theirs = remote.complete(req)
    print(f"\nrow {row} col {col}: local {[c['text'] for c in ours['candidates']]!r} "
          f"remote {[c['text'] for c in theirs['candidates']]!r}")
    assert [c["text"] for c in theirs["candidates"]] == [c["text"] for c in ours["candidates"]]
    assert theirs["stats"]["prompt_tokens"] == ours["stats"]["prompt_tokens"]


def test_the_next_keystroke_reuses_the_server_cache(server):
    rc = server_backend(remote_config(server.url, candidates=2))
    lines, row = list(LINES), 13
    col = len(lines[row])
    lines[row] = lines[row] + "  "
    first = rc.complete(make_request(lines, row))["stats"]
    figures = [(first["reused_tokens"], first["prefilled_tokens"])]
    for k, ch in enumerate("x = f(1"):
        lines, col = type_text(lines, row, len(lines[row].encode()), ch)
        s = rc.complete(make_request(lines, row, rid=k + 2))["stats"]
        figures.append((s["reused_tokens"], s["prefilled_tokens"]))
    print(f"\nserver cache per keystroke (cache_n, prompt_n): {figures}")
    for reused, fed in figures[1:]:
        assert reused > 0, figures
        assert fed < 12, figures          # the cursor line's last tokens, not the prompt
    assert rc.cache_stats()["server"]["reused_tokens"] > 0


def test_openai_backend_against_llama_servers_v1(server):
    """llama-server's OpenAI-compatible /v1/completions: `n` candidates over SSE; its model
    list says RWKV vocabulary, so "auto" sends the RWKV prompt (as text)."""
    rc = server_backend(remote_config(server.url + "/v1", backend="openai", candidates=3))
    parts = []
    lines = list(LINES)
    res = rc.complete(make_request(lines, 13), on_partial=parts.append)
    assert rc.server["fim"] == "rwkv" and res["candidates"] and parts
    assert res["stats"]["backend"] == "openai" and res["stats"]["decoded_tokens"] > 0
    lines, _ = type_text(lines, 13, len(lines[13]), "x")
    s = rc.complete(make_request(lines, 13, rid=2))["stats"]
    print(f"\nopenai backend on llama-server, next keystroke: reused {s['reused_tokens']}, "
          f"re-read {s['prefilled_tokens']}")
    assert s["reused_tokens"] > 0


# -- Neovim end to end -------------------------------------------------------------------------
@pytest.mark.nvim
def test_nvim_ghost_text_from_the_server_tab_accepts_and_a_dead_server_says_so_once(llama, model_files,
                                                                                      tmp_path):
    from nvim_harness import require_nvim, start_nvim

    require_nvim()
    suggest = "require('rwkv.suggest')"
    srv = start_server(llama, model_files[1])
    s = None
    try:
        opts = {"debounce_ms": 20, "engine": {
            "backend": "llama.cpp", "url": srv.url, "candidates": 2, "max_tokens": 8,
            "temperature": 1.0, "time_budget_ms": 20_000, "timeout_first_byte_ms": 20_000}}
        s = start_nvim(tmp_path / "nv", opts)
        s.cmd("enew!")
        s.cmd("setlocal filetype=python")
        s.feed("idef hello(name):<CR>return ")
        s.wait_for(f"{suggest}.visible() and {suggest}.state.shown.done", timeout=120,
                   what="a suggestion from llama-server")
        text = s.lua(f"return {suggest}.current_text()")
        assert text.strip()
        row, col = s.cursor()
        g = s.lua("return require('rwkv.ghost').get()")
        assert (g["row"], g["col"]) == (row, col)
        st = s.lua("return require('rwkv').status()")
        assert st["loaded"] and st["device"] == "remote" and st["last"]["candidates"] >= 1
        before = s.buffer_text()
        line = s.nvim.current.line
        s.feed("<Tab>")
        s.wait_for(f"vim.api.nvim_get_current_line() ~= {line!r}", timeout=10)
        head, tail = before.rsplit("\n", 1)
        assert s.buffer_text() == head + "\n" + tail[:col] + text + tail[col:]
        assert not s.errors_in_messages(), s.messages()

        srv.close()                                    # the server dies
        s.feed("<Esc>o")
        for ch in "x = 1":
            s.feed(ch)
            s.settle()
            s.lua("vim.wait(60)")
        want = f"rwkv: llama.cpp server {srv.url}: connection refused (is the server running?)"
        s.wait_for(f"vim.fn.execute('messages'):find({want!r}, 1, true) ~= nil", timeout=30,
                   what="the connection error")
        s.lua("vim.wait(300)")
        notes = [m for m in s.messages().splitlines() if m.startswith("rwkv:") and "server" in m]
        assert notes.count(want) == 1, s.messages()
        assert s.nvim.current.line == "x = 1" and s.nvim.api.get_mode()["mode"] == "i"
        s.feed("<Esc>")
        s.cmd("RwkvStatus")
        out = s.messages()
        assert "device: remote" in out and "connection refused" in out
    finally:
        if s is not None:
            s.close()
        srv.close()
