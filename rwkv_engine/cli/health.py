"""The probes behind ``:checkhealth rwkv``: one JSON object on stdout, never a traceback.

    python -m rwkv_engine.cli.health host [MODEL] [DOWNLOAD_DIR]
        the interpreter Neovim's python3 host runs: which packages it can import (found with
        importlib.util.find_spec, nothing heavy is imported: no torch), the compiled kernels
        in the cache, the GPU device nodes, where the configured model is
    python -m rwkv_engine.cli.health server ENGINE_OPTIONS_JSON
        a remote backend: reach the server once with short timeouts
        (rwkv_engine.pipeline.remote_backend.probe) and say what the plugin would meet

lua/rwkv/health.lua runs these with the plugin's root as the working directory, so
``python -m`` finds this checkout's ``rwkv_engine`` whether or not it is installed in that
Python (the "host" report says which: ``rwkv_engine_installed``). Not a ``rwkv-nvim``
subcommand: the probe must run in a Python where the package is not installed.
Standard library only at module scope, like the package's ``__init__``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import sys
from importlib.metadata import PackageNotFoundError, distributions, version
from pathlib import Path
from typing import Dict, List, Optional

PACKAGE_DIR = Path(__file__).resolve().parents[1]       # <root>/rwkv_engine
MODULES = ("pynvim", "torch", "rwkv_engine", "huggingface_hub", "msgpack")


def _has(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except Exception:
        return False


def _version(dist: str) -> Optional[str]:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _installed_engine() -> bool:
    """Whether the package is installed in this Python (pip install, editable or not): its
    distribution's metadata is found on sys.path. The working directory (the plugin's root,
    first on sys.path under ``python -m``) does not count: an editable install leaves
    rwkv_nvim.egg-info there, which would make any Python look like it had the package."""
    here = {os.path.abspath(p) for p in ("", os.getcwd(), str(PACKAGE_DIR.parent))}
    path = [p for p in sys.path if os.path.abspath(p or ".") not in here]
    try:
        return any(True for _ in distributions(name="rwkv-nvim", path=path))
    except Exception:
        return False


def _torch_build() -> Dict[str, Optional[str]]:
    """torch's CUDA / HIP versions from its version.py, without importing torch."""
    out: Dict[str, Optional[str]] = {"torch_cuda": None, "torch_hip": None}
    try:
        text = (Path(importlib.util.find_spec("torch").origin).parent / "version.py").read_text()
    except Exception:
        return out
    for key in ("cuda", "hip"):
        m = re.search(r"^%s\s*(?::[^=\n]*)?=\s*['\"]([^'\"]+)['\"]" % key, text, re.M)
        out["torch_" + key] = m.group(1) if m else None
    return out


def _kernels(torch_version: Optional[str]) -> Dict[str, object]:
    """The compiled kernels in the cache for this torch version (the loader's cache rule)."""
    from ..core.cache_paths import cache_root
    root = Path(os.environ.get("RWKV_NVIM_KERNEL_DIR") or cache_root() / "kernels").expanduser()
    found: List[str] = []
    if torch_version:
        prefix = re.sub(r"[^A-Za-z0-9_.+-]", "_", torch_version) + "-"
        try:
            for d in sorted(os.listdir(root)):
                if d.startswith(prefix) and any(f.endswith(".so") for f in os.listdir(root / d)):
                    found.append(d[len(prefix):])
        except OSError:
            pass
    return {"kernel_root": str(root), "kernels": found}


def _model(model: str, download_dir: Optional[str]) -> Dict[str, object]:
    """Where the configured model is: the shipped default, a file, or a downloaded name."""
    if model == "":
        path = PACKAGE_DIR / "data" / "default-model.pth"
        return {"model_path": str(path), "model_found": path.is_file()}
    path = os.path.expanduser(model)
    if os.path.isfile(path) or os.path.isfile(path + ".pth"):
        return {"model_path": path, "model_found": True}
    if "/" not in model and os.sep not in model:
        out: Dict[str, object] = {}
        try:
            from ..core.download import resolve_local
            found = resolve_local(model, local_dir=download_dir)
        except Exception as exc:
            found, out["model_error"] = None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        out.update(model_path=str(found) if found else None, model_found=found is not None)
        return out
    return {"model_path": path, "model_found": False}


def host_report(model: str = "", download_dir: Optional[str] = None) -> Dict[str, object]:
    out: Dict[str, object] = {"python": sys.version.split()[0], "executable": sys.executable}
    for mod in MODULES:
        out[mod] = _has(mod)
    out["rwkv_engine_installed"] = _installed_engine()
    out["engine_dir"] = str(PACKAGE_DIR)
    out["pynvim_version"] = _version("pynvim")
    out["torch_version"] = _version("torch")
    if out["torch"]:
        out.update(_torch_build())
    out.update(_kernels(out["torch_version"]))
    out["nvidia_device"] = os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")
    out["rocm_device"] = os.path.exists("/dev/kfd")
    out["apple_silicon"] = sys.platform == "darwin" and platform.machine() == "arm64"   # MPS
    out.update(_model(model, download_dir or None))
    return out


def server_report(options_json: str) -> Dict[str, object]:
    from ..core.errors import one_line
    try:
        from ..pipeline.remote_backend.probe import probe
        opts = json.loads(options_json) if options_json.strip() else {}
        if isinstance(opts, list) and not opts:       # vim.json.encode({}) is "[]"
            opts = {}
        return probe(opts)
    except Exception as e:                              # a bad option or a broken install: as JSON
        return {"ok": False, "error": one_line(e)}


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    what = args[0] if args else ""
    if what == "host":
        report = host_report(args[1] if len(args) > 1 else "", args[2] if len(args) > 2 else None)
    elif what == "server":
        report = server_report(args[1] if len(args) > 1 else "")
    else:
        print("usage: python -m rwkv_engine.cli.health host [MODEL] [DOWNLOAD_DIR] | server OPTIONS_JSON",
              file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
