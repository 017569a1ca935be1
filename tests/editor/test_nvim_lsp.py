"""Issue 16: the in-process language server (lua/rwkv/lsp.lua).

One language server inside Neovim (vim.lsp.start with a Lua function as `cmd`) serves
the candidates to completion menus; the ghost text, the float and the server are views
of the same requests (suggest.lua's), none computed twice.

- mechanics (the Python side replaced by the recorder of nvim_harness): Neovim 0.11's own
  completion (vim.lsp.completion with autotrigger) shows the candidates in the popup menu,
  accepting one inserts the whole multi-line text and counts as an accept (RwkvAccept);
  UTF-16 ranges; textDocument/inlineCompletion; one request for all views; the fault
  cases (the model not loaded, a buffer without suggestions, a request cancelled or
  superseded while it decodes); the options;
- engine: the real plugin, host and engine on the tiny random model: the popup menu and
  textDocument/inlineCompletion (client:request_sync) list what the engine produced;
- blink.cmp and nvim-cmp (+ cmp-nvim-lsp), the real plugins, from a cache directory
  ($RWKV_TEST_PLUGINS, default ~/.cache/rwkv.nvim/test-plugins/{blink.cmp,nvim-cmp,
  cmp-nvim-lsp}: git clones): our items appear in their menus and accept correctly.
  Skipped where they are absent (CI).

Neovim 0.12's inline completion (vim.lsp.inline_completion) cannot run here (0.11):
the server's answer to textDocument/inlineCompletion is checked through the client.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from nvim_harness import RECORDER, NvimSession, require_nvim, start_nvim

pytestmark = [pytest.mark.nvim, pytest.mark.slow]

SUGGEST = "require('rwkv.suggest')"
LSP = "require('rwkv.lsp')"
OPTS = {"debounce_ms": 10, "notify": False, "lsp": {"enabled": True}}

PLUGINS = Path(os.environ.get("RWKV_TEST_PLUGINS") or Path.home() / ".cache" / "rwkv.nvim" / "test-plugins")

# Lua helpers: LSP requests through our client, answers kept in _G.L
HELPERS = r"""
_G.L = { answers = {} }
function _G.L.client()
  return vim.lsp.get_client_by_id(require('rwkv.lsp').client_id())
end
function _G.L.params()
  local c = _G.L.client()
  return vim.lsp.util.make_position_params(0, c.offset_encoding)
end
-- an asynchronous request; its answer lands in _G.L.answers[n]; returns n and the request id
function _G.L.ask(method)
  local n = #_G.L.answers + 1
  _G.L.answers[n] = false
  local ok, id = _G.L.client():request(method or 'textDocument/completion', _G.L.params(), function(err, res)
    _G.L.answers[n] = { err = err or vim.NIL, res = res or vim.NIL }
  end, 0)
  return { n = n, id = id, ok = ok }
end
function _G.L.labels(res)
  local out = {}
  for i, it in ipairs(res.items or {}) do out[i] = it.label end
  return out
end
function _G.L.pum_words()
  local out = {}
  for i, it in ipairs(vim.fn.complete_info({ 'items' }).items) do out[i] = it.abbr end
  return out
