"""Installing as a new user would: the plugin's own environment and host.

- the build as lazy.nvim runs it (its build function, in a coroutine, yielding progress)
  in a headless Neovim with fresh HOME/XDG directories and no compiled kernel, then
  insert-mode typing in the same Neovim shows a suggestion: no :UpdateRemotePlugins, no
  manifest, no restart; the kernel was compiled by the build, not at the first keystroke;
- the own host: status and health report it; killed once it restarts, killed again one
  message and silence;
- failures, each one clear message and no hang: no network, no venv module, no
  python3, an environment without torch or without pynvim.

The full build (a fresh virtualenv with torch) runs once per session (module fixture)
and prints its timings: build, host start, first suggestion.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nvim_harness import REPO, NvimSession, require_nvim, start_nvim

pytestmark = [pytest.mark.nvim]

SUGGEST = "require('rwkv.suggest')"
REMOTE = "require('rwkv.host')"
BUILD_TIMEOUT = float(os.environ.get("RWKV_TEST_BUILD_TIMEOUT", "1200"))

# What lazy.nvim (>= 11) does with `build = function() require("rwkv.build").run() end`:
# the function runs in a coroutine resumed from the event loop; a yielded value is a
# progress message ({msg, level} or a string), an error is the build's failure.
LAZY_BUILD = r"""
local build = function() require("rwkv.build").run() end
_G.LAZY = { msgs = {}, done = false }
local t0 = vim.uv.hrtime()
local co = coroutine.create(build)
local function step()
  local ok, res = coroutine.resume(co)
  if not ok then
    _G.LAZY.err = res
  elseif res ~= nil then
    table.insert(_G.LAZY.msgs, type(res) == "table" and res.msg or res)
  end
  if coroutine.status(co) == "dead" then
    _G.LAZY.done, _G.LAZY.seconds = true, (vim.uv.hrtime() - t0) / 1e9
  elseif res ~= nil then
    vim.schedule(step)
  else
    vim.defer_fn(step, 20)
  end
