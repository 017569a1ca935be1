"""Headless Neovim end-to-end tests of the plugin.

Two parts:
- mechanics: the real Lua plugin with the Python side replaced by a recorder
  (`remote.call`), results injected the way the rplugin delivers them; exact
  checks of rendering, accepting (tabs, multibyte, undo), cycling, staleness, keys;
- engine: the real plugin, the real rplugin host and the real engine with a tiny
  random model (`tiny_model_path`): the text is random, the mechanics are real.
"""
from __future__ import annotations

import pytest

from nvim_harness import RECORDER, NvimSession, require_nvim, start_nvim

pytestmark = [pytest.mark.nvim, pytest.mark.slow]

SUGGEST = "require('rwkv.suggest')"



def reset(s: NvimSession, filetype: str = "python", lines=None) -> None:
    s.feed("<Esc>")
    s.settle()
    s.cmd("enew!")
    s.cmd(f"setlocal filetype={filetype} noexpandtab tabstop=8 shiftwidth=8 softtabstop=0")
    if lines is not None:
        s.nvim.current.buffer[:] = lines
    s.lua("require('rwkv').enable(); _G.T = _G.T or {}; _G.T.calls = {}; _G.T.events = {}")


def type_and_answer(s: NvimSession, keys: str, texts) -> None:
    """Type `keys` (ending in insert mode), wait for the request, deliver `texts`."""
    s.feed(keys)
    s.wait_for("_G.T.asked_here()", timeout=10, what="a request at the cursor")
    s.lua("_G.T.done(...)", texts)
    s.wait_for(f"{SUGGEST}.visible()", timeout=10, what="the suggestion")


def assert_no_errors(s: NvimSession) -> None:
    errors = s.errors_in_messages()
    assert not errors, errors


# -- mechanics (recorded Python side) -----------------------------------------------------
@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    require_nvim()
    s = start_nvim(tmp_path_factory.mktemp("ui"), {"debounce_ms": 10, "notify": False}, manifest=False)
    s.lua(RECORDER)
    yield s
    s.close()


def test_ghost_inline_first_line_virt_lines_rest_and_float(ui):
    reset(ui)
    type_and_answer(ui, "ix = foo", ["bar(1)\n\tbaz é\n  qux", "other", "third"])
    g = ui.lua("return require('rwkv.ghost').get()")
    assert (g["row"], g["col"]) == (0, 7)
    d = g["details"]
    assert d["virt_text_pos"] == "inline"
    assert d["virt_text"] == [["bar(1)", "RwkvSuggestion"]]
    assert [vl[0][0] for vl in d["virt_lines"]] == [" " * 8 + "baz é", "  qux"]
    # the float: every candidate numbered, current one highlighted, not focused
    lines = ui.lua("return require('rwkv.float').lines()")
    assert [l for l in lines if l[:1].isdigit()] == ["1 bar(1)", "2 other", "3 third"]
    win = ui.lua("return require('rwkv.float').win()")
    cfg = ui.nvim.api.win_get_config(win)
    assert cfg["focusable"] is False
    assert ui.nvim.api.get_current_win() != win
    assert ui.nvim.api.get_mode()["mode"] == "i"
    # it does not cover the cursor line nor the two ghost lines under it
    assert cfg["anchor"] == "NW" and cfg["row"] >= 3
    sel = ui.lua("""local ns = require('rwkv.float').ns
      local buf = vim.api.nvim_win_get_buf(require('rwkv.float').win())
      local rows = {}
      for _, m in ipairs(vim.api.nvim_buf_get_extmarks(buf, ns, 0, -1, {details = true})) do
        if m[4].line_hl_group == 'RwkvFloatSelected' then rows[#rows + 1] = m[2] end
      end
      return rows""")
    assert sel == [0, 1, 2]
    assert ui.lua("return require('rwkv').statusline()") == "rwkv:1/3"
    events = [e["name"] for e in ui.lua("return _G.T.events")]
    assert "RwkvRequestStarted" in events and "RwkvSuggestionShown" in events
    assert_no_errors(ui)


def test_request_carries_window_and_position(ui):
    reset(ui, lines=["a", "b", "c"])
    ui.feed("jA x")
    ui.wait_for("_G.T.asked_here()", timeout=10)
    req = ui.lua("return _G.T.last('RwkvRequest')[1]")
    assert req["lines"] == ["a", "b x", "c"] and req["first"] == 0
    assert (req["row"], req["col"]) == (1, 3)
    assert req["filetype"] == "python"
    assert req["tick"] == ui.nvim.current.buffer.api.get_changedtick()


