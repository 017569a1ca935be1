"""Issue 8, bad input: odd buffers never cost an error, a freeze or a byte.

Two halves:
- the real Lua plugin with a recorded Python side: the request Lua sends is bounded
  (lines and bytes per line, a 10 MB line is cut around the cursor), nothing is asked
  where nothing can be inserted, the buffer is unchanged until a suggestion is accepted;
  each recorded request then goes through the host's cleaning and the engine's prompt
  builder (no exception, bounded prompt);
- the real host and engine (tiny random model): the same odd buffers get an answer with
  no error message and no traceback in the host log.
"""
from __future__ import annotations

import pytest

from nvim_harness import require_nvim, start_nvim
from reliability_helpers import RECORDER, SUGGEST, fresh_buffer, host_log_text, live_opts, python_status, wait_done

pytestmark = [pytest.mark.nvim]

MAX_LINE_BYTES = 1024     # engine.max_line_bytes default
N_PREFIX, N_SUFFIX = 256, 64
TEN_MB = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    require_nvim()
    s = start_nvim(tmp_path_factory.mktemp("input-ui"), {"debounce_ms": 5, "notify": False}, manifest=False)
    s.lua(RECORDER)
    yield s
    s.close()


@pytest.fixture(scope="module")
def builder():
    from rwkv_engine.pipeline.config import EngineConfig
    from rwkv_engine.pipeline.prompt_layout import PromptBuilder
    from rwkv_engine.tokenizer import WorldTokenizer
    return PromptBuilder(EngineConfig(), WorldTokenizer.default())


def ask(s, keys: str, manual: bool = False) -> dict:
    """Type `keys` (ending in insert mode), optionally press the trigger key; returns the
    request the plugin sent for the cursor position."""
    s.lua("_G.T.calls = {}")
    s.feed(keys)
    if manual:
        s.settle()
        s.lua(f"{SUGGEST}.trigger()")
    s.wait_for("_G.T.asked_here()", timeout=20, what="a request at the cursor")
    return s.lua("return _G.T.last('RwkvRequest')[1]")


def no_errors(s) -> None:
    errors = s.errors_in_messages()
    assert not errors, errors


def check_prompt(builder, req: dict) -> None:
    """The engine's prompt builder accepts `req` as it arrives (invalid UTF-8 as lone
    surrogates, like pynvim decodes it); the prompt is bounded."""
    prompt = builder.build(req)
    assert prompt.n_tokens < (N_PREFIX + N_SUFFIX + 4) * MAX_LINE_BYTES
    text = builder.lines.tokenizer.decode(prompt.tokens()[1:])
    assert all(len(line.encode("utf-8")) <= MAX_LINE_BYTES + 64 for line in text.split("\n"))


def check_bounded(req: dict) -> None:
    assert len(req["lines"]) <= N_PREFIX + N_SUFFIX + 1
    assert all(len(line.encode("utf-8", "surrogateescape")) <= MAX_LINE_BYTES for line in req["lines"])
    assert req["first"] <= req["row"] < req["first"] + len(req["lines"])
    line = req["lines"][req["row"] - req["first"]].encode("utf-8", "surrogateescape")
    assert 0 <= req["col"] <= len(line)


