"""The probes behind `:checkhealth rwkv` (`python -m rwkv_engine.cli.health`).

lua/rwkv/health.lua runs them in the plugin's root with the Python the host uses, which
may not have the package installed (a plugin manager's clone with the manifest host) and
may have no torch at all: the probe must still answer with one JSON line and never import
torch. The editor side is tested in tests/editor/test_nvim_health.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def probe(*args, python=sys.executable, flags=()):
    out = subprocess.run([python, *flags, "-m", "rwkv_engine.cli.health", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    return out


def test_the_host_report_names_the_packages_the_kernels_and_the_default_model():
    out = probe("host")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip().splitlines()) == 1          # health.lua decodes the last line
    info = json.loads(out.stdout)
    for mod in ("pynvim", "torch", "rwkv_engine", "huggingface_hub", "msgpack"):
        assert info[mod] is True, mod
    assert info["engine_dir"] == str(REPO / "rwkv_engine")
    assert info["model_path"] == str(REPO / "rwkv_engine" / "data" / "default-model.pth")
    assert info["model_found"] is True
    assert info["torch_version"] and isinstance(info["kernels"], list)


def test_the_host_probe_never_imports_torch():
    code = ("import sys, io, contextlib\nfrom rwkv_engine.cli import health\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    health.main(['host'])\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))[:3])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_model_that_is_not_there_is_reported_with_its_path(tmp_path):
    missing = tmp_path / "nope.pth"
    info = json.loads(probe("host", str(missing)).stdout)
    assert info["model_found"] is False and info["model_path"] == str(missing)


def test_a_python_without_the_package_installed_uses_the_checkout():
    """The base interpreter (no venv site-packages): the package is not installed there, yet
    `python -m` from the plugin's root finds this checkout's rwkv_engine/ and says so."""
    base = Path(sys.base_prefix) / "bin" / Path(sys.executable).name
    if not base.is_file() or Path(sys.base_prefix) == Path(sys.prefix):
        pytest.skip("the test suite is not running in a virtualenv")
    check = subprocess.run([str(base), "-s", "-E", "-c",
                            "import importlib.metadata as m\ntry:\n    m.version('rwkv-nvim')\n"
                            "except m.PackageNotFoundError:\n    print('absent')"],
                           cwd=Path(sys.base_prefix), capture_output=True, text=True, timeout=60)
    if check.stdout.strip() != "absent":
        pytest.skip("rwkv-nvim is installed in the base interpreter too")
    out = probe("host", python=str(base), flags=("-s", "-E"))
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["rwkv_engine_installed"] is False
    assert info["engine_dir"] == str(REPO / "rwkv_engine")
    assert info["executable"] == str(base)


def test_the_installed_package_is_reported_as_installed():
    from importlib.metadata import PackageNotFoundError, version
    try:
        version("rwkv-nvim")
    except PackageNotFoundError:
        pytest.skip("the suite runs without the package installed")
    info = json.loads(probe("host").stdout)
    assert info["rwkv_engine_installed"] is True       # the quick start installs it (pip -e)


@pytest.mark.parametrize("payload, error", [
    ('{"backend": "llama.cpp", "url": "ftp://x"}', "url"),
    ('{"candidates": 99}', "candidates"),
    ("not json", "Expecting value"),
])
def test_the_server_probe_answers_bad_options_as_json(payload, error):
    out = probe("server", payload)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["ok"] is False and error in info["error"], info


def test_the_server_probe_of_the_local_backend_is_ok():
    info = json.loads(probe("server", "[]").stdout)       # vim.json.encode({}) is "[]"
    assert info["ok"] is True and info["backend"] == "local", info


def test_an_unknown_probe_is_a_usage_error():
    out = probe("bogus")
    assert out.returncode == 2 and "usage" in out.stderr