def test_accept_all_inserts_exactly_one_undo_step(ui):
    reset(ui, lines=["\tif x:", "end"])
    text = "é\t→ ok(1)\n\t\tnext 字"
    type_and_answer(ui, "A y", [text])
    ui.feed("<Tab>")
    ui.wait_for(f"not {SUGGEST}.visible()", timeout=10)
    assert ui.buffer_text() == "\tif x: y" + text + "\nend"
    last = text.split("\n")[-1]
    assert ui.cursor() == (1, len(last.encode()))
    assert ui.lua("return _G.T.last('RwkvAccept')")[1] == text
    assert ui.lua("return _G.T.count('RwkvRequest')") >= 2  # the next one at once
    ui.feed("<Esc>u")
    ui.settle()
    assert ui.buffer_text() == "\tif x: y\nend"
    assert_no_errors(ui)


def test_accept_line_keeps_the_rest(ui):
    reset(ui)
    type_and_answer(ui, "idef f():", ["\n    a = 1\n    return a", "x"])
    ui.feed("<S-Tab>")
    ui.wait_for("vim.api.nvim_buf_line_count(0) == 2", timeout=10)
    assert ui.buffer_text() == "def f():\n    a = 1"
    assert ui.lua(f"return {SUGGEST}.current_text()") == "\n    return a"
    ui.feed("<S-Tab>")
    ui.wait_for("vim.api.nvim_buf_line_count(0) == 3", timeout=10)
    assert ui.buffer_text() == "def f():\n    a = 1\n    return a"


def test_accept_word(ui):
    reset(ui)
    type_and_answer(ui, "ix", [" = naïve_value(3)"])
    ui.feed("<C-Right>")
    ui.wait_for("vim.api.nvim_get_current_line() ~= 'x'", timeout=10)
    assert ui.nvim.current.line == "x ="
    ui.feed("<C-Right>")
    ui.wait_for("vim.api.nvim_get_current_line() ~= 'x ='", timeout=10)
    assert ui.nvim.current.line == "x = naïve_value"
    assert ui.lua(f"return {SUGGEST}.current_text()") == "(3)"


def test_cycle_and_pick(ui):
    reset(ui)
    type_and_answer(ui, "ia", ["one", "two", "three"])
    ui.feed("<M-]>")
    ui.wait_for(f"{SUGGEST}.current_text() == 'two'", timeout=10)
    assert ui.lua("return require('rwkv.ghost').displayed_text()") == "two"
    ui.feed("<M-[><M-[>")
    ui.wait_for(f"{SUGGEST}.current_text() == 'three'", timeout=10)
    ui.feed("<M-2>")
    ui.wait_for("vim.api.nvim_get_current_line() == 'atwo'", timeout=10)
    assert not ui.lua("return require('rwkv.float').is_open()")


def test_stale_results_are_never_drawn(ui):
    reset(ui)
    ui.feed("ia")
    ui.wait_for("_G.T.asked_here()", timeout=10)
    old = ui.lua(f"return {SUGGEST}.state.sent.id")
    ui.feed("b")
    ui.wait_for(f"_G.T.asked_here() and {SUGGEST}.state.sent.id > {old}", timeout=10)
    # an answer to the older request, partial or final, is ignored
    ui.lua(f"{SUGGEST}.on_partial({{id = {old}, text = 'zzz'}})")
    ui.lua(f"{SUGGEST}.on_done({{id = {old}, candidates = {{{{text = 'zzz'}}}}}})")
    assert not ui.lua(f"return {SUGGEST}.visible()")
    assert ui.lua("return require('rwkv.ghost').get()") is None
    # the current request, but the cursor moved meanwhile: ignored too
    ui.lua("vim.api.nvim_buf_set_lines(0, 0, -1, false, {'ab', ''})")  # changedtick moves
    ui.lua("_G.T.done({'late'})")
    assert ui.lua("return require('rwkv.ghost').get()") is None


def test_partial_streams_into_ghost_then_done(ui):
    reset(ui)
    ui.feed("iq")
    ui.wait_for("_G.T.asked_here()", timeout=10)
    ui.lua(f"{SUGGEST}.on_partial({{id = {SUGGEST}.state.sent.id, text = 'ab'}})")
    assert ui.lua("return require('rwkv.ghost').displayed_text()") == "ab"
    assert not ui.lua("return require('rwkv.float').is_open()")
    ui.lua(f"{SUGGEST}.on_partial({{id = {SUGGEST}.state.sent.id, text = 'abc'}})")
    assert ui.lua("return require('rwkv.ghost').displayed_text()") == "abc"
    ui.lua("_G.T.done({'abcd', 'x'})")
    assert ui.lua("return require('rwkv.ghost').displayed_text()") == "abcd"
    assert ui.lua("return require('rwkv.float').is_open()")


