"""`:checkhealth rwkv`, set-up validation, failure modes (no registration, dead host),
:RwkvDownload, and consistency between the Lua options, the engine and :help rwkv."""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from nvim_harness import REPO, require_nvim
from reliability_helpers import bridge_module

pytestmark = [pytest.mark.nvim]


def checkhealth(s) -> str:
    s.cmd("checkhealth rwkv")
    return s.buffer_text()


def test_checkhealth_runs_clean_with_a_registered_plugin(nvim_session, tiny_model_path):
    s = nvim_session({"engine": {"model": str(tiny_model_path), "device": "cpu"}})
    report = checkhealth(s)
    assert "ERROR" not in report, report
    assert "remote plugin rwkv_nvim is registered" in report
    assert re.search(r"OK pynvim \d", report)
    assert "OK rwkv_engine importable" in report
    assert "OK torch" in report
    assert f"OK model {tiny_model_path}" in report
    assert not s.errors_in_messages(), s.messages()


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the warning off Apple Silicon")
def test_checkhealth_warns_that_mps_needs_an_apple_silicon_mac(nvim_session, tiny_model_path):
    s = nvim_session({"engine": {"model": str(tiny_model_path), "device": "mps"}})
    report = checkhealth(s)
    assert 'WARNING engine.device = "mps" needs an Apple Silicon Mac: the model runs on the CPU' in report, report


def test_checkhealth_spells_out_the_fix_when_not_registered(nvim_session, tiny_model_path):
    s = nvim_session({"engine": {"model": str(tiny_model_path)}}, manifest=False)
    report = checkhealth(s)
    assert "ERROR remote plugin rwkv_nvim is not registered" in report
    assert "run :UpdateRemotePlugins, then restart Neovim" in report


def test_checkhealth_reports_a_missing_model(nvim_session, tmp_path):
    s = nvim_session({"engine": {"model": str(tmp_path / "nope.pth")}})
    report = checkhealth(s)
    assert "not found" in report and ":RwkvDownload" in report


def test_checkhealth_finds_a_downloaded_model_by_its_short_name(nvim_session, tiny_model_path, tmp_path):
    """The health probe resolves short names through the engine's download module."""
    got = tmp_path / "models" / "rwkv7-g1a-0.1b-20250101-ctx4096.pth"
    got.parent.mkdir()
    got.write_bytes(tiny_model_path.read_bytes())
    s = nvim_session({"engine": {"model": "g1-0.1b", "download_dir": str(got.parent)}})
    report = checkhealth(s)
    assert f"OK model g1-0.1b: {got}" in report, report


def test_unregistered_plugin_says_so_once_and_stays_quiet(nvim_session):
    s = nvim_session({"debounce_ms": 10}, manifest=False)
    s.cmd("setlocal filetype=python")
    s.feed("ia = 1<Esc>")
    s.feed("ob = 2<Esc>")
    s.wait_for("require('rwkv.host').state.failed ~= nil", timeout=10)
    s.wait_for("vim.api.nvim_buf_line_count(0) == 2 and vim.fn.mode() == 'n'", timeout=10)
    s.settle()
    msgs = s.messages()
    assert msgs.count("UpdateRemotePlugins") == 1, msgs
    assert "E117" not in msgs and "E5108" not in msgs, msgs
    s.cmd("RwkvStatus")
    assert "not registered" in s.messages().split("rwkv: suggestions")[-1]


