"""What every section of the GPU check uses: the checkout's paths, the log, the one-line
error, the ``Skip`` a section raises when it does not apply, the engine import shim,
logged subprocesses and timing."""
from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# the command (bench/gpu_check.py); the peer subprocesses run it again with --peer-build
# / --peer-worker
ENTRY_SCRIPT = REPO / "bench" / "gpu_check.py"
# the shape the keystroke replay runs on and the targets speak of
REPLAY_SHAPE = "1.5b"


class Skip(Exception):
    """A section that does not apply here (its message says why)."""


def one_line(error, limit: int = 300) -> str:
    """The line of an error (or of a text) that says what went wrong, with the exception's
    type name in front, at most ``limit`` characters."""
    text = str(error)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower() and not ln.startswith(("Traceback", "FAILED:", "Error building")):
            break
    else:
        ln = lines[0] if lines else ""
    name = type(error).__name__ if isinstance(error, BaseException) else ""
    return (f"{name}: {ln}" if name and ln else name or ln)[:limit]


class Log:
    """Lines to the console and to the log file."""

    def __init__(self, path: Path):
        self.fh = open(path, "a", encoding="utf-8", buffering=1)
        self.lock = threading.Lock()

    def __call__(self, msg: str = "") -> None:
        with self.lock:
            for line in str(msg).splitlines() or [""]:
                stamp = time.strftime("%H:%M:%S")
                print(f"[{stamp}] {line}", flush=True)
                self.fh.write(f"[{stamp}] {line}\n")


def ensure_engine() -> str:
    """Make ``import rwkv_engine`` load this checkout's rwkv_engine/ (installed or not), here
    and in the subprocesses this check starts: the checkout's root goes first on sys.path
    and PYTHONPATH."""
    root = str(REPO)
    if root not in sys.path:
        sys.path.insert(0, root)
    old = os.environ.get("PYTHONPATH")
    if root not in (old or "").split(os.pathsep):
        os.environ["PYTHONPATH"] = root + (os.pathsep + old if old else "")
    for name in [m for m in sys.modules if m == "rwkv_engine" or m.startswith("rwkv_engine.")]:
        mod = sys.modules[name]
        if not str(getattr(mod, "__file__", "") or "").startswith(root):
            del sys.modules[name]
    importlib.invalidate_caches()
    import rwkv_engine
    return f"checkout {Path(rwkv_engine.__file__).resolve().parent}"


def kill_group(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads (gone already: nothing to do)."""
    with contextlib.suppress(Exception):
        os.killpg(pid, signal.SIGKILL)


def run_logged(cmd, log: Log, timeout: float, env=None, cwd=REPO) -> int:
    """Run ``cmd`` (its own process group), its output line by line into the log; kill
    the group after ``timeout`` seconds (returns 124 then)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", env=env, cwd=str(cwd), start_new_session=True)

    def pump():
        for line in proc.stdout:
            log("  | " + line.rstrip())
    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        rc = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        log(f"  timed out after {timeout:.0f} s: killing process group {proc.pid}")
        kill_group(proc.pid)
        proc.wait()
        rc = 124
    t.join(timeout=5)
    return rc


def command_line(cmd, last: bool = False):
    """The first (or last) line a command prints; None when it does not run."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        return (out[-1] if last else out[0]).strip() if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    """Seconds of one call of fn (CUDA events on a GPU)."""
    import torch
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