def test_hidden_on_insert_leave_dismiss_and_cursor_move(ui):
    reset(ui)
    type_and_answer(ui, "ia", ["bc", "bd"])
    ui.feed("<Esc>")
    ui.wait_for("require('rwkv.ghost').get() == nil and not require('rwkv.float').is_open()", timeout=10)
    type_and_answer(ui, "a", ["zz", "yy"])
    ui.feed("<C-]>")
    ui.wait_for("require('rwkv.ghost').get() == nil", timeout=10)
    assert not ui.lua("return require('rwkv.float').is_open()")
    assert ui.nvim.current.line == "a"  # dismiss inserts nothing
    ui.feed("x")
    ui.wait_for("_G.T.asked_here()", timeout=10)
    ui.lua("_G.T.done({'q1', 'q2'})")
    ui.feed("<Left>")
    ui.wait_for("require('rwkv.ghost').get() == nil", timeout=10)


def test_hidden_while_the_popup_menu_shows(ui):
    reset(ui, lines=["alpha1 alpha2", ""])
    ui.feed("Gial")
    ui.wait_for("_G.T.asked_here()", timeout=10)
    ui.lua("_G.T.done({'pha3', 'x'})")
    assert ui.lua(f"return {SUGGEST}.visible()")
    ui.feed("<C-n>")
    ui.wait_for("vim.fn.pumvisible() == 1", timeout=10)
    ui.wait_for("require('rwkv.ghost').get() == nil and not require('rwkv.float').is_open()", timeout=10)
    # a result arriving while the menu shows is not drawn
    ui.lua(f"local sg = {SUGGEST}; local c = vim.api.nvim_win_get_cursor(0); sg.state.sent = "
           "{id = 99, buf = vim.api.nvim_get_current_buf(), tick = vim.b.changedtick, row = c[1] - 1, col = c[2]}")
    ui.lua(f"{SUGGEST}.on_done({{id = 99, candidates = {{{{text = 'zz'}}}}}})")
    assert ui.lua("return require('rwkv.ghost').get()") is None
    ui.feed("<C-e>")


def test_idle_primes_queued_context(ui):
    reset(ui)
    ui.cmd("set updatetime=50")
    try:
        ui.feed("ia")  # the engine is "started" from the first InsertEnter on
        ui.wait_for("_G.T.asked_here()", timeout=10)
        ui.wait_for("_G.T.count('RwkvPrime') > 0", timeout=10, what="CursorHoldI priming")
    finally:
        ui.cmd("set updatetime=4000")


def test_typing_the_suggestion_keeps_it(ui):
    reset(ui)
    type_and_answer(ui, "ip", ["rint(x)", "ass"])
    n = ui.lua("return _G.T.count('RwkvRequest')")
    ui.feed("ri")
    ui.wait_for("vim.api.nvim_get_current_line() == 'pri'", timeout=10)
    ui.settle()
    assert ui.lua(f"return {SUGGEST}.current_text()") == "nt(x)"
    assert ui.lua("return _G.T.count('RwkvRequest')") == n
    ui.feed("<Tab>")
    ui.wait_for("vim.api.nvim_get_current_line() == 'print(x)'", timeout=10)
    assert ui.lua("return _G.T.last('RwkvAccept')")[1] == "rint(x)"


def test_tab_without_suggestion_inserts_a_tab_or_spaces(ui):
    reset(ui)
    ui.lua("require('rwkv').disable()")
    ui.feed("i<Tab>x")
    ui.wait_for("vim.api.nvim_get_current_line() ~= ''", timeout=10)
    assert ui.nvim.current.line == "\tx"
    reset(ui)
    ui.lua("require('rwkv').disable()")
    ui.cmd("setlocal expandtab softtabstop=4 shiftwidth=4")
    ui.feed("i<Tab>y")
    ui.wait_for("vim.api.nvim_get_current_line() ~= ''", timeout=10)
    assert ui.nvim.current.line == "    y"
    assert_no_errors(ui)