def test_dead_python_host_degrades_quietly_and_status_says_why(nvim_session, tiny_model_path):
    s = nvim_session({"debounce_ms": 10, "engine": {"model": str(tiny_model_path), "device": "cpu"}})
    s.cmd("setlocal filetype=python")
    s.feed("ix")
    s.wait_for("vim.fn['remote#host#IsRunning']('python3') == 1", timeout=60, what="the python3 host")
    pid = s.lua("return vim.fn.jobpid(vim.fn['remote#host#Require']('python3'))")
    os.kill(pid, signal.SIGKILL)  # the host process this test's nvim started
    s.wait_for("vim.fn.jobwait({vim.fn['remote#host#Require']('python3')}, 0)[1] ~= -1", timeout=10)
    s.feed("yz<Esc>oabc")
    s.wait_for("vim.api.nvim_get_current_line() == 'abc'", timeout=10)
    s.wait_for("require('rwkv.host').state.failed ~= nil", timeout=10)
    s.feed("def")
    s.wait_for("vim.api.nvim_get_current_line() == 'abcdef'", timeout=10)
    s.feed("<Esc>")
    msgs = s.messages()
    assert msgs.count("suggestions stopped") <= 1, msgs
    assert "Traceback" not in msgs and "E5108" not in msgs, msgs
    s.cmd("RwkvStatus")
    assert "python3 host exited" in s.messages()
    assert s.lua("return require('rwkv').statusline()") == "rwkv:err"


def test_unusable_python_gives_one_clean_message_and_health_says_why(nvim_session):
    s = nvim_session({"debounce_ms": 10})
    s.lua("vim.g.python3_host_prog = '/nonexistent/python3'")
    s.cmd("setlocal filetype=python")
    s.feed("iabc")
    s.wait_for("require('rwkv.host').state.failed ~= nil", timeout=30)
    s.feed("def<Esc>")
    s.wait_for("vim.fn.mode() == 'n'", timeout=10)
    ours = [line for line in s.messages().splitlines() if line.startswith("rwkv:")]
    assert ours == ["rwkv: the Python host failed: Failed to load python3 host. Run :checkhealth rwkv."]
    report = checkhealth(s)
    assert "ERROR g:python3_host_prog = /nonexistent/python3 is not executable" in report


@pytest.mark.parametrize("opts, fragment", [
    ({"candidate": 3}, "unknown option candidate "),
    ({"candidates": 99}, "engine option candidates = 99: must be in 1..16"),
    ({"engine": {"candidates": 99}}, "engine option candidates = 99: must be in 1..16"),
    ({"engine": {"device": "tpu"}}, "engine option device = 'tpu': must be one of"),
    ({"engine": {"bogus": 1}}, "unknown engine option 'bogus'"),
    ({"keymaps": {"pick": "<M-x>"}}, "keymaps.pick must contain %d"),
    ({"filetypes": {"python": "yes"}}, 'filetypes["python"]: expected boolean, got string'),
    ({"debounce_ms": "fast"}, "debounce_ms: expected number, got string"),
    ({"debounce_ms": -1}, "debounce_ms = -1 must be in 0..10000"),
    ({"ghost": {"max_lines": 2.5}}, "ghost.max_lines = 2.5 must be a whole number"),
    ({"keymaps": {"accept": ""}}, "keymaps.accept must be a key or false (not an empty string)"),
    ({"float": 1}, "float: expected table, got number"),
])
def test_setup_rejects_bad_options_with_one_line(nvim_session, opts, fragment):
    s = nvim_session(manifest=False)
    ok = s.lua("return require('rwkv').setup(...)", opts)
    assert ok is False
    msgs = s.messages()
    assert fragment in msgs, msgs
    assert len([line for line in msgs.splitlines() if "rwkv.setup" in line]) == 1


def editor_option_cases(options: list) -> list:
    """(opts, message or None, option) for every option of rwkv.editor_options: a value of a
    wrong type, the edges of its range, its choices, and the values its own rules reject;
    None: setup() accepts it. Groups: a non-table and an unknown key inside."""
    cases = [({"bogus_option": 1}, "unknown option bogus_option (known: ", "")]
    for group in options:
        if "fields" in group:
            g = group["name"]
            cases += [({g: 12345}, f"{g}: expected table, got number", g),
                      ({g: {"bogus": 1}}, f"unknown option {g}.bogus (known: ", g)]
            cases += [({g: {o: v}}, msg, f"{g}.{o}") for o, v, msg in value_option_cases(g + ".", group["fields"])]
        else:
            cases += [({o: v}, msg, o) for o, v, msg in value_option_cases("", [group])]
    return cases


