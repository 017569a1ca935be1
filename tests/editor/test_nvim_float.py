"""Issue 21: the candidate window's life and place (lua/rwkv/float.lua).

The Python side is replaced by the recorder of nvim_harness; every check counts the
floating windows that show the candidate list (filetype rwkv_candidates), whatever
the plugin itself believes is open.

- with the language server on and vim.lsp.completion's autotrigger, the popup menu
  opens over a shown float (CompleteChanged, where Neovim forbids closing windows):
  the float must still go, never stack, and be gone after <Esc>, cursor moves and a
  later insert with the omnifunc;
- exactly one float while typing and cycling; none after InsertLeave, BufLeave,
  WinLeave and the dismiss key;
- the place: never over the cursor line, below it (after the ghost text's lines) when
  there is room, else above; the ghost text's virtual lines are capped while typing.
"""
from __future__ import annotations

import pytest

from nvim_harness import RECORDER, NvimSession, require_nvim, start_nvim

pytestmark = [pytest.mark.nvim, pytest.mark.slow]

SUGGEST = "require('rwkv.suggest')"
OPTS = {"debounce_ms": 10, "notify": False, "lsp": {"enabled": True}}

# the floating windows that show our candidate list, and all floating windows
COUNT = r"""
local ours, all = 0, 0
for _, w in ipairs(vim.api.nvim_list_wins()) do
  local cfg = vim.api.nvim_win_get_config(w)
  if cfg.relative ~= '' and not cfg.hide then
    all = all + 1
    if vim.bo[vim.api.nvim_win_get_buf(w)].filetype == 'rwkv_candidates' then ours = ours + 1 end
  end
end
return { ours = ours, all = all }
"""


def floats(s: NvimSession) -> int:
    s.settle()
    return s.lua(COUNT)["ours"]


def fresh(s: NvimSession, lines=None) -> None:
    s.feed("<Esc>")
    s.settle()
    s.cmd("enew!")
    s.cmd("setlocal filetype=python")
    if lines is not None:
        s.nvim.current.buffer[:] = lines
    s.lua("require('rwkv').enable(); _G.T.calls = {}; _G.T.events = {}")


def answer(s: NvimSession, texts) -> None:
    s.wait_for("_G.T.asked_here()", timeout=10, what="a request at the cursor")
    s.lua("_G.T.done(...)", texts)


def shown(s: NvimSession, keys: str, texts) -> None:
    s.feed(keys)
    answer(s, texts)
    s.wait_for("require('rwkv.float').is_open()", timeout=10, what="the float")
    assert floats(s) == 1


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    require_nvim()
    s = start_nvim(tmp_path_factory.mktemp("float"), OPTS, manifest=False)
    s.lua(RECORDER)
    s.lua("require('rwkv').on_event('ready', { model = 'fake', device = 'cpu' })")  # as if loaded
    yield s
    s.close()


def test_popup_menu_over_the_float_leaves_no_window_behind(ui):
    fresh(ui, ["def f(a):", ""])
    ui.cmd("set completeopt=menuone,noselect,popup")
    ui.lua("vim.lsp.completion.enable(true, require('rwkv.lsp').client_id(), 0, { autotrigger = true })")
    try:
        ui.feed("Gix = ")  # " " is a trigger character: the menu waits for this request
        answer(ui, ["foo(1)\nbar", "fob(2)", "fox"])
        ui.wait_for("vim.fn.pumvisible() == 1", timeout=10, what="the popup menu")
        assert floats(ui) == 0  # the menu shows the candidates: the float went (in CompleteChanged)
        for ch, texts in (("f", ["oo(1)\nbar", "ob(2)"]), ("o", ["o(1)\nbar", "b(2)", "x"])):
            ui.feed(ch)
            ui.settle()
            if ui.lua("return _G.T.asked_here()"):
                ui.lua("_G.T.done(...)", texts)
            assert floats(ui) <= 1
        ui.feed("<Esc>")
        assert floats(ui) == 0
        ui.feed("kj0")
        assert floats(ui) == 0
        # a later insert with the omnifunc
        ui.cmd("setlocal omnifunc=v:lua.vim.lsp.omnifunc")
        ui.feed("ox = b<C-x><C-o>")
        answer(ui, ["ar(1)", "az(2)"])
        ui.wait_for("vim.fn.pumvisible() == 1", timeout=10, what="the omnifunc menu")
        assert floats(ui) == 0
        ui.feed("<C-e><Esc>")
        assert floats(ui) == 0
    finally:
        ui.lua("vim.lsp.completion.enable(false, require('rwkv.lsp').client_id(), 0)")
        ui.cmd("set completeopt&")
    assert not ui.errors_in_messages()