end
"""


def fresh(s: NvimSession, lines=None, filetype: str = "python") -> None:
    s.feed("<Esc>")
    s.settle()
    s.cmd("enew!")
    s.cmd(f"setlocal filetype={filetype} noexpandtab tabstop=8 shiftwidth=8 softtabstop=0")
    if lines is not None:
        s.nvim.current.buffer[:] = lines
    s.lua("require('rwkv').enable(); _G.T = _G.T or {}; _G.T.calls = {}; _G.T.events = {}; _G.L.answers = {}")


def attached(s: NvimSession) -> bool:
    return s.lua(f"local id = {LSP}.client_id(); return id ~= nil and vim.lsp.buf_is_attached(0, id)")


def assert_no_errors(s: NvimSession) -> None:
    errors = s.errors_in_messages()
    assert not errors, errors


def start_ui(root: Path, opts: dict) -> NvimSession:
    s = start_nvim(root, opts, manifest=False)
    s.lua(RECORDER)
    s.lua(HELPERS)
    s.lua("require('rwkv').on_event('ready', { model = 'fake', device = 'cpu' })")  # as if loaded
    return s


# -- mechanics (recorded Python side) -----------------------------------------------------
@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    require_nvim()
    s = start_ui(tmp_path_factory.mktemp("lsp-ui"), OPTS)
    s.cmd("set completeopt=menuone,noselect")
    yield s
    s.close()


def test_native_popup_lists_candidates_and_accept_inserts_the_whole_text(ui):
    fresh(ui, ["def f(ö):", "\tö = f"])
    assert attached(ui)
    ui.lua("vim.lsp.completion.enable(true, require('rwkv.lsp').client_id(), 0, { autotrigger = true })")
    ui.feed("GAo")  # "o" is a trigger character: the menu asks, the request is the one typing sends
    ui.wait_for("_G.T.asked_here()", timeout=10, what="a request at the cursor")
    ui.lua("_G.T.done(...)", ["o(ö, 1)\n\treturn ö", "ld", "o(ö, 1)\n\treturn ö"])  # duplicates dropped
    ui.wait_for("vim.fn.pumvisible() == 1", timeout=10, what="the popup menu")
    assert ui.lua("return _G.L.pum_words()") == ["foo(ö, 1)", "fold"]
    info = ui.lua("return vim.fn.complete_info({ 'items' }).items[1]")
    item = info["user_data"]["nvim"]["lsp"]["completion_item"]
    assert item["textEdit"]["newText"] == "foo(ö, 1)\n\treturn ö"
    # UTF-16 columns: "\tö = fo": "fo" starts at byte 6, character 5 (ö: 2 bytes, 1 unit)
    assert item["textEdit"]["range"] == {"start": {"line": 1, "character": 5}, "end": {"line": 1, "character": 7}}
    assert item["sortText"] == "0001" and item["detail"] == "rwkv (2 lines)" and item["kind"] == 1
    assert item["documentation"]["value"] == "```python\nfoo(ö, 1)\n\treturn ö\n```"
    assert ui.lua("return _G.T.count('RwkvRequest')") == 1  # the ghost text and the menu: one request
    ui.feed("<C-n>")
    ui.wait_for("vim.fn.complete_info({ 'selected' }).selected == 0", timeout=10)
    ui.feed("<C-y>")
    ui.wait_for("vim.api.nvim_buf_line_count(0) == 3", timeout=10, what="the accepted text")
    assert ui.buffer_text() == "def f(ö):\n\tö = foo(ö, 1)\n\treturn ö"
    assert ui.cursor() == (2, len("\treturn ö".encode()))
    # counted like <Tab>: the engine continues from all the text inserted since its cursor
    rid = ui.lua("return _G.T.calls[2].args[1].id")
    assert ui.lua("return _G.T.last('RwkvAccept')") == [rid, "o(ö, 1)\n\treturn ö"]
    ev = [e for e in ui.lua("return _G.T.events") if e["name"] == "RwkvAccepted"]
    assert ev and ev[-1]["data"]["via"] == "lsp" and ev[-1]["data"]["kind"] == "all"
    ui.wait_for("_G.T.count('RwkvRequest') == 2", timeout=10, what="the next request at once")
    assert ui.lua("return _G.T.count('RwkvAccept')") == 1  # our CompleteDone and the item's command: once
    ui.lua("vim.lsp.completion.enable(false, require('rwkv.lsp').client_id(), 0)")
    assert_no_errors(ui)


def test_omnifunc_accept_inserts_the_whole_candidate_and_the_info_shows_code(ui):
    """Issue 21: <C-x><C-o> <C-n> <C-y> inserted only the first word ("column_index(s,"),
    and the info popup showed the markdown fences of the documentation."""
    fresh(ui, ["class T:", "    def f(self, s):", ""])
    ui.cmd("setlocal omnifunc=v:lua.vim.lsp.omnifunc expandtab shiftwidth=4")
    ui.cmd("set completeopt=menuone,noselect,popup")
    try:
        ui.feed("Gi        return self.c")
        ui.wait_for("_G.T.asked_here()", timeout=10, what="the request typing sends")
        ui.lua("_G.T.done(...)", ["olumn_index(s, 0)\n        x = 1", "ount"])
        ui.wait_for(f"{SUGGEST}.visible()", timeout=10)
        ui.feed("<C-x><C-o>")
        ui.wait_for("vim.fn.pumvisible() == 1", timeout=10, what="the omnifunc menu")
        assert ui.lua("return _G.L.pum_words()")[0] == "column_index(s, 0)"
        ui.feed("<C-n>")
        ui.wait_for("vim.fn.complete_info({ 'selected' }).selected == 0", timeout=10)
        info = ui.lua("""local i = vim.fn.complete_info({ 'selected' })
          if not i.preview_bufnr or not vim.api.nvim_buf_is_valid(i.preview_bufnr) then return nil end
          return { lines = vim.api.nvim_buf_get_lines(i.preview_bufnr, 0, -1, false),
                   syntax = vim.bo[i.preview_bufnr].syntax }""")
        assert info is not None
        assert info["lines"] == ["column_index(s, 0)", "        x = 1"] and info["syntax"] == "python", info
        ui.feed("<C-y>")
        ui.wait_for("vim.api.nvim_buf_line_count(0) == 4", timeout=10, what="the whole candidate")
        assert ui.buffer_text() == "class T:\n    def f(self, s):\n        return self.column_index(s, 0)\n        x = 1"
        assert ui.cursor() == (3, len("        x = 1"))
        assert ui.lua("return _G.T.count('RwkvAccept')") == 1
        assert ui.lua("return _G.T.last('RwkvAccept')")[1] == "olumn_index(s, 0)\n        x = 1"
    finally:
        ui.cmd("set completeopt=menuone,noselect")
    assert_no_errors(ui)


def test_one_request_for_ghost_float_and_server(ui):
    fresh(ui, ["import os", ""])
    ui.feed("Gix = pri")
    ui.wait_for("_G.T.asked_here()", timeout=10)
    a = ui.lua("return _G.L.ask()")  # asked while the request runs: it waits for that one
    ui.lua("_G.T.done(...)", ["nt(os.sep)\n", "ntf()"])
    ui.wait_for(f"_G.L.answers[{a['n']}]", timeout=10, what="the answer")
    res = ui.lua(f"return _G.L.answers[{a['n']}].res")
    assert res["isIncomplete"] is True
    assert ui.lua("return _G.L.labels(...)", res) == ["print(os.sep)", "printf()"]
    assert ui.lua(f"return {SUGGEST}.visible()")  # the ghost text and the float show it too
    assert ui.lua("return require('rwkv.ghost').displayed_text()") == "nt(os.sep)\n"
    assert ui.lua("return require('rwkv.float').is_open()")
    # typing what the candidates say: answered from the same result, no new request
    ui.feed("n")
    ui.wait_for("vim.api.nvim_get_current_line() == 'x = prin'", timeout=10)
    b = ui.lua("return _G.L.ask()")
    ui.wait_for(f"_G.L.answers[{b['n']}]", timeout=10)
    res = ui.lua(f"return _G.L.answers[{b['n']}].res")
    assert ui.lua("return _G.L.labels(...)", res) == ["print(os.sep)", "printf()"]
    edit = res["items"][1]["textEdit"]
    assert edit["newText"] == "printf()" and edit["range"]["start"]["character"] == 4
    assert res["items"][1]["command"]["arguments"][0]["accepted"] == "ntf()"
    # the inline completion request answers from it as well
    inline = ui.lua("return _G.L.client():request_sync('textDocument/inlineCompletion', _G.L.params(), 2000, 0)")
    items = inline["result"]["items"]
    assert [i["insertText"] for i in items] == ["print(os.sep)\n", "printf()"]
    assert items[0]["range"] == {"start": {"line": 1, "character": 4}, "end": {"line": 1, "character": 8}}
    assert items[0]["command"]["command"] == "rwkv.accept"
    assert ui.lua("return _G.T.count('RwkvRequest')") == 1
    assert_no_errors(ui)


def test_after_accept_line_the_menu_offers_the_rest(ui):
    fresh(ui)
    ui.feed("idef f(x):")
    ui.wait_for("_G.T.asked_here()", timeout=10)
    ui.lua("_G.T.done(...)", ["\n    a = x\n    return a"])
    ui.wait_for(f"{SUGGEST}.visible()", timeout=10)
    a = ui.lua("return _G.L.ask()")
    ui.wait_for(f"_G.L.answers[{a['n']}]", timeout=10)
    item = ui.lua(f"return _G.L.answers[{a['n']}].res.items[1]")
    assert item["label"] == "⏎ a = x" and item["filterText"] == ""
    ui.feed("<S-Tab>")
    ui.wait_for("vim.api.nvim_buf_line_count(0) == 2", timeout=10)
    b = ui.lua("return _G.L.ask()")  # the ghost text shows the rest: so does the menu
    ui.wait_for(f"_G.L.answers[{b['n']}]", timeout=10)
    item = ui.lua(f"return _G.L.answers[{b['n']}].res.items[1]")
    assert item["label"] == "x ⏎ return a" and item["filterText"] == "x"
    assert item["textEdit"]["newText"] == "x\n    return a"
    assert item["command"]["arguments"][0]["accepted"] == "\n    a = x\n    return a"
    assert ui.lua("return _G.T.count('RwkvRequest')") == 1
    assert_no_errors(ui)


def test_command_of_an_item_counts_as_accept_and_completes_a_short_insertion(ui):
    fresh(ui, ["", ""])
    ui.feed("ggiy = ")
    ui.wait_for("_G.T.asked_here()", timeout=10)
    ui.lua("_G.T.done(...)", ["1 + 2\nz = 3"])
    a = ui.lua("return _G.L.ask()")
    ui.wait_for(f"_G.L.answers[{a['n']}]", timeout=10)
    item = ui.lua(f"return _G.L.answers[{a['n']}].res.items[1]")
    assert item["label"] == "1 + 2" and item["textEdit"]["newText"] == "1 + 2\nz = 3"
    # a menu that inserted only the first word, then ran the command (as Neovim 0.11 does)
    ui.lua("vim.api.nvim_put({'1'}, 'c', false, true)")
    n = ui.lua(f"return {SUGGEST}.state.accepted")
    ui.lua("_G.L.client():exec_cmd(...)", item["command"])
    ui.wait_for(f"{SUGGEST}.state.accepted == {n + 1}", timeout=10)
    assert ui.buffer_text() == "y = 1 + 2\nz = 3\n"
    assert ui.cursor() == (1, 5)
    assert ui.lua("return _G.T.last('RwkvAccept')")[1] == "1 + 2\nz = 3"
    assert_no_errors(ui)


def test_model_not_loaded_yet_gives_an_empty_incomplete_list(ui):
    fresh(ui)
    ui.lua("require('rwkv').on_event('loading', { model = 'fake' })")
    try:
        ui.feed("ia = ")
        ui.wait_for("vim.api.nvim_get_current_line() == 'a = '", timeout=10)
        ui.lua(f"{SUGGEST}.state.sent = nil")  # nothing asked here yet
        n = ui.lua("return _G.T.count('RwkvRequest')")
        for _ in range(2):  # the server sends the request; then that request waits for the model
            a = ui.lua("return _G.L.ask()")
            ui.wait_for(f"_G.L.answers[{a['n']}]", timeout=10)
            ans = ui.lua(f"return _G.L.answers[{a['n']}]")
            assert ans["err"] is None and ans["res"] == {"isIncomplete": True, "items": []}
            assert ui.lua("return _G.T.asked_here()")  # the request waits for the model; the ghost shows it then
        assert ui.lua("return _G.T.count('RwkvRequest')") == n + 1
    finally:
        ui.lua("require('rwkv').on_event('ready', { model = 'fake', device = 'cpu' })")
    assert_no_errors(ui)


def test_buffers_without_suggestions_get_nothing(ui):
    fresh(ui, filetype="gitcommit")
    assert not attached(ui)  # not attached where suggestions are off
    fresh(ui)
    assert attached(ui)
    ui.cmd("let b:rwkv_enabled = v:false")
    ui.feed("ifoo")
    ui.wait_for("vim.api.nvim_get_current_line() == 'foo'", timeout=10)
    a = ui.lua("return _G.L.ask()")
    ui.wait_for(f"_G.L.answers[{a['n']}]", timeout=10)
    assert ui.lua(f"return _G.L.answers[{a['n']}].res") == {"isIncomplete": False, "items": []}
    inline = ui.lua("return _G.L.client():request_sync('textDocument/inlineCompletion', _G.L.params(), 2000, 0)")
    assert inline["result"] == {"items": []}
    assert ui.lua("return _G.T.count('RwkvRequest')") == 0
    ui.lua("require('rwkv').disable()")
    b = ui.lua("return _G.L.ask()")
    ui.wait_for(f"_G.L.answers[{b['n']}]", timeout=10)
    assert ui.lua(f"return _G.L.answers[{b['n']}].res.items") == []
    assert_no_errors(ui)


def test_superseded_and_cancelled_requests_answer_empty(ui):
    fresh(ui)
    ui.feed("ia = b")
    ui.wait_for("_G.T.asked_here()", timeout=10)
    a = ui.lua("return _G.L.ask()")
    ui.feed("c")  # a keystroke: a new request supersedes the running one
    ui.wait_for(f"_G.L.answers[{a['n']}]", timeout=10, what="the superseded answer")
    assert ui.lua(f"return _G.L.answers[{a['n']}].res") == {"isIncomplete": True, "items": []}
    ui.wait_for("_G.T.asked_here()", timeout=10)
    # $/cancelRequest while decoding: the wait ends silently; the ghost text still wants the
    # request, so the engine goes on with it
    b = ui.lua("return _G.L.ask()")
    cancels = ui.lua("return _G.T.count('RwkvCancel')")
    ui.lua("_G.L.client():cancel_request(...)", b["id"])
    ui.lua("vim.wait(50)")
    assert ui.lua(f"return _G.L.answers[{b['n']}]") is False  # a cancelled request gets no answer
    assert ui.lua("return _G.T.count('RwkvCancel')") == cancels
    assert ui.lua("return _G.T.asked_here()")
    # <Esc> while the server waits: the request is dropped, the answer is empty
    c = ui.lua("return _G.L.ask()")
    ui.feed("<Esc>")
    ui.wait_for(f"_G.L.answers[{c['n']}]", timeout=10)
    assert ui.lua(f"return _G.L.answers[{c['n']}].res") == {"isIncomplete": True, "items": []}
    assert ui.lua("return _G.T.count('RwkvCancel')") == cancels + 1
    ui.wait_for("next(_G.L.client().requests) == nil", timeout=10, what="no request left pending in the client")
    assert_no_errors(ui)


def test_cancel_with_the_ghost_text_off_stops_the_engine(tmp_path):
    require_nvim()
    s = start_ui(tmp_path, {**OPTS, "ghost": {"enabled": False}, "float": {"enabled": False}})
    try:
        fresh(s)
        s.feed("ia = b")
        s.wait_for("_G.T.asked_here()", timeout=10)
        a = s.lua("return _G.L.ask()")
        s.lua("_G.L.client():cancel_request(...)", a["id"])
        s.wait_for("_G.T.count('RwkvCancel') == 1", timeout=10, what="the engine's request dropped")
        assert s.lua(f"return {SUGGEST}.state.sent") is None
        # asked again at the same place: a new request
        b = s.lua("return _G.L.ask()")
        s.wait_for("_G.T.count('RwkvRequest') == 2 and _G.T.asked_here()", timeout=10)
        # the ghost text is off: nothing shows, the keys do what they did before
        s.lua("_G.T.done(...)", ["c(1)"])
        s.wait_for(f"_G.L.answers[{b['n']}]", timeout=10)
        assert s.lua(f"return _G.L.labels(_G.L.answers[{b['n']}].res)") == ["bc(1)"]
        assert s.lua("return require('rwkv.ghost').get()") is None
        assert not s.lua(f"return {SUGGEST}.visible()")
        s.feed("<Tab>")
        s.wait_for("vim.api.nvim_get_current_line() == 'a = b\t'", timeout=10)
        assert s.lua("return _G.T.count('RwkvAccept')") == 0
        assert_no_errors(s)
    finally:
        s.close()


def test_options_are_validated_and_the_server_stops(ui):
    bad = [
        ({"lsp": {"enabled": "yes"}}, "lsp.enabled"),
        ({"lsp": {"bogus": 1}}, "unknown option lsp.bogus"),
        ({"lsp": {"trigger_characters": [1]}}, "lsp.trigger_characters"),
        ({"ghost": {"enabled": 1}}, "ghost.enabled"),
    ]
    try:
        for opts, want in bad:
            ok, err = ui.lua("local ok, err = pcall(require('rwkv.config').apply, ...); return {ok, err}", opts)
            assert not ok and want in err, (opts, err)
        ui.lua("require('rwkv').setup({ debounce_ms = 10, notify = false, lsp = { enabled = true, "
               "trigger_characters = { '.', '(' } } })")
        fresh(ui)
        assert attached(ui)
        caps = ui.lua("return _G.L.client().server_capabilities")
        assert caps["completionProvider"]["triggerCharacters"] == [".", "("]
        assert caps["inlineCompletionProvider"] and caps["positionEncoding"] == "utf-16"
        assert caps["executeCommandProvider"]["commands"] == ["rwkv.accept"]
        ui.lua("require('rwkv').setup({ debounce_ms = 10, notify = false })")  # lsp off
        ui.wait_for("#vim.lsp.get_clients({ name = 'rwkv' }) == 0", timeout=10, what="the server stopped")
    finally:
        ui.lua("require('rwkv').setup(...)", OPTS)
    fresh(ui)
    ui.wait_for("require('rwkv.lsp').client_id() ~= nil", timeout=10)
    assert attached(ui)
    assert len(ui.lua("return _G.L.client().server_capabilities.completionProvider.triggerCharacters")) == 95
    assert_no_errors(ui)


# -- the real engine ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_model_path):
    require_nvim()
    root = tmp_path_factory.mktemp("lsp-live")
    opts = {
        **OPTS,
        "engine": {
            "model": str(tiny_model_path), "device": "cpu", "candidates": 3, "max_tokens": 8,
            "seed": 0, "temperature": 1.0, "time_budget_ms": 5000,
            "cache_dir": str(root / "engine-cache"),
            "n_prefix": 32, "n_suffix": 8, "near_prefix": 8, "near_suffix": 4,
        },
    }
    s = start_nvim(root, opts)
    s.lua(HELPERS)
    s.cmd("set completeopt=menuone,noselect")
    yield s
    s.close()


def test_live_native_popup_and_inline_completion_show_the_engines_candidates(live):
    fresh(live)
    live.feed("idef hello(name):<CR>return ")
    # the first request may wait for the engine to load (and build its CPU kernel once)
    live.wait_for(f"{SUGGEST}.visible() and {SUGGEST}.state.shown.done", timeout=300,
                  what="a finished suggestion from the engine")
    live.wait_for("require('rwkv').status().loaded", timeout=60)
    n = live.lua(f"return {SUGGEST}.state.requests")
    # textDocument/inlineCompletion through the client: the finished request, not a new one
    inline = live.lua("return _G.L.client():request_sync('textDocument/inlineCompletion', _G.L.params(), 5000, 0)")
    items = live.lua(f"return {SUGGEST}.state.result.items")
    assert [i["insertText"] for i in inline["result"]["items"]] == items
    assert live.lua(f"return {SUGGEST}.state.requests") == n
    # the popup menu of Neovim's own completion, on a new line
    try:
        live.feed("<Esc>")
        live.settle()
        live.cmd("enew!")
        live.cmd("setlocal filetype=python")
        live.lua("vim.lsp.completion.enable(true, require('rwkv.lsp').client_id(), 0, { autotrigger = true })")
        live.feed("iimport os<CR>x = ")
        live.wait_for("vim.fn.pumvisible() == 1 and #vim.fn.complete_info({ 'items' }).items > 0", timeout=60,
                      what="our candidates in the popup menu")
        items = live.lua(f"return {SUGGEST}.state.result.items")
        first = live.lua("return vim.fn.complete_info({ 'items' }).items[1].user_data.nvim.lsp.completion_item")
        assert first["textEdit"]["newText"] == items[0]
        assert live.lua("return vim.fn.complete_info({ 'items' }).items[1].menu").startswith("rwkv")
        line, (row, col) = live.nvim.current.line, live.cursor()
        accepted = live.lua(f"return {SUGGEST}.state.accepted")
        live.feed("<C-n><C-y>")
        live.wait_for(f"{SUGGEST}.state.accepted == {accepted + 1}", timeout=10, what="the accept")
        assert live.buffer_text() == "import os\n" + line[:col] + items[0] + line[col:]
    finally:
        live.lua("vim.lsp.completion.enable(false, require('rwkv.lsp').client_id(), 0)")
    assert not live.errors_in_messages(), live.messages()


def test_live_inline_request_waits_for_the_running_request(live):
    fresh(live)
    live.wait_for("require('rwkv').status().loaded", timeout=300)
    live.lua("vim.o.updatetime = 4000")
    live.feed("ifor i in range(3):<CR>")
    live.wait_for("vim.api.nvim_buf_line_count(0) == 2", timeout=10)
    live.lua(f"{SUGGEST}.state.sent = nil")
    n = live.lua(f"return {SUGGEST}.state.requests")
    # nothing asked here yet: the server sends the request typing would send and waits
    inline = live.lua("return _G.L.client():request_sync('textDocument/inlineCompletion', _G.L.params(), 30000, 0)")
    assert inline and not inline.get("err"), inline
    assert live.lua(f"return {SUGGEST}.state.requests") == n + 1
    items = live.lua(f"return {SUGGEST}.state.result.items")
    assert [i["insertText"] for i in inline["result"]["items"]] == items and items
    assert not live.errors_in_messages(), live.messages()


# -- blink.cmp and nvim-cmp -------------------------------------------------------------
def plugin_dirs(*names: str) -> list:
    dirs = [PLUGINS / n for n in names]
    missing = [str(d) for d in dirs if not (d / "lua").is_dir()]
    if missing:
        pytest.skip(f"not in the test plugin cache: {', '.join(missing)} (git clone them there to run this test)")
    return [str(d) for d in dirs]


def add_plugins(s: NvimSession, dirs: list) -> None:
    s.lua("""for _, d in ipairs(...) do
      vim.opt.runtimepath:append(d)
      for _, f in ipairs(vim.fn.glob(d .. '/plugin/**/*.lua', false, true)) do vim.cmd.source(f) end
    end""", dirs)


def type_o_in_a_menu_buffer(s: NvimSession) -> None:
    """In a new buffer "\tö = f": enter insert mode at its end (the menu plugin gets ready,
    a request is sent for that place), then type "o": the request for "fo" is the one
    the menu and the ghost text share."""
    fresh(s, ["def f(ö):", "\tö = f"])
    s.feed("GA")
    s.wait_for("_G.T.asked_here()", timeout=10)
    s.lua("_G.T.calls = {}")
    s.feed("o")
    s.wait_for("vim.api.nvim_get_current_line() == '\tö = fo' and _G.T.asked_here()", timeout=10)


@pytest.fixture
def menu_ui(tmp_path):
    """Factory: a session with the recorded Python side and the menu plugins in `dirs`."""
    sessions = []

    def make(dirs: list) -> NvimSession:
        require_nvim()
        s = start_ui(tmp_path, OPTS)
        sessions.append(s)
        add_plugins(s, dirs)
        return s

    yield make
    for s in sessions:
        s.close()


# the recipes of doc/rwkv.txt (:help rwkv-lsp)
BLINK_CONFIGS = {
    "lsp source": """{
      sources = { default = { 'lsp' }, providers = { lsp = {
        transform_items = function(_, items)
          for _, item in ipairs(items) do
            if item.client_name == "rwkv" then
              item.kind_icon, item.kind_name = "󰚩", "rwkv"
              item.score_offset = (item.score_offset or 0) + 10
            end
          end
          return items
        end,
      } } } }""",
    "own provider": """{
      sources = {
        default = { 'lsp', 'rwkv' },
        providers = {
          lsp = { transform_items = function(_, items)
            return vim.tbl_filter(function(i) return i.client_name ~= "rwkv" end, items)
          end },
          rwkv = {
            name = "rwkv", module = "blink.cmp.sources.lsp", score_offset = 10, async = true,
            transform_items = function(_, items)
              items = vim.tbl_filter(function(i) return i.client_name == "rwkv" end, items)
              for _, i in ipairs(items) do i.kind_icon, i.kind_name = "󰚩", "rwkv" end
              return items
            end,
          },
        },
      } }""",
}


@pytest.mark.parametrize("recipe", sorted(BLINK_CONFIGS))
def test_blink_cmp_menu_lists_and_accepts_our_items(menu_ui, recipe):
    s = menu_ui(plugin_dirs("blink.cmp"))
    s.lua(f"""local opts = vim.tbl_deep_extend('force', {{
      fuzzy = {{ implementation = 'lua' }},
      keymap = {{ preset = 'default' }},
      completion = {{ documentation = {{ auto_show = false }}, ghost_text = {{ enabled = false }} }},
      signature = {{ enabled = false }},
    }}, {BLINK_CONFIGS[recipe]})
    require('blink.cmp').setup(opts)""")
    type_o_in_a_menu_buffer(s)
    s.lua("_G.T.done(...)", ["o(ö, 1)\n\treturn ö", "ld"])
    s.wait_for("require('blink.cmp').is_menu_visible() and #require('blink.cmp').get_items() == 2", timeout=10,
               what="our items in blink.cmp's menu")
    items = s.lua("return require('blink.cmp').get_items()")
    assert [i["label"] for i in items] == ["foo(ö, 1)", "fold"]
    assert {(i["client_name"], i["kind_name"], i["source_id"]) for i in items} == {
        ("rwkv", "rwkv", "rwkv" if recipe == "own provider" else "lsp")}
    assert s.lua("return _G.T.count('RwkvRequest')") == 1  # the ghost text's request; asked twice if two providers
    s.feed("<C-y>")  # select_and_accept: the first item
    s.wait_for("vim.api.nvim_buf_line_count(0) == 3", timeout=10, what="the accepted text")
    s.wait_for("_G.T.count('RwkvAccept') == 1", timeout=10)
    assert s.buffer_text() == "def f(ö):\n\tö = foo(ö, 1)\n\treturn ö"
    assert s.cursor() == (2, len("\treturn ö".encode()))
    assert s.lua("return _G.T.last('RwkvAccept')")[1] == "o(ö, 1)\n\treturn ö"
    assert_no_errors(s)


CMP_CONFIGS = {
    "nvim_lsp source": "cmp.setup({ sources = { { name = 'nvim_lsp' } } })",
    "own group": """vim.api.nvim_create_autocmd("LspAttach", { callback = function(ev)
      local client = vim.lsp.get_client_by_id(ev.data.client_id)
      if client and client.name == "rwkv" and not vim.g.rwkv_cmp_source then
        vim.g.rwkv_cmp_source = cmp.register_source("rwkv", require("cmp_nvim_lsp.source").new(client))
      end
    end })
    cmp.setup({ sources = cmp.config.sources(
      { { name = "nvim_lsp", entry_filter = function(entry)
          return entry.source:get_debug_name() ~= "nvim_lsp:rwkv"
        end } },
      { { name = "rwkv", priority = 10 } }
    ) })""",
}


@pytest.mark.parametrize("recipe", sorted(CMP_CONFIGS))
def test_nvim_cmp_menu_lists_and_accepts_our_items(menu_ui, recipe):
    s = menu_ui(plugin_dirs("nvim-cmp", "cmp-nvim-lsp"))
    s.lua(f"""local cmp = require('cmp')
      require('cmp_nvim_lsp').setup()
      cmp.setup({{
        snippet = {{ expand = function(args) vim.snippet.expand(args.body) end }},
        mapping = {{ ['<C-y>'] = cmp.mapping.confirm({{ select = true }}) }},
        formatting = {{ format = function(entry, item)
          if entry.source:get_debug_name() == "nvim_lsp:rwkv" then
            item.kind, item.menu = "󰚩 rwkv", "[rwkv]"
          end
          return item
        end }},
      }})
      {CMP_CONFIGS[recipe]}""")
    type_o_in_a_menu_buffer(s)
    s.lua("_G.T.done(...)", ["o(ö, 1)\n\treturn ö", "ld"])
    s.wait_for("require('cmp').visible() and #require('cmp').get_entries() == 2", timeout=10,
               what="our items in nvim-cmp's menu")
    labels = s.lua("local out = {}; for i, e in ipairs(require('cmp').get_entries()) do "
                   "out[i] = { e.completion_item.label, e.source.name, e:get_vim_item(0).menu } end; return out")
    name = "rwkv" if recipe == "own group" else "nvim_lsp"
    assert labels == [["foo(ö, 1)", name, "[rwkv]"], ["fold", name, "[rwkv]"]]
    assert s.lua("return _G.T.count('RwkvRequest')") == 1
    s.feed("<C-y>")
    s.wait_for("vim.api.nvim_buf_line_count(0) == 3", timeout=10, what="the accepted text")
    s.wait_for("_G.T.count('RwkvAccept') == 1", timeout=10)
    assert s.buffer_text() == "def f(ö):\n\tö = foo(ö, 1)\n\treturn ö"
    assert s.lua("return _G.T.last('RwkvAccept')")[1] == "o(ö, 1)\n\treturn ö"
    assert_no_errors(s)


def test_checkhealth_reports_the_language_server(nvim_session):
    s = nvim_session({"lsp": {"enabled": False}}, manifest=False)
    s.cmd("checkhealth rwkv")
    report = s.buffer_text()
    assert "language server (completion menus)" in report and "lsp = { enabled = true }" in report


def test_checkhealth_reports_a_running_language_server(nvim_session, tmp_path):
    s = nvim_session({"lsp": {"enabled": True}}, manifest=False)
    f = tmp_path / "x.py"
    f.write_text("x = 1\n")
    s.cmd(f"edit {f}")
    s.lua("require('rwkv.lsp').attach(0)")
    s.cmd("checkhealth rwkv")
    report = s.buffer_text()
    assert "running in-process as client" in report and "attached to 1 buffer" in report, report