def value_option_cases(prefix: str, options: list) -> list:
    """(name, value, message or None) for value options whose full names start with prefix."""
    lua_type = {int: "number", float: "number", str: "string", bool: "boolean", list: "table", dict: "table"}
    out = []
    for opt in options:
        name, full = opt["name"], prefix + opt["name"]
        types = [t for t in opt["type"].split("|") if t != "false"]
        wrong = next(v for v in (12345, "x", True) if lua_type[type(v)] not in types)
        out.append((name, wrong, f"{full}: expected {'|'.join(types)}, got {lua_type[type(wrong)]}"))
        if not opt.get("optional"):
            out.append((name, opt["default"], None))
        elif types == ["string"]:
            out.append((name, "/some/value", None))
        if "false" in opt["type"].split("|"):
            out.append((name, False, None))
        if "min" in opt:
            lo, hi = opt["min"], opt["max"]
            out += [(name, lo, None), (name, hi, None),
                    (name, lo - 1, f"{full} = {lo - 1} must be in {lo}..{hi}"),
                    (name, hi + 1, f"{full} = {hi + 1} must be in {lo}..{hi}")]
            if opt.get("integer"):
                out.append((name, lo + 0.5, f"{full} = {lo + 0.5} must be a whole number"))
        for choice in opt.get("choices", ()):
            out.append((name, choice, None))
        if "choices" in opt:
            out.append((name, "bogus", f'{full} = "bogus" must be one of {", ".join(opt["choices"])}'))
        if opt.get("nonempty"):
            out.append((name, "", f"{full} {opt['must']}"))
        if "contains" in opt:
            out += [(name, "<M-x>", f"{full} {opt['must']}"), (name, "<C-" + opt["contains"] + ">", None)]
        if "items" in opt:
            out += [(name, [".", "("], None), (name, [1], f"{full} {opt['must']}"),
                    (name, [""], f"{full} {opt['must']}")]
        if "map_of" in opt:
            out += [(name, {"python": False}, None),
                    (name, {"python": 12345}, f'{full}["python"]: expected {opt["map_of"]}, got number')]
    return out


def test_setup_checks_every_schema_option_with_its_message(nvim_session):
    """Parity between rwkv.editor_options and what setup() does: every option (groups
    included) rejects a wrong type, and each rule in its entry rejects and accepts what it
    says, with the message the schema implies."""
    s = nvim_session(manifest=False)
    options = s.lua("return require('rwkv.editor_options')")
    cases = editor_option_cases(options)
    got = s.lua("""
      local out = {}
      for i, opts in ipairs(...) do
        local ok, err = pcall(require('rwkv.config').apply, opts)
        out[i] = ok and vim.NIL or err
      end
      return out""", [opts for opts, _, _ in cases])
    wrong = []
    for (opts, want, _), err in zip(cases, got):
        if want is None and err is None:
            continue
        if want is None or err is None or not (err == "rwkv.setup: " + want or
                                                want.endswith("(known: ") and err.startswith("rwkv.setup: " + want)):
            wrong.append(f"{opts!r}: want {want!r}, got {err!r}")
    assert not wrong, "\n".join(wrong)
    names = {f"{g['name']}.{o['name']}" for g in options for o in g.get("fields", ())} | {g["name"] for g in options}
    assert {name for _, want, name in cases if want} >= names         # every option rejects a value
    assert {name for _, want, name in cases if not want} >= names - {g["name"] for g in options if "fields" in g}


def test_setup_accepts_a_full_valid_table(nvim_session):
    s = nvim_session(manifest=False)
    opts = {"enabled": False, "auto_trigger": False, "debounce_ms": 0, "filetypes": {"*": False, "lua": True},
            "float": {"enabled": False, "max_lines": 2}, "keymaps": {"accept_word": False, "pick": False},
            "engine": {"model": "g1-0.4b", "device": "cuda", "candidates": 8, "temperature": 0.0,
                       "top_p": 1.0, "stop": ["\n\n"], "cache_disk_mb": 0}}
    assert s.lua("return require('rwkv').setup(...)", opts) is True
    assert s.lua("return require('rwkv.config').engine('candidates')") == 8
    assert s.lua("return require('rwkv.config').engine('n_prefix')") == 256
    assert not s.errors_in_messages(), s.messages()


