"""The two option schemas and what is generated from them.

Engine: one schema (EngineConfig's field metadata) behind Python's checks, the generated
Lua table that setup() checks against, and the help section.
- the generated files (lua/rwkv/engine_options.lua, doc/rwkv.txt's option lists) are current;
- parity: for cases generated from the schema (bad and good values of every option), the
  engine (EngineConfig.from_dict) and setup() (lua/rwkv/config.lua, in headless Neovim)
  accept and reject exactly the same ones, naming the same option and rule;
- setup({engine = {top_p = 0}}) fails with one message and sends nothing to Python.

Editor: one schema (lua/rwkv/editor_options.lua) behind config.lua's defaults and checks
and the help section of the editor options.
- the help section is what the schema renders; config.defaults has exactly its options;
- gen_config.py --check fails on an option without doc, a bad schema entry, and a changed
  default whose help was not regenerated;
- an option added to the schema gets its default and checks with no code in config.lua.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nvim_harness import NVIM, REPO

GEN = REPO / "tools" / "gen_config.py"


def gen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GEN), *args], capture_output=True, text=True, timeout=60)


def run_lua(tmp_path: Path, code: str, *args: str):
    """Run `code` in a bare headless nvim with this checkout on the runtimepath; it prints
    one JSON value, returned decoded."""
    if NVIM is None:
        pytest.skip("nvim not found")
    script = tmp_path / "script.lua"
    script.write_text(code)
    env = dict(os.environ)
    for key in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME"):
        env[key] = str(tmp_path / key.lower())
    proc = subprocess.run([NVIM, "--headless", "-u", "NONE", "-i", "NONE", "--cmd", f"set rtp^={REPO}",
                           "-l", str(script), *args], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# -- (a) generated files -------------------------------------------------------------
def test_generated_files_are_up_to_date():
    res = gen("--check")
    assert res.returncode == 0, res.stdout + res.stderr


def test_check_names_the_stale_file(tmp_path):
    copy_checkout_files(tmp_path)
    doc = tmp_path / "doc" / "rwkv.txt"
    text = doc.read_text()
    assert text.count("Candidates decoded together in one batch.") == 1
    doc.write_text(text.replace("Candidates decoded together", "Candidates decoded"))   # hand edit
    res = gen("--check", "--root", str(tmp_path))
    assert res.returncode == 1
    assert "doc/rwkv.txt" in res.stderr and "engine_options.lua" not in res.stderr
    assert gen("--root", str(tmp_path)).returncode == 0                 # regenerates
    assert doc.read_text() == (REPO / "doc" / "rwkv.txt").read_text()
    assert gen("--check", "--root", str(tmp_path)).returncode == 0


# -- (b) parity ----------------------------------------------------------------------
def schema():
    from rwkv_engine.pipeline.config import schema
    return schema()


def option_cases(opt) -> list:
    """Option tables for one option: wrong types, the edges of its range, choices, ..."""
    name, t, lo, hi = opt["name"], opt["type"], opt["min"], opt["max"]
    values = [opt["default"], True, None]                   # None (vim.NIL) = the default
    if t in ("integer", "number"):
        values += ["1", [1], math.inf, -math.inf, math.nan, -12345, 10 ** 6, 2.0 ** 53]
        step = 1 if t == "integer" else 0.001
        if t == "integer":
            values += [0.5, (lo or 0) + 0.5, 3.0]
        if lo is not None:
            values += [lo, lo - step, lo + step]
        if hi is not None:
            values += [hi, hi + step, hi - step]
        if opt["max_option"]:
            other = opt["max_option"]
            values += [{name: 5, other: 4}, {name: 4, other: 4}, {name: 0, other: 0}, {name: 1, other: -1}]
    elif t == "string":
        values += [1, 0.5, ["auto"], "", " ", "x", "/tmp/model.pth"]
        for choice in opt["choices"] or ():
            values += [choice, choice.upper(), choice + " "]
    elif t == "table":
        values += [1, "", "x", [], ["a", "b"], ["a", ""], ["a", 1], {"k": "x"}]
    elif t == "boolean":
        values += [False, 1, 0, "true", "", [True]]
    return [v if isinstance(v, dict) else {name: v} for v in values]


def all_cases() -> list:
    cases = [{}, {"bogus": 1}, {"Top_p": 0.5}, {"candidates": 2, "bogus": 1}]
    for opt in schema():
        cases += option_cases(opt)
    unique = {json.dumps(to_json(c), sort_keys=True): c for c in cases}
    return list(unique.values())


def to_json(value):
    """JSON for the Lua side; inf/nan as {"$special": ...} (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"$special": repr(value)}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    return value