end
vim.schedule(step)
"""


def lazy_build(s: NvimSession, timeout: float = BUILD_TIMEOUT) -> dict:
    s.lua(LAZY_BUILD)
    s.wait_for("_G.LAZY.done", timeout=timeout, what="the build")
    return s.lua("return _G.LAZY")


def ours(s: NvimSession) -> list:
    return [line for line in s.messages().splitlines() if line.startswith("rwkv")]


def wait_suggestion(s: NvimSession, timeout: float = 120) -> None:
    s.wait_for(f"{SUGGEST}.visible() and {SUGGEST}.state.shown.done", timeout=timeout,
               what="a finished suggestion")


def session(root: Path, opts=None, data_dir=None, kernel_dir=None) -> NvimSession:
    """A headless nvim with fresh XDG dirs under `root` and HOME there too; the plugin's
    data directory (its environment) and kernel cache may be shared."""
    root.mkdir(parents=True, exist_ok=True)
    env = {"HOME": str(root / "home"),
           # pip's own cache stays the machine's (warm); XDG_CACHE_HOME is fresh
           "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR") or str(Path.home() / ".cache" / "pip"),
           "RWKV_NVIM_KERNEL_DIR": str(kernel_dir or root / "cache" / "rwkv.nvim" / "kernels")}
    if data_dir:
        env["XDG_DATA_HOME"] = str(data_dir)
    (root / "home").mkdir(exist_ok=True)
    return start_nvim(root, {"debounce_ms": 20, **(opts or {})}, manifest=False, extra_env=env)


# -- the full build, once -----------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    require_nvim()
    root = tmp_path_factory.mktemp("install")
    s = session(root / "first")
    timings = {}
    try:
        result = lazy_build(s)
        timings["build_s"] = round(result["seconds"], 1)
        s.cmd("setlocal filetype=python")
        t0 = time.monotonic()
        s.feed("idef hello(name):<CR>return ")
        wait_suggestion(s, timeout=300)
        timings["first_suggestion_s"] = round(time.monotonic() - t0, 2)
        timings["host_start_ms"] = round(s.lua(f"return {REMOTE}.state.ready_ms") or -1)
        s.feed("<Esc>")
        print("\nrwkv.nvim first use timings: " + json.dumps(timings))
        yield {"session": s, "result": result, "timings": timings, "root": root,
               "data": root / "first" / "data", "kernels": root / "first" / "cache" / "rwkv.nvim" / "kernels"}
    finally:
        s.close()


@pytest.mark.slow
def test_lazy_build_then_typing_suggests_without_update_remote_plugins(built):
    s, result = built["session"], built["result"]
    assert result.get("err") is None, result
    msgs = result["msgs"]
    assert any("installing torch" in m for m in msgs), msgs
    assert any("compiling the WKV-7 kernels" in m for m in msgs), msgs
    assert any("building the WKV-7 cpu kernel" in m for m in msgs), msgs   # compiled by the build
    assert any("cpu: ready in" in m for m in msgs), msgs
    assert "environment is ready" in msgs[-1], msgs[-1]
    env = built["data"] / "nvim" / "rwkv.nvim" / "venv"
    assert (env / "bin" / "python").exists()
    # the suggestion came from the own host: no manifest, no registered functions
    assert s.lua(f"return {REMOTE}.state.kind") == "own"
    assert s.nvim.call("exists", "*RwkvRequest") == 0
    assert not (built["root"] / "first" / "rplugin.vim").exists()
    # and not from a kernel compiled at the first keystroke
    assert not any("building the WKV-7" in m for m in ours(s)), ours(s)
    assert not s.errors_in_messages(), s.messages()
    log = Path(s.lua("return require('rwkv.build').log_path()"))
    assert "ready in" in log.read_text()


@pytest.mark.slow
def test_status_and_health_name_the_own_host_and_environment(built):
    s = built["session"]
    lines = s.lua("return require('rwkv').status_lines()")
    host = next(line for line in lines if line.startswith("host: "))
    assert host.startswith("host: own (the plugin's environment exists)"), host
    assert "pid %d" % s.lua(f"return {REMOTE}.state.pid") in host and " MB resident" in host, host
    s.cmd("checkhealth rwkv")
    report = s.buffer_text()
    assert "ERROR" not in report, report
    assert "OK the plugin's own host" in report
    assert f"OK environment: {built['data'] / 'nvim' / 'rwkv.nvim' / 'venv'}" in report
    assert "Python 3." in report and "OK torch 2." in report
    # the line about the torch build follows the torch the build installed, whichever it is
    py = built["data"] / "nvim" / "rwkv.nvim" / "venv" / "bin" / "python"
    cuda, hip = subprocess.run([str(py), "-c", "import torch; print(torch.version.cuda, getattr(torch.version, 'hip', None))"],
                               capture_output=True, text=True, timeout=120).stdout.split()
    if cuda != "None":
        assert f"OK torch built with CUDA {cuda}" in report, report
    elif hip != "None":
        assert f"OK torch built with ROCm/HIP {hip}" in report, report
    else:
        assert "torch is CPU-only" in report, report
    assert "OK compiled WKV-7 kernels: cpu" in report, report
    assert "OK running: pid" in report


@pytest.mark.slow
def test_a_killed_host_restarts_once_then_stops_with_one_message(built, tmp_path):
    s = session(tmp_path / "kill", data_dir=built["data"], kernel_dir=built["kernels"])
    try:
        s.cmd("setlocal filetype=python")
        s.feed("iimport os<CR>x = ")
        wait_suggestion(s)
        pid = s.lua(f"return {REMOTE}.state.pid")
        os.kill(pid, signal.SIGKILL)     # the host this test's nvim started
        s.wait_for(f"{REMOTE}.state.restarts == 1 and {REMOTE}.state.ready ~= nil", timeout=30,
                   what="the restarted host")
        assert s.lua(f"return {REMOTE}.state.pid") != pid
        s.feed("<CR>y = ")
        wait_suggestion(s)               # RwkvStart was sent again: suggestions resume
        os.kill(s.lua(f"return {REMOTE}.state.pid"), signal.SIGKILL)
        s.wait_for(f"{REMOTE}.state.failed ~= nil", timeout=30)
        for keys in ("<CR>z = 1", "<CR>w = 2"):
            s.feed(keys)
            s.settle()
        s.wait_for("vim.api.nvim_get_current_line() == 'w = 2'", timeout=10)
        s.lua("vim.wait(300)")
        s.feed("<Esc>")
        msgs = ours(s)
        assert len([m for m in msgs if "restarted it" in m]) == 1, msgs
        assert len([m for m in msgs if "suggestions stopped" in m]) == 1, msgs
        assert "Traceback" not in s.messages() and "E5108" not in s.messages()
        assert s.lua("return require('rwkv').statusline()") == "rwkv:err"
        status = "\n".join(s.lua("return require('rwkv').status_lines()"))
        assert "restarted 1 time (it was killed (signal 9))" in status, status
    finally:
        s.close()


@pytest.mark.slow
def test_rwkv_build_command_repairs_in_the_background_and_restarts_the_host(built, tmp_path):
    s = session(tmp_path / "rebuild", data_dir=built["data"], kernel_dir=built["kernels"])
    try:
        s.cmd("setlocal filetype=python")
        s.feed("ia = ")
        wait_suggestion(s)
        pid = s.lua(f"return {REMOTE}.state.pid")
        s.feed("<Esc>:RwkvBuild<CR>")
        s.wait_for("vim.fn.execute('messages'):find('environment is ready') ~= nil", timeout=300,
                   what="the build's end")
        assert any("building the plugin's Python environment" in m for m in ours(s))
        # the old host is gone; a new one starts at once (the model loads before a keystroke)
        s.wait_for(f"{REMOTE}.state.pid ~= nil and {REMOTE}.state.pid ~= {pid}", timeout=60,
                   what="a new host, started after the build")
        s.wait_for("require('rwkv').status().loaded", timeout=120, what="the model, loaded after the build")
        s.feed("ob = ")
        wait_suggestion(s)
        assert s.lua(f"return {REMOTE}.state.pid") != pid
        assert not s.errors_in_messages(), s.messages()
    finally:
        s.close()


@pytest.mark.parametrize("python, fragment", [
    ({"host": "mine"}, 'python.host = "mine" must be one of auto, own, manifest'),
    ({"bogus": 1}, "unknown option python.bogus"),
    ({"env": 3}, "python.env: expected string, got number"),
    ({"interpreter": ""}, "python.interpreter must not be empty"),
])
def test_setup_checks_the_python_options(tmp_path, python, fragment):
    require_nvim()
    s = session(tmp_path)
    try:
        assert s.lua("return require('rwkv').setup(...)", {"python": python}) is False
        assert fragment in s.messages(), s.messages()
    finally:
        s.close()


# -- failures: one clear message, no hang --------------------------------------------------
def test_build_without_network_fails_with_one_clear_message(tmp_path):
    require_nvim()
    s = session(tmp_path, {"python": {"env": str(tmp_path / "venv")}})
    try:
        # no index, no local wheels, no cache: as on a machine without network
        s.lua("vim.env.PIP_INDEX_URL = 'http://127.0.0.1:9/simple'; vim.env.PIP_CONFIG_FILE = '/dev/null';"
              "vim.env.PIP_NO_CACHE_DIR = '1'; vim.env.PIP_FIND_LINKS = nil; vim.env.PIP_EXTRA_INDEX_URL = nil")
        result = lazy_build(s, timeout=300)
        err = result.get("err") or ""
        assert err.startswith("rwkv.nvim build failed: could not install torch: pip could not reach its "
                              "package index (http://127.0.0.1:9/simple)"), err
        assert "\n" not in err and "full output: " in err
        assert result["seconds"] < 120, result["seconds"]
        assert any("creating virtualenv" in m for m in result["msgs"])
    finally:
        s.close()


FAKE_DEBIAN_VENV = '''
import os, sys
# what `python3 -m venv DIR` does on Debian/Ubuntu without python3-venv: a half-made
# directory and this message
d = sys.argv[-1]
os.makedirs(os.path.join(d, "bin"), exist_ok=True)
os.symlink(sys.executable, os.path.join(d, "bin", "python"))
print("""The virtual environment was not created successfully because ensurepip is not
available.  On Debian/Ubuntu systems, you need to install the python3-venv
package using the following command.

    apt install python3.11-venv

