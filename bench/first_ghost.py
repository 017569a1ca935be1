"""First ghost text after the first keystroke, typed right after VimEnter (the model is
still loading), in headless Neovim with the plugin's own host, from a fresh start.

    python bench/first_ghost.py --venv .venv --cache ~/.cache [--runs 5] [--out FILE.json]

``--cache``: the XDG cache home a build filled (the kernel and the CPU precision
verdict), e.g. the HOME's ~/.cache after ``tools/quickstart.py run``. Each run is a new
Neovim with fresh config/data/state folders. Uses the tests' Neovim harness
(tests/support/nvim_harness.py: isolated XDG folders, the test init, pynvim ``attach('child')``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "support"))


def one_run(root: Path, venv: str, cache: Path) -> dict:
    from nvim_harness import start_nvim
    opts = {"debounce_ms": 20, "python": {"env": venv, "host": "own"}, "engine": {"device": "cpu"}}
    env = {"RWKV_NVIM_CPU_PRECISION": "", "XDG_CACHE_HOME": str(cache),
           "RWKV_NVIM_KERNEL_DIR": str(cache / "rwkv.nvim" / "kernels")}
    t_start = time.monotonic()
    s = start_nvim(root, opts, manifest=False, extra_env=env)
    try:
        vimenter = time.monotonic() - t_start
        s.cmd("setlocal filetype=python")
        s.feed("idef hello(name):<CR>return ")
        t0 = time.monotonic()
        s.wait_for("require('rwkv.ghost').get() ~= nil", timeout=120, what="the first ghost text")
        first = time.monotonic() - t0
        lines = s.lua("return require('rwkv').status_lines()")
    finally:
        s.close()
    return {"vimenter_s": round(vimenter, 2), "first_ghost_after_first_key_s": round(first, 2),
            "precision": next((ln for ln in lines if ln.startswith("precision")), "")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--venv", required=True, help="the plugin's own Python environment")
    p.add_argument("--cache", required=True, help="XDG cache home filled by a build")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", help="write the JSON here too")
    args = p.parse_args()
    runs = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="rwkv-first-ghost-") as d:
            runs.append(one_run(Path(d), str(Path(args.venv).resolve()), Path(args.cache).expanduser().resolve()))
    firsts = sorted(r["first_ghost_after_first_key_s"] for r in runs)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
              "runs": runs, "first_ghost_p50_s": firsts[len(firsts) // 2], "first_ghost_max_s": firsts[-1]}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