# -- the request Lua sends ----------------------------------------------------------------
def test_10mb_line_is_cut_around_the_cursor_and_typing_stays_fast(ui, builder):
    line = "x = '" + "0123456789abcdef" * (TEN_MB // 16) + "'"
    fresh_buffer(ui, ["import os", line, "print(x)"])
    ui.lua(r"""_G.T.max_change_ms = 0
      local sg = require('rwkv.suggest'); local f = sg.on_change
      _G.T.timed_change = function() local t = vim.uv.hrtime(); f()
        _G.T.max_change_ms = math.max(_G.T.max_change_ms, (vim.uv.hrtime() - t) / 1e6) end
      vim.api.nvim_create_autocmd('TextChangedI', { buffer = 0, callback = _G.T.timed_change })""")
    # in the middle of the line: text right of the cursor, so the trigger key asks
    ui.nvim.current.window.cursor = (2, TEN_MB // 2)
    req = ask(ui, "iZ", manual=True)
    check_bounded(req)
    cut = req["lines"][1]
    assert len(cut) <= MAX_LINE_BYTES and "Z" in cut
    full = ui.nvim.current.buffer[1]
    col = ui.cursor()[1]
    assert full[:col].endswith(cut[: req["col"]]) and full[col:].startswith(cut[req["col"]:])
    assert req["col"] >= MAX_LINE_BYTES // 2          # most of what is kept is before the cursor
    assert ui.lua("return _G.T.max_change_ms") < 50, "a keystroke on a 10 MB line blocked the editor"
    check_prompt(builder, req)
    # at the end of the line (auto trigger)
    req = ask(ui, "<Esc>A;")
    check_bounded(req)
    assert req["lines"][1].endswith("';") and req["col"] == len(req["lines"][1])
    check_prompt(builder, req)
    no_errors(ui)


def test_100000_line_file_sends_a_bounded_window(ui, builder):
    fresh_buffer(ui, [f"v{i} = {i}" for i in range(100_000)])
    ui.nvim.current.window.cursor = (50_001, 0)
    req = ask(ui, "A + 1")
    check_bounded(req)
    assert req["first"] == 50_000 - N_PREFIX and req["row"] == 50_000
    assert req["lines"][N_PREFIX] == "v50000 = 50000 + 1"
    check_prompt(builder, req)
    no_errors(ui)


@pytest.mark.parametrize("case", ["binary", "invalid_utf8", "crlf_unix", "crlf_dos", "mixed_ws", "emoji_cjk",
                                  "empty"])
def test_odd_text_gives_a_clean_bounded_request(ui, builder, tmp_path, case):
    path = tmp_path / f"{case}.txt"
    if case == "binary":
        path.write_bytes(bytes(range(256)) * 64 + b"\n\x00\x01ELF\xff\xfe\n")
    elif case == "invalid_utf8":
        path.write_bytes(b"caf\xc3\xa9 \xff\xfe ok\n\xe4\xb8 half\nx = \xc3\n")
    elif case.startswith("crlf"):
        path.write_bytes(b"def f():\r\n    return 1\r\n\r\nx = 2\r\n")
    elif case == "mixed_ws":
        path.write_bytes(b"def f():\n\t  if x:\n  \t\treturn 1\n \t \n")
    elif case == "emoji_cjk":
        path.write_text("s = '😀 你好 ✿'\n# 日本語のコメント 👍🏽\n", encoding="utf-8")
    else:
        path.write_bytes(b"")
    fresh_buffer(ui)
    ff = {"crlf_unix": " ++ff=unix", "crlf_dos": " ++ff=dos"}.get(case, "")
    ui.cmd(f"edit!{ff} {path}")
    ui.cmd("setlocal filetype=python")
    before = ui.nvim.current.buffer[:]
    req = ask(ui, "GA", manual=True)
    check_bounded(req)
    if case == "crlf_unix":
        assert req["lines"][0] == "def f():\r"
    if case == "crlf_dos":
        assert req["lines"][0] == "def f():"
    check_prompt(builder, req)
    assert ui.nvim.current.buffer[:] == before              # asking changes nothing
    # a suggestion shows (one with a tab: its display column is measured on the odd line;
    # one with a NUL byte from a junk model is dropped) ...
    ui.lua("_G.T.done(...)", ["\ty = 1", "bad\0", "z"])
    assert ui.lua(f"return {SUGGEST}.visible()")
    assert ui.lua(f"return {SUGGEST}.state.shown.items") == ["\ty = 1", "z"]
    assert ui.nvim.current.buffer[:] == before              # ... and is not in the buffer
    no_errors(ui)


def test_cursor_at_start_end_of_line_and_end_of_file(ui, builder):
    fresh_buffer(ui, ["alpha", "beta", "gamma"])
    req = ask(ui, "ggi", manual=True)
    assert (req["row"], req["col"]) == (0, 0)
    check_prompt(builder, req)
    req = ask(ui, "<Esc>jA", manual=True)
    assert (req["row"], req["col"]) == (1, 4)
    req = ask(ui, "<Esc>GA", manual=True)
    assert (req["row"], req["col"]) == (2, 5) and req["lines"][-1] == "gamma"
    check_prompt(builder, req)
    no_errors(ui)


@pytest.mark.parametrize("setting", ["nomodifiable", "readonly"])
def test_nothing_is_asked_in_read_only_buffers(ui, setting):
    fresh_buffer(ui, ["x = 1"])
    ui.cmd(f"setlocal {setting}")
    ui.lua("_G.T.calls = {}")
    ui.cmd("startinsert!")
    ui.settle()
    assert ui.lua(f"return {SUGGEST}.trigger()") is False
    ui.lua("vim.wait(100)")
    assert ui.lua("return _G.T.count('RwkvRequest')") == 0
    assert ui.nvim.current.buffer[:] == ["x = 1"]
    ui.feed("<Esc>")
    ui.cmd(f"setlocal {setting.replace('no', '', 1) if setting == 'nomodifiable' else 'noreadonly'}")
    no_errors(ui)


@pytest.mark.parametrize("kind", ["terminal", "help", "prompt", "quickfix"])
def test_nothing_is_asked_in_special_buffers(ui, kind):
    fresh_buffer(ui)
    if kind == "terminal":
        ui.cmd("terminal")
    elif kind == "help":
        ui.cmd("help help")
        ui.cmd("only")
    elif kind == "prompt":
        ui.cmd("setlocal buftype=prompt")
    else:
        ui.cmd("call setqflist([{'filename': 'a.py', 'lnum': 1, 'text': 'x'}])")
        ui.cmd("copen")
        ui.cmd("only")
    ui.lua("_G.T.calls = {}")
    before = ui.nvim.current.buffer[:]
    ui.cmd("startinsert")
    ui.settle()
    ui.feed("ab")
    ui.settle()
    ui.lua(f"{SUGGEST}.trigger(); {SUGGEST}.on_change(); vim.wait(100)")
    assert ui.lua("return _G.T.count('RwkvRequest')") == 0
    if kind != "prompt" and kind != "terminal":
        assert ui.nvim.current.buffer[:] == before
    ui.feed("<C-\\><C-n>")
    ui.settle()
    if kind == "terminal":
        ui.cmd("bwipeout!")
    no_errors(ui)


# -- the real host and engine --------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_model_path):
    require_nvim()
    root = tmp_path_factory.mktemp("input-live")
    s = start_nvim(root, live_opts(tiny_model_path, root),
                   extra_env={"NVIM_PYTHON_LOG_FILE": str(root / "py3log")})
    yield s
    s.close()


def test_live_odd_buffers_are_answered_without_errors(live, tmp_path):
    files = {
        "binary.bin": bytes(range(256)) * 16 + b"\n\x00\x00\n",
        "bad.txt": b"caf\xc3\xa9 \xff\xfe ok\n\xe4\xb8 half\nx = \xc3",
        "crlf.py": b"def f():\r\n    return 1\r\n",
        "emoji.py": "s = '😀 你好 ✿'\n# 日本語 👍🏽\n".encode(),
        "long.py": b"x = '" + b"ab\xc3\xa9" * (TEN_MB // 4) + b"'\n",
        "empty.py": b"",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        fresh_buffer(live)
        live.cmd(f"edit! {tmp_path / name}")
        live.cmd("setlocal filetype=python")
        before = live.nvim.current.buffer[:]
        live.feed("GA")
        live.settle()
        live.lua(f"{SUGGEST}.trigger()")
        wait_done(live, what=f"an answer in {name}")
        assert live.nvim.current.buffer[:] == before, name
        live.feed("<Esc>")
    st = python_status(live)
    assert st.get("loaded") is True and not st.get("error"), st
    assert live.lua("return require('rwkv').status().error") is None
    assert not live.errors_in_messages(), live.messages()
    assert "Traceback" not in host_log_text(live.root)


# -- the engine on its own (a client that sends raw lines) ---------------------------------
def test_engine_prompt_is_bounded_and_valid_for_raw_odd_requests(builder):
    """The prompt builder itself cuts long lines (around the cursor) and survives text
    that is not valid UTF-8, whatever the client sends."""
    from pipeline_fixtures import make_request
    long_line = "y = [" + "1, " * (TEN_MB // 3) + "]"
    lines = ["import os"] + [long_line] * 3 + ["caf\udcc3\udca9 \udcff ok", "x = 1"]
    for row, col in ((2, TEN_MB // 2), (2, len(long_line)), (4, 8), (4, 0), (5, 5)):
        req = make_request(lines, row, col=col)
        prompt = builder.build(req)
        text = builder.lines.tokenizer.decode(prompt.tokens()[1:])
        assert all(len(ln.encode("utf-8")) <= MAX_LINE_BYTES + 64 for ln in text.split("\n"))
        assert prompt.n_tokens < 8 * MAX_LINE_BYTES
        if row == 2:
            assert len(prompt.line_prefix.encode()) >= MAX_LINE_BYTES // 2
            assert long_line.encode()[:col].endswith(prompt.line_prefix.encode())
        if row == 4 and col == 8:       # bytes "caf\xc3\xa9 \xff " (escaped): é, then U+FFFD
            assert prompt.line_prefix == "caf\u00e9 \ufffd "