You may need to use sudo with that command.  After installing the python3-venv
package, recreate your virtual environment.

Failing command: %s""" % os.path.join(d, "bin", "python3"))
sys.exit(1)
'''


def test_build_with_a_python_without_venv_says_install_python3_venv(tmp_path):
    require_nvim()
    fake = tmp_path / "fake" / "venv"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(FAKE_DEBIAN_VENV)
    env_dir = tmp_path / "venv"
    s = session(tmp_path / "nvim", {"python": {"env": str(env_dir)}})
    try:
        s.lua("vim.env.PYTHONPATH = ...", str(fake.parent))
        result = lazy_build(s, timeout=120)
        err = result.get("err") or ""
        assert "cannot create virtualenvs: its venv module or ensurepip is missing" in err, err
        assert "sudo apt install python3-venv" in err and ":RwkvBuild" in err, err
        assert not env_dir.exists()      # the half-made directory is not taken for an environment
    finally:
        s.close()


def test_build_without_python3_fails_at_once(tmp_path):
    require_nvim()
    s = session(tmp_path, {"python": {"interpreter": "/nonexistent/python3"}})
    try:
        result = lazy_build(s, timeout=30)
        assert result["err"].startswith("rwkv.nvim build failed: /nonexistent/python3 was not found"), result
        s.feed(":RwkvBuild<CR>")         # the command: one error notification
        s.wait_for("vim.fn.execute('messages'):find('was not found') ~= nil", timeout=10)
        assert s.nvim.call("exists", ":RwkvBuild") == 2
    finally:
        s.close()


def bare_venv(path: Path, with_modules=()) -> Path:
    """A virtualenv without pip; `with_modules` linked from this interpreter's packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    site = next(path.glob("lib/python3*/site-packages"))
    for name in with_modules:
        spec = importlib.util.find_spec(name)
        src = Path(list(spec.submodule_search_locations)[0]) if spec.submodule_search_locations \
            else Path(spec.origin)
        (site / src.name).symlink_to(src)
    return path


