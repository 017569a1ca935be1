#!/usr/bin/env python3
"""One GPU run that checks and measures everything GPU-related (issue 13), in < 8 minutes.

Writes ``gpu_check.json`` and ``gpu_check.log`` (plus ``peer_build.log`` and
``pytest_junit.xml``) into ``--out DIR`` (default ``$OUT``, else ``./gpu_check_out``).
Needs no network. Every section runs on its own: it records ``status`` (ok / failed /
skipped), ``error`` (one line) and ``seconds``, and a failing section never loses the
others' figures; the JSON is rewritten after each section, so a run killed at its time
limit still leaves what it measured. Sections, in order (estimated H200 seconds):

  environment    torch / CUDA / GPU / nvcc / packages; starts the `rwkv` package's own
                 kernel build in the background (CPU only, ~60-120 s)             ~5
  kernel_build   the WKV-7 CUDA kernel through rwkv_engine.core.kernel_loader.get_wkv7,
                 fresh (RWKV_NVIM_KERNEL_DIR -> a temp dir), plus a smoke test    ~60
  bandwidth      device-to-device copy bandwidth (bytes read + written per second)  ~2
  pytest_gpu     `pytest -m gpu` over the test files that have GPU tests
                 (test_gpu_kernels.py, test_gpu_model.py, test_forward_checks.py)   ~90
  accuracy       fp16 / bf16 vs CPU fp32 figures recorded by test_gpu_model.py       0
  (then the benchmarks wait, at most --peer-build-wait s, for the background build)
  bench_0.1b     random weights drawn on the GPU in fp16 (12 x 768, 24 x 2048): prefill
  bench_1.5b     tok/s, batch-1 and batch-8 decode, each step as a fraction of the
                 weight-bytes / bandwidth limit, peak VRAM                   ~10 / ~25
  replay_1.5b    keystroke replay (rwkv_engine/cli/bench_replay.py) with the 1.5B shape ~45
  bench_7.2b     the same for 32 x 4096 (15 GB of fp16 weights)                     ~35
  peer_rwkv      the same figures for the `rwkv` package 0.8.32 (RWKV_V7_ON=1,
                 RWKV_CUDA_ON=1, its own kernels) on the 0.1B and 1.5B checkpoints  ~45
  peer_fla       flash-linear-attention's RWKV-7 decode step, if `fla` imports      0
then ``summary``: the issue's targets as value / limit / ok. bench/README.md describes
every field.

``--device cpu --tiny`` (CI, tests/tools/test_gpu_check_cpu.py) runs the same code paths on
tiny shapes on the CPU; the CUDA-only sections report "skipped: no CUDA".

The package need not be installed: the script puts this checkout's root (which holds
rwkv_engine/) first on sys.path and PYTHONPATH (for the pytest and peer subprocesses too).
The code is the package bench/gpu_check/ (one module per job, listed in its __init__.py);
this file is its command.

On the GPU machine of the device tool (python3 with torch, no network; the `rwkv`
package travels as a wheel made by bench/gpu_wheels.sh into .whl/), with carry [".whl"]
and timeout_s 570:

  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
  export PYTHONUNBUFFERED=1; python3 bench/gpu_check.py --out $OUT

(one line). ``--budget`` (default 450 s) is the script's own limit: a section that would
not fit in what is left is skipped with the reason; --no-7b, --no-peer, --no-pytest,
--no-replay leave out the big ones.
"""
from __future__ import annotations

import sys

from gpu_check.runner import main      # bench/gpu_check/ (this file's folder is on sys.path)

if __name__ == "__main__":
    sys.exit(main())
