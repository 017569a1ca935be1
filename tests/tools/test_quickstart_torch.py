"""Issue 21 item 8: which torch the install picks (tools/quickstart.py).

PyPI's torch is the CUDA build (several GB), also on machines without a GPU. With no
NVIDIA/AMD GPU visible the install adds PyTorch's CPU build index, as PyTorch's own
selector does; when that index cannot be reached it falls back to PyPI's default with
one message. Fake indexes on loopback stand in for both; pip itself is asked which
wheel it takes from them.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fake_completion_server import free_port

REPO = Path(__file__).resolve().parents[2]


def quickstart():
    spec = importlib.util.spec_from_file_location("quickstart_torch_test", REPO / "tools" / "quickstart.py")
    qs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qs)
    return qs


def fake_wheel(folder: Path, version: str) -> str:
    """A minimal wheel of a package named torch in ``folder``/torch/; returns its file name."""
    name = f"torch-{version}-py3-none-any.whl"
    (folder / "torch").mkdir(parents=True, exist_ok=True)
    info = f"torch-{version}.dist-info"
    with zipfile.ZipFile(folder / "torch" / name, "w") as z:
        z.writestr("torch/__init__.py", f"__version__ = {version!r}\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    (folder / "torch" / "index.html").write_text(f'<html><body><a href="{name}">{name}</a></body></html>\n')
    return name


@pytest.fixture
def index(tmp_path):
    """Factory: a PEP 503 index on loopback serving one fake torch wheel; returns its URL."""
    servers = []

    def make(version: str) -> str:
        folder = tmp_path / f"index-{len(servers)}"
        fake_wheel(folder, version)
        srv = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(folder)))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield make
    for srv in servers:
        srv.shutdown()


def test_no_gpu_visible_uses_the_cpu_index(index, tmp_path, monkeypatch):
    qs = quickstart()
    cpu = index("2.13.0+cpu")
    monkeypatch.setenv("RWKV_NVIM_TORCH_CPU_INDEX", cpu)
    extra, why = qs.torch_index(None, root=str(tmp_path))      # a root with no GPU files
    assert extra == ["--extra-index-url", cpu]
    assert "no NVIDIA or AMD GPU visible" in why and cpu in why


def test_unreachable_cpu_index_falls_back_to_pypi_with_one_message(tmp_path, monkeypatch):
    qs = quickstart()
    down = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("RWKV_NVIM_TORCH_CPU_INDEX", down)
    extra, why = qs.torch_index(None, root=str(tmp_path))
    assert extra == [] and "cannot be reached" in why and down in why and "\n" not in why


@pytest.mark.parametrize("path", ["dev/nvidia0", "proc/driver/nvidia/version", "dev/kfd"])
def test_a_visible_gpu_keeps_pypis_default(tmp_path, monkeypatch, path):
    qs = quickstart()
    monkeypatch.setenv("RWKV_NVIM_TORCH_CPU_INDEX", f"http://127.0.0.1:{free_port()}")
    (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / path).write_text("")
    assert qs.gpu_visible(str(tmp_path))
    assert qs.torch_index(None, root=str(tmp_path)) == ([], "")
    assert qs.torch_index("https://example.invalid/cu124", root=str(tmp_path)) == (
        ["--extra-index-url", "https://example.invalid/cu124"], "")


def test_pip_takes_the_cpu_build_from_the_extra_index(index, tmp_path, monkeypatch):
    """With PyPI (here a fake one with the "CUDA" 2.13.0) as the index and the CPU index
    as the extra one, pip picks 2.13.0+cpu for torch==2.13.0: the install's arguments
    really select the CPU build."""
    qs = quickstart()
    pypi, cpu = index("2.13.0"), index("2.13.0+cpu")
    monkeypatch.setenv("RWKV_NVIM_TORCH_CPU_INDEX", cpu)
    extra, _ = qs.torch_index(None, root=str(tmp_path))
    out = tmp_path / "got"
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                           "--no-cache-dir", "--isolated", "-d", str(out), "--index-url", pypi, *extra, "torch==2.13.0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [p.name for p in out.iterdir()] == ["torch-2.13.0+cpu-py3-none-any.whl"]


def test_the_build_measures_the_cpu_precision(tmp_path, monkeypatch):
    """Issue 21 item 2: the build (quickstart setup, :RwkvBuild) measures the CPU precision,
    so that the first suggestion finds the verdict cached instead of measuring for ~15 s."""
    qs = quickstart()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("RWKV_NVIM_CPU_PRECISION", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")           # the CPU path, also on a GPU machine
    venv = qs.Venv(Path(sys.executable).parent.parent)
    venv.dir = tmp_path / "venv"                             # the stamp's place; the interpreter is this one
    venv.dir.mkdir()
    venv.py = Path(sys.executable)
    from rwkv_engine.pipeline.config import EngineConfig
    from rwkv_engine.pipeline.loading import resolve_cpu_precision
    config = EngineConfig(cache_dir=str(tmp_path / "cache" / "rwkv.nvim"))
    from rwkv_engine.core import cpu_precision as cp
    cp.forget()
    assert resolve_cpu_precision(config, measure_now=False) is None   # a fresh cache: no verdict
    qs.measure_precision(venv, force=False)
    cp.forget()
    verdict = resolve_cpu_precision(config, measure_now=False)
    assert verdict is not None and verdict.get("decode") in cp.candidates()
    assert (venv.dir / ".rwkv-nvim-precision").exists()
    # another HOME (another cache) needs the step again; the same one does not
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other-home-cache"))
    assert not qs.done_for_this_cache(venv.dir / ".rwkv-nvim-precision",
                                      qs.engine_cache_root() / "cpu-precision.json")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert qs.done_for_this_cache(venv.dir / ".rwkv-nvim-precision", qs.engine_cache_root() / "cpu-precision.json")


def test_a_kernel_stamp_counts_only_for_the_cache_it_filled(tmp_path, monkeypatch):
    """A venv built under one HOME, used under another (or with a cleared cache): the
    quick start builds the kernels again rather than leave it to the first start (~12 s)."""
    qs = quickstart()
    calls = []
    monkeypatch.setattr(qs, "stream", lambda *cmd: (calls.append(cmd), (0, []))[1])
    monkeypatch.delenv("RWKV_NVIM_KERNEL_DIR", raising=False)
    venv = qs.Venv(tmp_path / "venv")
    venv.dir.mkdir()
    for home in ("a", "b"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / home))
        qs.build_kernels(venv, force=False)
        (tmp_path / home / "rwkv.nvim" / "kernels").mkdir(parents=True)   # what the build made
        qs.build_kernels(venv, force=False)                               # done: not again
    assert len(calls) == 2, calls
    import shutil
    shutil.rmtree(tmp_path / "b" / "rwkv.nvim" / "kernels")                # a cleared cache
    qs.build_kernels(venv, force=False)
    assert len(calls) == 3


def test_the_quickstart_cache_root_is_the_engines(tmp_path, monkeypatch):
    from rwkv_engine.pipeline.config import EngineConfig
    qs = quickstart()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for xdg in (None, str(tmp_path / "xdg")):
        if xdg is None:
            monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        else:
            monkeypatch.setenv("XDG_CACHE_HOME", xdg)
        assert qs.engine_cache_root() == EngineConfig().resolved_cache_dir()


def test_a_build_stamp_is_for_the_code_it_was_made_with(tmp_path, monkeypatch):
    """An update of the engine or kernel sources (git pull, lazy.nvim update) builds the
    kernel and measures the precision again at the build, not at the first start."""
    qs = quickstart()
    made = tmp_path / "made"
    made.mkdir()
    stamp = tmp_path / "stamp"
    stamp.write_text(qs.stamp_text(made))
    assert qs.done_for_this_cache(stamp, made)
    monkeypatch.setattr(qs, "engine_code_digest", lambda: "another-version")
    assert not qs.done_for_this_cache(stamp, made)


def test_the_code_digest_covers_the_engine_core_and_the_kernels(tmp_path, monkeypatch):
    """After engine/ became rwkv_engine/ the digest still read engine/core: a changed model
    or measurement module no longer triggered a new build and measurement. It covers
    the files the precision verdict's fingerprint covers (core/*.py and kernels/)."""
    import shutil
    qs = quickstart()
    shutil.copytree(REPO / "rwkv_engine" / "core", tmp_path / "rwkv_engine" / "core",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "kernels", tmp_path / "kernels")
    monkeypatch.setattr(qs, "ROOT", tmp_path)
    digests = {qs.engine_code_digest()}
    with open(tmp_path / "rwkv_engine" / "core" / "model.py", "a") as f:
        f.write("# changed\n")
    digests.add(qs.engine_code_digest())
    with open(tmp_path / "kernels" / "wkv7_cpu.cpp", "a") as f:
        f.write("// changed\n")
    digests.add(qs.engine_code_digest())
    assert len(digests) == 3