def test_lua_engine_options_match_engine_config(nvim_session):
    from dataclasses import MISSING, fields

    from rwkv_engine.pipeline.config import EngineConfig

    s = nvim_session(manifest=False)
    lua_types = s.lua("return require('rwkv.engine_options').by_name")
    mirror = {n: s.lua(f"return require('rwkv.config').engine('{n}')") for n in lua_types}
    assert set(lua_types) == {f.name for f in fields(EngineConfig)}
    defaults = EngineConfig()
    for name, value in mirror.items():
        assert getattr(defaults, name) == value, name
    assert all(f.default is not MISSING or f.default_factory is not MISSING for f in fields(EngineConfig))


def test_help_documents_every_command_key_and_option(nvim_session):
    from dataclasses import fields

    from rwkv_engine.pipeline.config import EngineConfig

    doc = (REPO / "doc" / "rwkv.txt").read_text()
    s = nvim_session(manifest=False)
    defaults = s.lua("return require('rwkv.config').defaults")
    for cmd in ("RwkvToggle", "RwkvEnable", "RwkvDisable", "RwkvStatus", "RwkvDownload"):
        assert f"*:{cmd}*" in doc
        assert s.nvim.call("exists", f":{cmd}") == 2
    for name, value in defaults.items():
        assert re.search(rf"^\s*{name} = ", doc, re.M), name
        if isinstance(value, dict) and name not in ("filetypes", "engine"):
            for sub in value:
                assert re.search(rf"^\s*{sub} = ", doc, re.M), f"{name}.{sub}"
    for lhs in defaults["keymaps"].values():
        assert lhs in doc, lhs
    for f in fields(EngineConfig):
        assert re.search(rf"^{f.name} = ", doc, re.M), f"engine.{f.name}"