PARITY_LUA = r"""
local special = { inf = math.huge, ["-inf"] = -math.huge, nan = 0 / 0 }
local function decode(v)
  if type(v) == "table" then
    if v["$special"] then
      return special[v["$special"]]
    end
    local out = vim.islist(v) and {} or vim.empty_dict()
    for k, x in pairs(v) do
      out[k] = decode(x)
    end
    return out
  end
  return v   -- JSON null stays vim.NIL, as Python's None arrives from Lua
end
local config = require("rwkv.config")
local cases = vim.json.decode(io.open(_G.arg[1]):read("*a"))
local out = {}
for i, case in ipairs(cases) do
  local ok, err = pcall(config.apply, { engine = decode(case) })
  out[i] = { ok = ok, err = ok and vim.NIL or tostring(err) }
end
io.stdout:write(vim.json.encode(out))
"""


def rule(msg: str) -> tuple:
    """(option, rule) of an engine message, e.g. ("top_p", "must be in (0, 1]")."""
    m = re.search(r"engine option (\w+) = .*: (must be [^:]*)$", msg)
    if m:
        return m.group(1), m.group(2)
    m = re.search(r"(unknown engine option \S+) \(known: ", msg)
    assert m, msg
    return m.group(1), "unknown"


def test_python_and_lua_accept_and_reject_the_same_options(tmp_path):
    from rwkv_engine.pipeline.config import EngineConfig

    cases = all_cases()
    (tmp_path / "cases.json").write_text(json.dumps([to_json(c) for c in cases]))
    lua = run_lua(tmp_path, PARITY_LUA, str(tmp_path / "cases.json"))
    assert len(lua) == len(cases)
    mismatches, rejected, accepted = [], set(), set()
    for case, got in zip(cases, lua):
        try:
            EngineConfig.from_dict(case)
            py_err = None
        except ValueError as exc:
            py_err = str(exc)
        lua_err = got["err"]
        if lua_err is not None:
            assert lua_err.startswith("rwkv.setup: ") and "\n" not in lua_err, lua_err
        if (py_err is None) != got["ok"] or (py_err and rule(py_err) != rule(lua_err)):
            mismatches.append(f"{case!r}: python {py_err!r}, lua {lua_err!r}")
        (accepted if py_err is None else rejected).update(case)
    assert not mismatches, "\n".join(mismatches)
    names = {o["name"] for o in schema()}
    assert names <= rejected and names <= accepted      # every option was exercised both ways


def test_schema_describes_every_rule():
    """Each option's metadata carries what the generator needs; the message text and the
    help derive from it."""
    from rwkv_engine.pipeline.config import TYPE_MUST, EngineConfig
    for opt in schema():
        assert opt["type"] in TYPE_MUST and opt["doc"] and opt["group"], opt["name"]
        if opt["min"] is not None or opt["choices"] or opt["max_option"] or opt["nonblank"]:
            assert opt["must"].startswith("must be "), opt["name"]
        if opt["max_option"]:
            assert opt["max_option"] in EngineConfig.__dataclass_fields__
    lua = (REPO / "lua" / "rwkv" / "engine_options.lua").read_text()
    assert lua.startswith("-- GENERATED") and "DO NOT EDIT" in lua


# -- (c) setup() stops a bad engine option before Python -------------------------------
SETUP_LUA = r"""
local calls, notes = {}, {}
local remote = require("rwkv.host")
remote.call = function(name, ...)
  table.insert(calls, { name = name, args = { ... } })
  return 0
end
vim.notify = function(msg, level)
  table.insert(notes, { msg = msg, level = level })
end
local rwkv = require("rwkv")
local out = {}
out.first = rwkv.setup({ engine = { top_p = 0 } })
out.calls_after_first = #calls
out.notes_after_first = vim.deepcopy(notes)
-- with the engine already running, a new setup() would reconfigure it at once
remote.state.started = true
out.second = rwkv.setup({ top_p = 0 })   -- the top-level shorthand
out.calls_after_second = #calls
-- what the first InsertEnter does: start the engine with the (unchanged) options
remote.state.started = false
rwkv.start_engine()
out.sent = vim.tbl_map(function(c) return { name = c.name, engine = c.args[1] } end, calls)
out.notes = notes
io.stdout:write(vim.json.encode(out))
"""


