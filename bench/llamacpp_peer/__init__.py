"""llama.cpp as a peer: build its CPU tools once into a cache, convert, and drive them.

Developer tooling of the source checkout (not in the installed package): used by
``rwkv-nvim bench --peer llama.cpp`` (``side_by_side``), by ``bench/llama_cpp.py`` (a thin
command line) and by the llama.cpp tests. One module per job: ``build`` (cache, source,
cmake), ``server`` (llama-server), ``tools`` (llama-bench runs, Q4_0), ``side_by_side``.
Standard library only at import time (``gguf``/``numpy`` are imported by the one function
that needs them), so importing it costs nothing.

The source is the llama.cpp copy vendored in the ``llama-cpp-python`` sdist (PyPI, fetched
with ``pip download``), so no git access is needed. Binaries land in

    ~/.cache/rwkv.nvim/llama.cpp/<llama-cpp-python version>-<cpu tag>/bin

(``$RWKV_LLAMA_CPP_CACHE`` or ``$XDG_CACHE_HOME`` move it) and are reused when present.
The build is Release, ``-DGGML_NATIVE=ON``, static, CPU only, and only the tools we use
(llama-server, llama-bench, llama-batched-bench, llama-cli: whichever the version has).
On a CPU with AMX the AMX ISA is switched off (``-mno-amx-tile -mno-amx-int8
-mno-amx-bf16``): llama.cpp's AMX int8 path dies with SIGILL in Q8_0/Q4 on such hosts.
What was done is recorded in ``build-info.json`` next to ``bin/``.

Q4_0 GGUFs are written here in Python (``requantize_gguf``: gguf-py's Q4_0 quantizer is
the reference ``quantize_row_q4_0_ref`` of ggml), so ``llama-quantize`` is not built: the
build tree is deleted after a build, and one more target would be a full rebuild.

Offline use: ``RWKV_LLAMA_CPP_SDIST=/path/llama_cpp_python-X.tar.gz`` (a downloaded sdist)
or ``RWKV_LLAMA_CPP_SRC=/path/to/llama.cpp`` (a source tree; its cache key uses the
directory name instead of the sdist version).
"""
from __future__ import annotations

from .build import (AMX_OFF_FLAGS, DEFAULT_VERSION, RELEVANT_FLAGS, STAMP, WANTED_TARGETS,  # noqa: F401
                    BuildError, available_targets, bin_dir, build, build_dir_for, build_info, cache_root,
                    cmake_args, cpu_info, cpu_summary, cpu_tag, source_dir, version)
from .server import Server, greedy_tokens, greedy_with_logprobs  # noqa: F401
from .tools import batched_bench, llama_bench, requantize_gguf  # noqa: F401