def test_an_environment_without_torch_names_the_fix_once_and_health_says_how(tmp_path):
    require_nvim()
    env_dir = bare_venv(tmp_path / "venv", ("pynvim", "msgpack", "greenlet", "typing_extensions"))
    s = session(tmp_path / "nvim", {"python": {"env": str(env_dir)}})
    try:
        s.cmd("setlocal filetype=python")
        s.feed("iabc")
        s.wait_for("require('rwkv').status().error ~= nil", timeout=60, what="the engine error")
        s.feed("def<Esc>")
        s.wait_for("vim.fn.mode() == 'n'", timeout=10)
        msgs = ours(s)
        expected = (f"rwkv: torch is not installed in the plugin's Python environment ({env_dir}): "
                    "run :RwkvBuild to repair it (see :checkhealth rwkv)")
        assert [m for m in msgs if "torch" in m] == [expected], msgs
        s.cmd("checkhealth rwkv")
        report = s.buffer_text()
        assert f"ERROR torch is not installed in the plugin's environment {env_dir}" in report, report
        assert "run :RwkvBuild to create or repair it" in report
    finally:
        s.close()


def test_an_environment_without_pynvim_says_the_host_did_not_start(tmp_path):
    require_nvim()
    env_dir = bare_venv(tmp_path / "venv")
    s = session(tmp_path / "nvim", {"python": {"env": str(env_dir)}})
    try:
        s.cmd("setlocal filetype=python")
        s.feed("iabc")
        s.wait_for(f"{REMOTE}.state.failed ~= nil", timeout=30)
        s.feed("def<Esc>")
        s.wait_for("vim.fn.mode() == 'n'", timeout=10)
        msgs = ours(s)
        assert msgs == [f"rwkv: the plugin's Python host did not start (it exited with code 1: ModuleNotFoundError: "
                        f"No module named 'pynvim'): run :RwkvBuild to repair {env_dir} (see :checkhealth rwkv)"], msgs
        assert s.lua(f"return {REMOTE}.state.restarts") == 0
    finally:
        s.close()