def test_setup_rejects_top_p_zero_once_and_sends_nothing(tmp_path):
    out = run_lua(tmp_path, SETUP_LUA)
    expected = "rwkv.setup: engine option top_p = 0.0: must be in (0, 1]"
    assert out["first"] is False and out["second"] is False
    assert out["notes_after_first"] == [{"msg": expected, "level": 4}]     # vim.log.levels.ERROR
    assert [n["msg"] for n in out["notes"]] == [expected, expected]
    assert out["calls_after_first"] == 0 and out["calls_after_second"] == 0
    for call in out["sent"]:
        assert "top_p" not in (call["engine"] or {}), call
    from rwkv_engine.pipeline.config import EngineConfig
    with pytest.raises(ValueError) as info:
        EngineConfig.from_dict({"top_p": 0})
    assert "rwkv.setup: " + str(info.value) == expected                  # the engine's words


# -- (d) the editor schema: lua/rwkv/editor_options.lua ---------------------------------
EDITOR_SCHEMA = Path("lua/rwkv/editor_options.lua")


def gen_module():
    spec = importlib.util.spec_from_file_location("gen_config_under_test", GEN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def copy_checkout_files(root: Path) -> None:
    """What gen_config.py reads and writes, copied under `root` (for --root)."""
    for rel in ("lua/rwkv/engine_options.lua", "doc/rwkv.txt", str(EDITOR_SCHEMA)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, root / rel)


def edit_schema(root: Path, old: str, new: str) -> None:
    path = root / EDITOR_SCHEMA
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


def test_editor_help_section_is_what_the_schema_renders():
    if NVIM is None:
        pytest.skip("nvim not found")
    g = gen_module()
    section = g.render_editor_help(g.load_editor_schema(REPO))
    doc = (REPO / "doc" / "rwkv.txt").read_text()
    assert f"{g.EDITOR_BEGIN}\n{section}{g.EDITOR_END}\n" in doc
    assert doc.index(g.EDITOR_END) < doc.index("*rwkv-engine-options*")    # in section 4
    for line in section.splitlines():
        assert len(line) <= g.DOC_WIDTH, line


DEFAULTS_LUA = r"""
local config = require("rwkv.config")
io.stdout:write(vim.json.encode({ schema = require("rwkv.editor_options"), defaults = config.defaults }))
"""


def test_defaults_have_exactly_the_schema_options(tmp_path):
    """Every key of config.defaults (groups: every key inside) is a schema option with that
    default, and every schema option is there, but the optional ones (default nil)."""
    out = run_lua(tmp_path, DEFAULTS_LUA)

    def expected(options):
        return {o["name"]: expected(o["fields"]) if "fields" in o else o["default"]
                for o in options if not o.get("optional")}

    assert out["defaults"] == expected(out["schema"])
    optional = [f"{g['name']}.{o['name']}" for g in out["schema"] for o in g.get("fields", ()) if o.get("optional")]
    assert optional == ["python.env", "python.torch_spec", "python.torch_index_url"]
    assert set(out["defaults"]) >= {"enabled", "ghost", "keymaps", "python", "lsp", "engine"}


def test_check_fails_on_an_option_without_doc(tmp_path):
    copy_checkout_files(tmp_path)
    edit_schema(tmp_path, '{ name = "yank", type = "boolean", default = true,',
                '{ name = "paste", type = "boolean", default = true },\n'
                '    { name = "yank", type = "boolean", default = true,')
    res = gen("--check", "--root", str(tmp_path))
    assert res.returncode != 0
    assert "context.paste: no doc" in res.stderr, res.stderr
    assert gen("--root", str(tmp_path)).returncode != 0                 # nor writes anything
    assert (tmp_path / "doc" / "rwkv.txt").read_text() == (REPO / "doc" / "rwkv.txt").read_text()


def test_check_fails_on_a_default_changed_without_regenerating(tmp_path):
    copy_checkout_files(tmp_path)
    edit_schema(tmp_path, 'name = "debounce_ms", type = "number", default = 75,',
                'name = "debounce_ms", type = "number", default = 80,')
    res = gen("--check", "--root", str(tmp_path))
    assert res.returncode == 1
    assert "stale: doc/rwkv.txt" in res.stderr and "engine_options.lua" not in res.stderr
    assert gen("--root", str(tmp_path)).returncode == 0
    doc = (tmp_path / "doc" / "rwkv.txt").read_text()
    assert re.search(r"^debounce_ms = 80 +Milliseconds", doc, re.M)
    assert "debounce_ms = 75" not in doc
    assert gen("--check", "--root", str(tmp_path)).returncode == 0


def test_check_names_a_hand_edited_editor_option(tmp_path):
    copy_checkout_files(tmp_path)
    doc = tmp_path / "doc" / "rwkv.txt"
    text = doc.read_text()
    doc.write_text(text.replace("max_width = 80,", "max_width = 90,"))
    assert gen("--check", "--root", str(tmp_path)).returncode == 1
    assert gen("--root", str(tmp_path)).returncode == 0
    assert doc.read_text() == text


@pytest.mark.parametrize("entry, problem", [
    ({"name": "x", "type": "boolean", "default": True}, "x: no doc"),
    ({"name": "x", "type": "bool", "default": True, "doc": "d"}, "x: type 'bool' is not made of"),
    ({"name": "x", "type": "number", "doc": "d"}, "x: needs either a default or optional = true"),
    ({"name": "x", "type": "number", "default": 1, "optional": True, "doc": "d"}, "needs either a default"),
    ({"name": "x", "type": "number", "default": 0, "min": 1, "max": 9, "doc": "d"}, "x: the default 0 is not in 1..9"),
    ({"name": "x", "type": "number", "default": 1.5, "integer": True, "min": 1, "doc": "d"}, "not a whole number"),
    ({"name": "x", "type": "string", "default": 1, "doc": "d"}, "x: the default 1 is not a string"),
    ({"name": "x", "type": "string", "default": "a", "choices": ["b"], "doc": "d"}, "is not one of the choices"),
    ({"name": "x", "type": "string", "default": "a", "nonempty": True, "doc": "d"}, "need a message must"),
    ({"name": "x", "type": "string", "default": "a", "mininum": 1, "doc": "d"}, "x: unknown schema key 'mininum'"),
    ({"name": "x", "type": "string", "default": "a", "min": 1, "doc": "d"}, "x: min applies to a number option"),
    ({"name": "x", "type": "string|false", "default": "a", "contains": "%d", "must": "must have %d", "doc": "d"},
     "x: the default 'a' must have %d"),
    ({"name": "g", "fields": [{"name": "y", "type": "boolean", "default": 1, "doc": "d"}]},
     "g.y: the default 1 is not a boolean"),
    ({"name": "g", "fields": []}, "g: a group needs fields"),
])
def test_schema_problems_are_found(entry, problem):
    problems = gen_module().schema_problems([entry])
    assert any(problem in p for p in problems), problems


def test_the_schema_has_no_problems():
    if NVIM is None:
        pytest.skip("nvim not found")
    g = gen_module()
    assert g.schema_problems(g.load_editor_schema(REPO)) == []


ADDED_OPTION_LUA = r"""
local config = require("rwkv.config")
local function try(opts)
  local ok, err = pcall(config.apply, opts)
  return ok and "ok" or err
end
io.stdout:write(vim.json.encode({
  default = config.defaults.ghost.fade_ms,
  good = try({ ghost = { fade_ms = 9 } }),
  range = try({ ghost = { fade_ms = 10 } }),
  type = try({ ghost = { fade_ms = "slow" } }),
  whole = try({ ghost = { fade_ms = 2.5 } }),
}))
"""


def test_an_option_added_to_the_schema_gets_its_default_and_checks(tmp_path):
    """config.lua holds no per-option code: a new schema entry is defaulted and checked.
    The edited schema comes first on the runtimepath, config.lua from this checkout."""
    root = tmp_path / "plugin"
    copy_checkout_files(root)
    edit_schema(root, '{ name = "annotation",',
                '{ name = "fade_ms", type = "number", integer = true, default = 5, min = 0, max = 9,\n'
                '      doc = "How long the ghost text fades in." },\n    { name = "annotation",')
    out = run_lua(tmp_path, f"vim.opt.rtp:prepend({json.dumps(str(root))})\n" + ADDED_OPTION_LUA)
    assert out == {"default": 5, "good": "ok", "range": "rwkv.setup: ghost.fade_ms = 10 must be in 0..9",
                   "type": "rwkv.setup: ghost.fade_ms: expected number, got string",
                   "whole": "rwkv.setup: ghost.fade_ms = 2.5 must be a whole number"}
    assert gen("--root", str(root)).returncode == 0                       # and its help
    assert re.search(r"^  fade_ms = 5, +How long the ghost text fades in\.\s+Must be a whole number in 0\.\.9\.",
                     (root / "doc" / "rwkv.txt").read_text(), re.M)