def test_help_tags_build(tmp_path):
    require_nvim()
    from nvim_harness import NVIM

    (tmp_path / "doc").mkdir()
    (tmp_path / "doc" / "rwkv.txt").write_text((REPO / "doc" / "rwkv.txt").read_text())
    proc = subprocess.run([NVIM, "--headless", "--clean", f"+helptags {tmp_path / 'doc'}", "+qa!"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "E154" not in proc.stderr, proc.stderr  # E154: duplicate tag
    tags = {line.split("\t")[0] for line in (tmp_path / "doc" / "tags").read_text().splitlines()}
    assert {"rwkv", "rwkv-options", "rwkv-engine-options", "rwkv-keys", ":RwkvToggle", ":RwkvEnable",
            ":RwkvDisable", ":RwkvStatus", ":RwkvDownload", "rwkv-statusline", "rwkv-events"} <= tags


def test_rplugin_entry_is_light():
    code = ("import sys; sys.path.insert(0, 'rplugin/python3'); import rwkv_nvim; "
            "heavy = [m for m in ('torch', 'numpy', 'rwkv_engine.pipeline.service', 'rwkv_engine.core.model') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_download_command_reports_the_result(nvim_session, tmp_path):
    from fake_hf_server import FakeHub

    name = "rwkv7-g1a-0.1b-20250728-ctx4096.pth"
    with FakeHub({name: b"x" * 1000}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        s = nvim_session(extra_env=env)
        s.cmd("RwkvDownload g1-0.1b")
        s.wait_for("vim.fn.execute('messages'):find('downloaded g1%-0%.1b') ~= nil", timeout=60,
                   what="the download notice")
        s.cmd("RwkvDownload g9-nope")
        s.wait_for("vim.fn.execute('messages'):find('download of g9%-nope failed') ~= nil", timeout=60,
                   what="the failure notice")
    assert name in s.messages()


# -- the Python bridge without Neovim: threading contract and failure reporting ----------
class FakeNvim:
    """Records exec_lua calls; async_call queues work for the test's main thread to run."""

    def __init__(self):
        self.main = threading.current_thread()
        self.queue = queue.Queue()
        self.calls = []   # (code, args, thread)

    def async_call(self, fn, *args):
        self.queue.put((fn, args))

    def exec_lua(self, code, *args, async_=False):
        self.calls.append((code, args, threading.current_thread()))

    def drain(self, until, timeout=30.0):
        deadline = time.monotonic() + timeout
        while not until():
            try:
                fn, args = self.queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"timed out; calls: {self.calls}")
            fn(*args)




def test_bridge_reports_a_bad_engine_option_once():
    bridge = bridge_module()
    nvim = FakeNvim()
    b = bridge.Bridge(nvim)
    b.start({"candidates": 99})
    nvim.drain(lambda: nvim.calls)
    (code, args, _), = nvim.calls
    assert "on_event" in code and args[0] == "error"
    assert "candidates" in args[1]["message"] and "\n" not in args[1]["message"]
    assert b.status()["error"] == args[1]["message"]
    b.request({"id": 1})           # no service: kept, never raises
    b.close()


def test_bridge_forwards_service_callbacks_only_through_async_call(monkeypatch):
    import rwkv_engine.pipeline.service as service_mod

    class FakeService:
        def __init__(self, config, on_event=None):
            self.on_event = on_event

        def start(self):
            self.on_event("ready", {"model": "fake", "device": "cpu", "dtype": "fp32", "load_ms": 1.0})

        def submit(self, request, on_partial, on_done):
            def work():   # a worker thread, like the real service
                on_partial({"id": request["id"], "text": "a"})
                on_done({"id": request["id"], "candidates": [{"text": "ab", "logprob": -1.0}],
                         "stats": {"ms_total": 1.0}})
            threading.Thread(target=work).start()
            return request["id"]

        def status(self):
            return {"loaded": True, "cache": {}, "last": {}}

        def close(self):
            pass

    monkeypatch.setattr(service_mod, "CompletionService", FakeService)
    bridge = bridge_module()
    nvim = FakeNvim()
    b = bridge.Bridge(nvim)
    b.request({"id": 7, "lines": []})   # before the service exists: submitted once it starts
    b.start([])                          # an empty Lua table arrives as a list
    nvim.drain(lambda: len(nvim.calls) >= 3)
    kinds = [c[0] for c in nvim.calls]
    assert any("on_event" in k for k in kinds)
    assert any("on_partial" in k for k in kinds) and any("on_done" in k for k in kinds)
    assert all(thread is nvim.main for _, _, thread in nvim.calls)
    done = next(args[0] for code, args, _ in nvim.calls if "on_done" in code)
    assert done["id"] == 7 and done["candidates"][0]["text"] == "ab"
    b.close()


def test_bridge_uses_the_checkout_engine_when_the_package_is_not_installed(tmp_path):
    # a Python that cannot import rwkv_engine (the editable-install finder removed)
    code = f"""
import importlib.util, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path = [p for p in sys.path if not p.startswith({str(REPO)!r}) or p.startswith(sys.prefix)]
assert importlib.util.find_spec("rwkv_engine") is None, "could not hide the installed package"
sys.path.insert(0, {str(REPO / "rplugin" / "python3")!r})
from rwkv_nvim.bridge import import_engine
import_engine()
from rwkv_engine.pipeline.config import EngineConfig
import rwkv_engine
print(rwkv_engine.__file__, EngineConfig.__module__)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(REPO / "rwkv_engine" / "__init__.py"), "rwkv_engine.pipeline.config"]


def test_a_failed_setup_keeps_the_plugin_off_instead_of_starting_with_defaults(nvim_session):
    """setup() with a bad option, then VimEnter's default setup: nothing starts with the
    defaults (the user's options were wrong, not absent) and :RwkvStatus says why."""
    s = nvim_session({"engine": {"top_p": 0}}, manifest=False)
    s.lua("require('rwkv').ensure_setup()")
    assert s.lua("return #vim.api.nvim_get_autocmds({event = 'InsertEnter', pattern = '*'})"
                 " == 0 or #vim.tbl_filter(function(a) return a.group_name == 'rwkv' end,"
                 " vim.api.nvim_get_autocmds({event = 'InsertEnter'})) == 0")
    lines = s.lua("return require('rwkv').status_lines()")
    assert "setup() failed" in lines[0] and "top_p" in lines[0], lines