def test_no_environment_keeps_the_manifest_path_and_says_both_fixes(tmp_path):
    require_nvim()
    s = session(tmp_path)
    try:
        assert s.lua(f"return {{{REMOTE}.choose()}}")[0] == "manifest"
        s.cmd("checkhealth rwkv")
        report = s.buffer_text()
        assert "OK Neovim's python3 host through the rplugin manifest" in report
        assert ":RwkvBuild creates the plugin's own environment" in report
    finally:
        s.close()


def test_the_quick_start_config_uses_the_own_host_from_its_venv(tmp_path):
    """tools/demo_init.lua (`quickstart.py run`): this interpreter's virtualenv as the
    plugin's environment, no manifest; typing in the sample file shows a suggestion."""
    import pynvim

    from nvim_harness import NVIM, nvim_env
    require_nvim()
    if sys.prefix == sys.base_prefix:
        pytest.skip("the tests do not run in a virtualenv")
    env = {**nvim_env(tmp_path, manifest=False), "RWKV_NVIM_VENV": sys.prefix}
    target = tmp_path / "sample.py"
    target.write_text((REPO / "examples" / "sample.py").read_text())
    argv = ["env"] + [f"{k}={v}" for k, v in env.items()] + [
        NVIM, "--embed", "--headless", "-u", str(REPO / "tools" / "demo_init.lua"), str(target)]
    s = NvimSession(pynvim.attach("child", argv=argv), tmp_path)
    try:
        s.wait_for("vim.v.vim_did_enter == 1", timeout=30)
        s.feed("Goreturn ")
        wait_suggestion(s)
        assert s.lua(f"return {REMOTE}.state.kind") == "own"
        assert s.lua(f"return {REMOTE}.env_dir()") == str(Path(sys.prefix).resolve())
        assert s.nvim.call("exists", "*RwkvRequest") == 0
    finally:
        s.close()


def test_one_function_table_for_both_hosts(tmp_path):
    require_nvim()
    sys.path.insert(0, str(REPO / "rplugin" / "python3"))
    try:
        import rwkv_nvim
        from rwkv_nvim.functions import FUNCTIONS
    finally:
        sys.path.pop(0)
    exported = {m._nvim_rpc_spec["name"]: m._nvim_rpc_sync        # what :UpdateRemotePlugins registers
                for m in vars(rwkv_nvim.RwkvPlugin).values() if hasattr(m, "_nvim_rpc_spec")}
    assert exported == {name: fn.sync for name, fn in FUNCTIONS.items()}
    s = session(tmp_path)
    try:
        lua_sync = s.lua(f"return vim.tbl_keys({REMOTE}.SYNC)")
        assert sorted(lua_sync) == sorted(n for n, fn in FUNCTIONS.items() if fn.sync)
    finally:
        s.close()