def test_tab_falls_back_to_the_users_mapping(ui):
    reset(ui)
    try:
        ui.lua("vim.keymap.set('i', '<Tab>', 'MAPPED', {desc = 'user tab'})")
        ui.lua("require('rwkv').setup({debounce_ms = 10, notify = false})")
        ui.lua("require('rwkv').disable()")
        ui.feed("i<Tab>")
        ui.wait_for("vim.api.nvim_get_current_line() ~= ''", timeout=10)
        assert ui.nvim.current.line == "MAPPED"
        ui.lua("require('rwkv').enable()")
        type_and_answer(ui, "<M-\\>", ["_rwkv"])
        ui.feed("<Tab>")
        ui.wait_for("vim.api.nvim_get_current_line() == 'MAPPED_rwkv'", timeout=10)
    finally:
        ui.lua("require('rwkv.keymaps').clear(); pcall(vim.keymap.del, 'i', '<Tab>')")
        ui.lua("require('rwkv').setup({debounce_ms = 10, notify = false})")


def test_disabled_keys_are_not_mapped(ui):
    try:
        ui.lua("require('rwkv').setup({debounce_ms = 10, notify = false, keymaps = {accept_line = false}})")
        desc = "return (vim.fn.maparg(..., 'i', false, true).desc or '')"
        assert not ui.lua(desc, "<S-Tab>").startswith("rwkv:")  # Neovim's own default is back
        assert ui.lua(desc, "<Tab>").startswith("rwkv:")
    finally:
        ui.lua("require('rwkv').setup({debounce_ms = 10, notify = false})")


def test_no_auto_trigger_with_text_right_of_cursor_but_manual_works(ui):
    reset(ui, lines=["foo(alpha, beta, gamma)"])
    ui.feed("A<Home><Right><Right><Right>")  # cursor after "foo", 20 chars to the right
    ui.feed("x")
    ui.wait_for("vim.api.nvim_get_current_line() == 'foox(alpha, beta, gamma)'", timeout=10)
    ui.settle()
    ui.lua("vim.wait(100)")  # longer than debounce_ms: a request would have been sent
    assert ui.lua("return _G.T.count('RwkvRequest')") == 0
    ui.feed("<M-\\>")
    ui.wait_for("_G.T.asked_here()", timeout=10)
    assert ui.lua("return _G.T.events[#_G.T.events].data.manual") is True


def test_toggle_stops_and_restores_requests(ui):
    reset(ui)
    ui.cmd("RwkvToggle")
    assert ui.lua("return require('rwkv').status().enabled") is False
    ui.feed("iabc")
    ui.wait_for("vim.api.nvim_get_current_line() == 'abc'", timeout=10)
    ui.lua("vim.wait(100)")
    assert ui.lua("return _G.T.count('RwkvRequest')") == 0
    assert ui.lua("return require('rwkv').statusline()") == "rwkv:off"
    ui.feed("<Esc>")
    ui.cmd("RwkvToggle")
    assert ui.lua("return require('rwkv').status().enabled") is True
    type_and_answer(ui, "ad", ["ef"])


def test_gitcommit_and_special_buffers_get_nothing(ui):
    reset(ui, filetype="gitcommit")
    ui.feed("ifix: things")
    ui.wait_for("vim.api.nvim_get_current_line() == 'fix: things'", timeout=10)
    reset(ui)
    ui.cmd("setlocal buftype=nofile")
    ui.feed("ispecial")
    ui.wait_for("vim.api.nvim_get_current_line() == 'special'", timeout=10)
    # a normal buffer afterwards: its request proves the events above were processed
    reset(ui)
    ui.feed("inormal")
    ui.wait_for("_G.T.asked_here()", timeout=10)
    assert ui.lua("return _G.T.count('RwkvRequest')") == 1


def test_context_chunks_wait_for_the_engine(tmp_path):
    require_nvim()
    s = start_nvim(tmp_path, {"notify": False}, manifest=False)
    try:
        s.lua(RECORDER)
        s.nvim.current.buffer[:] = ["l1", "l2", "l3", "l4"]
        s.cmd("setlocal filetype=python")
        s.feed("ggyG")
        s.wait_for("require('rwkv.context').pending() == 1", timeout=10)
        assert s.lua("return _G.T.count('RwkvAddChunk')") == 0  # nothing before the first InsertEnter
        s.feed("Go")
        s.wait_for("_G.T.count('RwkvAddChunk') == 1", timeout=10)
        assert s.lua("return _G.T.calls[1].name") == "RwkvStart"
        assert s.lua("return _G.T.last('RwkvAddChunk')[1]") == "l1\nl2\nl3\nl4"
    finally:
        s.close()


# -- the real engine ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_model_path):
    require_nvim()
    root = tmp_path_factory.mktemp("live")
    opts = {
        "debounce_ms": 20,
        "engine": {
            "model": str(tiny_model_path),
            "device": "cpu",
            "candidates": 3,
            "max_tokens": 12,
            "seed": 0,
            "temperature": 1.0,
            "time_budget_ms": 3000,
            "cache_dir": str(root / "engine-cache"),
        },
    }
    s = start_nvim(root, opts)
    yield s
    s.close()


