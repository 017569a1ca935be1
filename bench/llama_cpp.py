"""Build llama.cpp's CPU tools once into a cache, and drive them (command line).

The code lives in ``bench/llamacpp_peer`` (build, server, tools, side_by_side: also what
``rwkv-nvim bench --peer llama.cpp`` runs); this file is a thin command line over it and
re-exports its names for old importers. Binaries land in

    ~/.cache/rwkv.nvim/llama.cpp/<llama-cpp-python version>-<cpu tag>/bin

    python bench/llama_cpp.py build            # build (or reuse) and print the bin dir
    python bench/llama_cpp.py info             # cache dir, cpu tag, what a build would use
    python bench/llama_cpp.py greedy M.gguf --ids 11,33,261 -n 32 [--n-probs 5]
    python bench/llama_cpp.py q4_0 M-f32.gguf M-q8_0.gguf OUT.gguf   # Q4_0 without llama-quantize

See the module's docstring for the build (sdist source, GGML_NATIVE, AMX workaround) and
the offline variables (RWKV_LLAMA_CPP_SDIST, RWKV_LLAMA_CPP_SRC, RWKV_LLAMA_CPP_CACHE).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp_peer as _peer  # noqa: E402  (bench/llamacpp_peer, beside this file)

# the package's public names, as before the move (bench/llama_cpp.py used to hold the code)
globals().update({k: v for k, v in vars(_peer).items() if not k.startswith("__")})


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/llama_cpp.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or reuse) llama.cpp's CPU tools; print the bin dir")
    b.add_argument("--jobs", "-j", type=int, default=2)
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    b.add_argument("--keep-build", action="store_true", help="keep the cmake build tree")
    sub.add_parser("info", help="show the cache location, cpu tag, cpu flags and a cached build's record")
    g = sub.add_parser("greedy", help="greedy continuation of token ids with llama-server")
    g.add_argument("gguf")
    g.add_argument("--ids", required=True, help="comma-separated prompt token ids")
    g.add_argument("-n", type=int, default=32)
    g.add_argument("--n-probs", type=int, default=0)
    q = sub.add_parser("q4_0", help="Q4_0 GGUF from an f32 + a q8_0 export of one checkpoint (gguf-py)")
    q.add_argument("f32")
    q.add_argument("q8_0")
    q.add_argument("out")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "build":
            t0 = time.perf_counter()
            bins = _peer.build(jobs=a.jobs, force=a.force, keep_build=a.keep_build,
                               log=lambda m: print(m, file=sys.stderr))
            print(f"{bins}\t({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
            print(bins)
        elif a.cmd == "info":
            info = _peer.cpu_info()
            print(json.dumps({"cache": str(_peer.build_dir_for()), "version": _peer.version(),
                              "cpu_tag": _peer.cpu_tag(info), "cpu": _peer.cpu_summary(info),
                              "tools": {t: shutil.which(t) for t in ("cmake", "g++", "ninja")},
                              "build": _peer.build_info()}, indent=2))
        elif a.cmd == "q4_0":
            print(json.dumps(_peer.requantize_gguf(a.f32, a.q8_0, a.out, "q4_0")))
        else:
            ids = [int(x) for x in a.ids.split(",") if x.strip()]
            print(json.dumps(_peer.greedy_with_logprobs(a.gguf, ids, a.n, a.n_probs)))
    except _peer.BuildError as e:
        print(f"llama_cpp: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