def test_one_float_while_typing_none_after_each_way_out(ui):
    fresh(ui, ["", ""])
    shown(ui, "ggiy = ", ["1 + 2", "3 * 4", "3 - 1"])
    ui.feed("<M-]>")
    ui.wait_for(f"{SUGGEST}.state.shown.index == 2", timeout=10)
    assert floats(ui) == 1
    ui.feed("3")  # typing what the selected candidate says keeps the float
    ui.settle()
    assert floats(ui) == 1
    ui.feed("<Esc>")  # InsertLeave
    assert floats(ui) == 0

    shown(ui, "A ", ["a", "b"])
    ui.feed("<C-]>")  # dismiss
    assert floats(ui) == 0

    shown(ui, "a+", ["c", "d"])
    ui.feed("<Cmd>enew<CR>")  # BufLeave
    assert floats(ui) == 0

    fresh(ui, ["", ""])
    shown(ui, "ix", ["e", "f"])
    ui.feed("<Cmd>split<CR>")  # WinLeave: another window on the same buffer
    assert floats(ui) == 0
    ui.feed("<Esc>")
    ui.cmd("only")
    assert not ui.errors_in_messages()


# -- the place -------------------------------------------------------------------------
GEOMETRY = r"""
vim.cmd("redraw")
local win = require("rwkv.float").win()
local pos = vim.api.nvim_win_get_position(win)   -- 0-based screen row of the float's top (its border)
local cfg = vim.api.nvim_win_get_config(win)
local frame = (cfg.border and #cfg.border > 0 and cfg.border[1] ~= '') and 1 or 0
return { top = pos[1], bottom = pos[1] + cfg.height - 1 + 2 * frame,
         cursor = vim.fn.screenpos(0, vim.fn.line('.'), 1).row - 1 }
"""


def test_float_goes_below_the_ghost_lines_when_there_is_room(ui):
    fresh(ui, [f"line_{i} = {i}" for i in range(60)])
    ui.cmd("normal! 8Gzt")  # line 8 at the top of the window: room below
    shown(ui, "10jA ", ["x\n  y", "other", "third"])  # room above too: below is chosen
    g = ui.lua(GEOMETRY)
    assert g["top"] > g["cursor"] + 1, g  # under the cursor line and the ghost text's one line
    assert ui.lua("return #require('rwkv.ghost').get().details.virt_lines") == 1


def test_float_goes_above_near_the_bottom_never_over_the_cursor_line(ui):
    fresh(ui, [f"line_{i} = {i}" for i in range(60)])
    ui.cmd("normal! Gzb")  # the cursor line at the bottom of the window: no room below
    shown(ui, "A ", ["x\n  y", "other", "third"])
    g = ui.lua(GEOMETRY)
    assert g["bottom"] < g["cursor"], g


def test_ghost_text_lines_are_capped_and_the_rest_counted(ui):
    text = "\n".join(f"row{i}" for i in range(8))  # 8 lines
    fresh(ui, ["", ""])
    shown(ui, "ggiz = ", [text, "other"])
    d = ui.lua("return require('rwkv.ghost').get().details")
    assert len(d["virt_lines"]) == 2  # ghost.max_lines = 3: the first line + 2 below
    assert d["virt_lines"][-1][-1] == [" … +5 lines", "RwkvAnnotation"]
    assert ui.lua("return require('rwkv.ghost').displayed_text()") == "row0\nrow1\nrow2"
    ui.feed("<Tab>")  # <Tab> still inserts the whole candidate
    ui.wait_for("vim.api.nvim_buf_line_count(0) == 9", timeout=10)
    assert ui.buffer_text().startswith("z = " + text)
    try:
        assert ui.lua("return require('rwkv').setup({ debounce_ms = 10, notify = false, lsp = { enabled = true },"
                      " ghost = { max_lines = 0 } })")
        fresh(ui, ["", ""])
        shown(ui, "ggiz = ", [text, "other"])
        assert len(ui.lua("return require('rwkv.ghost').get().details.virt_lines")) == 7
    finally:
        ui.lua("require('rwkv').setup(...)", OPTS)
    for bad in ("-1", "1.5", "'3'"):
        ok, err = ui.lua(f"return {{ pcall(require('rwkv.config').apply, {{ ghost = {{ max_lines = {bad} }} }}) }}")
        assert ok is False and "ghost.max_lines" in err, (bad, err)
