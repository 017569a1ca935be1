"""The GPU check behind bench/gpu_check.py (the command and its documentation live there),
one module per job:

  runner      the run: settings, the sections in order within the time budget, the JSON
              report rewritten after each; main() parses the command line
  machine     environment, kernel_build (our CUDA kernel + smoke test), bandwidth
  gpu_tests   pytest_gpu (`pytest -m gpu`, JUnit counts) and accuracy (what it recorded)
  benchmarks  bench_<shape> on random weights and replay_1.5b (keystroke replay)
  peer        peer_rwkv (the `rwkv` package: background kernel build, worker subprocess)
              and peer_fla
  summary     the targets as value / limit / ok
  plumbing    what they share: paths, log, one_line, Skip, the engine import shim,
              logged subprocesses, timing

Only the standard library is imported at module level (torch and the engine inside the
sections), so the peer subprocesses start without either.
"""