def wait_suggestion(s: NvimSession, timeout: float = 300) -> None:
    # the first one may wait for the engine to build its CPU kernel (once per machine)
    s.wait_for(f"{SUGGEST}.visible() and {SUGGEST}.state.shown.done", timeout=timeout,
               what="a finished suggestion from the engine")


def test_live_typing_shows_ghost_and_float_and_tab_inserts_it(live):
    live.cmd("enew!")
    live.cmd("setlocal filetype=python")
    live.feed("idef hello(name):<CR>return ")
    wait_suggestion(live)
    assert live.lua("return require('rwkv').status().loaded") is True
    items = live.lua(f"return {SUGGEST}.state.shown.items")
    text = live.lua(f"return {SUGGEST}.current_text()")
    assert text == items[0] and text.strip()
    g = live.lua("return require('rwkv.ghost').get()")
    row, col = live.cursor()
    assert (g["row"], g["col"]) == (row, col)
    if "\t" not in text:
        assert live.lua("return require('rwkv.ghost').displayed_text()") == text
    if len(items) > 1:
        lines = live.lua("return require('rwkv.float').lines()")
        assert len([l for l in lines if l[:1].isdigit()]) == len(items)
    before = live.buffer_text()
    line = live.nvim.current.line
    live.feed("<Tab>")
    live.wait_for(f"vim.api.nvim_get_current_line() ~= {line!r}", timeout=10)
    head, tail = before.rsplit("\n", 1)
    assert live.buffer_text() == head + "\n" + tail[:col] + text + tail[col:]
    assert live.lua("return require('rwkv').status().last.ms_total") is not None
    assert not live.errors_in_messages(), live.messages()


def test_live_cycling_and_accept_line(live):
    live.feed("<Esc>")
    live.cmd("enew!")
    live.cmd("setlocal filetype=python")
    live.feed("iimport os<CR>x = ")
    wait_suggestion(live)
    items = live.lua(f"return {SUGGEST}.state.shown.items")
    assert len(items) > 1, items  # 3 rows sampled at temperature 1 from a random model differ
    shown = live.lua("return require('rwkv.ghost').displayed_text()")
    live.feed("<M-]>")
    live.wait_for(f"{SUGGEST}.current_text() == {items[1]!r}", timeout=10)
    assert live.lua("return require('rwkv.ghost').displayed_text()") != shown
    text = live.lua(f"return {SUGGEST}.current_text()")
    first = live.lua(f"return {SUGGEST}.first_line(...)", text)
    line = live.nvim.current.line
    live.feed("<S-Tab>")
    live.wait_for(f"vim.api.nvim_get_current_line() ~= {line!r} or vim.api.nvim_buf_line_count(0) > 2",
                  timeout=10)
    if first.startswith("\n"):
        assert live.nvim.current.buffer[-1] == first[1:]
    else:
        assert live.nvim.current.line == line + first
    assert not live.errors_in_messages(), live.messages()


def test_live_toggle_gitcommit_and_status(live):
    live.feed("<Esc>")
    live.cmd("RwkvToggle")
    live.cmd("enew!")
    live.cmd("setlocal filetype=python")
    live.cmd("setlocal noexpandtab softtabstop=0")
    n = live.lua(f"return {SUGGEST}.state.requests")
    live.feed("i<Tab>a = 1")
    live.wait_for("vim.api.nvim_get_current_line() == '\ta = 1'", timeout=10)
    live.lua("vim.wait(200)")
    assert live.lua(f"return {SUGGEST}.state.requests") == n
    live.feed("<Esc>")
    live.cmd("RwkvToggle")
    live.cmd("enew!")
    live.cmd("setlocal filetype=gitcommit")
    live.feed("ifix things")
    live.wait_for("vim.api.nvim_get_current_line() == 'fix things'", timeout=10)
    live.feed("<Esc>")
    live.cmd("enew!")
    live.cmd("setlocal filetype=python")
    live.feed("ib = 2")
    wait_suggestion(live)
    assert live.lua(f"return {SUGGEST}.state.requests") == n + 1  # only the python buffer asked
    live.feed("<Esc>")
    live.cmd("RwkvStatus")
    out = live.messages()
    assert "device: cpu" in out and "last request:" in out and "none yet" not in out
    st = live.lua("return require('rwkv').status()")
    assert st["enabled"] and st["device"] == "cpu" and st["last"]["candidates"] >= 1
    assert not live.errors_in_messages(), out
