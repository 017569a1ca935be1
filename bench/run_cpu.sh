#!/usr/bin/env bash
# Reproduce the CPU figures of bench/RESULTS.md:
#   1. a random checkpoint of the official 0.1B shape (12 x 768, vocab 65536, bf16 like the
#      released files), raw speed against the rwkv package + keystroke replay;
#   2. the bundled default model: keystroke replay (the latency a user gets out of the box).
# Usage: bench/run_cpu.sh [OUTDIR]   (run inside the virtualenv: .venv/bin/activate)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/out}
mkdir -p "$out"
ckpt=${RWKV_BENCH_CKPT:-${TMPDIR:-/tmp}/rwkv-bench-0.1b.pth}
[ -f "$ckpt" ] || python tests/support/random_checkpoint.py "$ckpt" --layers 12 --embd 768 --dtype bf16
rwkv-nvim bench --model "$ckpt" --json > "$out/cpu-random-0.1b.json"
rwkv-nvim bench --no-peer --json > "$out/cpu-default-model.json"
echo "wrote $out/cpu-random-0.1b.json $out/cpu-default-model.json"
