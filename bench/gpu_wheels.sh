#!/usr/bin/env bash
# Wheels for the device tool's GPU machine (no network there) of the Python packages that
# bench/gpu_check.py needs and that machine lacks, into .whl/ (git-ignored through
# .git/info/exclude; a device `run` names ".whl" in carry and installs them, see
# bench/gpu_check.py's docstring).
#
# That machine has python 3.12, torch 2.11 (CUDA 13), pytest, numpy, msgpack, ninja,
# huggingface_hub, hypothesis, tokenizers (the device README's KINDS.md lists them).
# Missing and needed: rwkv==0.8.32, the benchmark peer (pure Python; Requires-Dist
# tokenizers>=0.13.2, which is there). pynvim is missing too, but nothing in the GPU run
# imports it (the engine does not; the GPU tests do not); --with-pynvim adds it and its
# greenlet for a run that wants the editor-side tests.
#
# Usage: bench/gpu_wheels.sh [--with-pynvim]     (PYTHON=python3 by default; needs PyPI)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

exclude=.git/info/exclude
if [ -d .git ]; then
  mkdir -p .git/info
  grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
fi

# flash-linear-attention (+ fla-core, pure Python; Triton is on the device): gpu_check's
# peer_fla section and the measured alternative WKV-7 op of tools/train_gpu.py
pkgs=("rwkv==0.8.32" "flash-linear-attention==0.6.0" "fla-core==0.6.0")
[ "${1:-}" = "--with-pynvim" ] && pkgs+=("pynvim==0.6.0" "greenlet")

rm -rf .whl
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${pkgs[@]}"

# Every Requires-Dist (extras left out) must be on the GPU machine already or among the wheels.
"$PY" - <<'PY'
import re, sys, zipfile
from pathlib import Path

ON_DEVICE = {  # KINDS.md "Python packages already there" (those that matter here)
    "torch", "numpy", "msgpack", "pytest", "hypothesis", "huggingface-hub", "ninja", "tokenizers",
    "packaging", "filelock", "fsspec", "pyyaml", "requests", "tqdm", "typing-extensions",
    "einops", "transformers", "triton",
}
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
wheels = sorted(Path(".whl").glob("*.whl"))
have = {norm(w.name.split("-")[0]) for w in wheels}
missing, total = [], 0
for w in wheels:
    total += w.stat().st_size
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        reqs = [ln.split(":", 1)[1].strip() for ln in z.read(meta).decode().splitlines()
                if ln.startswith("Requires-Dist:")]
    for r in reqs:
        if "extra ==" in r:
            continue
        name = norm(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0])
        where = "wheel" if name in have else "on the GPU machine" if name in ON_DEVICE else "MISSING"
        print(f"{w.name}: requires {r}  -> {where}")
        if where == "MISSING":
            missing.append(name)
    print(f"{w.name}: {w.stat().st_size / 2**20:.2f} MiB")
print(f"total {total / 2**20:.2f} MiB in {len(wheels)} wheel(s) (a device run carries at most 64 MiB)")
if missing:
    sys.exit(f"missing on the GPU machine, add them: {sorted(set(missing))}")
if total > 48 * 2**20:
    sys.exit("the wheels are too large to carry with the working tree")
PY
