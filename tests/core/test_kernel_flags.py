"""The CPU kernels' compiler flags per platform (rwkv_engine.core.kernel_loader.cpu_build_flags),
with the platform faked: Linux x86-64 and aarch64, macOS arm64 / x86-64 with torch's libomp,
Homebrew's header, none at all (one thread, said), and a torch without OpenMP. Then the
instruction-set path the built kernel names (`rwkv-nvim kernels`, `rwkv-nvim info`)."""
from __future__ import annotations

import platform
import re
from pathlib import Path

import pytest

from rwkv_engine.core import kernel_loader as kl


@pytest.fixture
def fake_platform(monkeypatch):
    """fake(system, machine): platform.system()/machine() answer so from now on."""
    def fake(system: str, machine: str) -> None:
        monkeypatch.setattr(platform, "system", lambda: system)
        monkeypatch.setattr(platform, "machine", lambda: machine)
    return fake


def _touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def fake_torch(tmp_path, monkeypatch):
    """An empty torch package dir (no omp.h, no libomp.dylib, ATen says OpenMP); nothing
    from the environment or Homebrew either."""
    torch_dir = tmp_path / "torch"
    _touch(torch_dir / "include" / "ATen" / "Config.h", "#define AT_PARALLEL_OPENMP 1\n#define AT_PARALLEL_NATIVE 0\n")
    monkeypatch.setattr(kl, "_torch_dir", lambda: torch_dir)
    monkeypatch.setattr(kl, "MACOS_LIBOMP_PREFIXES", (str(tmp_path / "homebrew" / "opt" / "libomp"),))
    monkeypatch.delenv("OMP_PREFIX", raising=False)
    monkeypatch.delenv("CONDA_PREFIX", raising=False)
    return torch_dir


def test_linux_x86_flags_are_unchanged(fake_platform):
    fake_platform("Linux", "x86_64")
    flags = kl.cpu_build_flags()
    assert flags.cflags == ("-O3", "-fopenmp-simd", "-march=native", "-fopenmp")
    assert flags.ldflags == ("-fopenmp",) and flags.threads and "OpenMP" in flags.note
    spec = kl.kernel_spec("cpu")
    assert spec.extra_cflags == flags.cflags and spec.extra_ldflags == flags.ldflags
    assert "rwkv7_cpu_q8.h" in spec.headers                     # hashed and copied with the sources
    assert all((kl.kernels_source_dir() / h).is_file() for h in spec.sources + spec.headers)


def test_linux_aarch64_builds_for_every_arm_core(fake_platform):
    """No -march on ARM: NEON is in every aarch64 core and the SDOT path is picked at run
    time, so the build from one machine runs on a core with or without dotprod."""
    fake_platform("Linux", "aarch64")
    flags = kl.cpu_build_flags()
    assert flags.cflags == ("-O3", "-fopenmp-simd", "-fopenmp") and flags.ldflags == ("-fopenmp",)
    assert not any(f.startswith(("-march", "-mcpu")) for f in flags.cflags) and flags.threads


def test_macos_arm64_links_torchs_own_libomp(fake_platform, fake_torch):
    fake_platform("Darwin", "arm64")
    _touch(fake_torch / "include" / "omp.h")
    _touch(fake_torch / "lib" / "libomp.dylib")
    flags = kl.cpu_build_flags()
    include, lib = fake_torch / "include", fake_torch / "lib"
    assert flags.cflags == ("-O3", "-fopenmp-simd", "-Xpreprocessor", "-fopenmp", f"-I{include}")
    assert flags.ldflags == (f"-L{lib}", "-lomp", f"-Wl,-rpath,{lib}")
    assert flags.threads and "libomp.dylib" in flags.note and "ONE" not in flags.note
    assert kl.kernel_spec("cpu").extra_ldflags == flags.ldflags


def test_macos_header_from_homebrew_library_from_torch(fake_platform, fake_torch):
    """Torch wheels without omp.h: the header from Homebrew, still torch's libomp (a second
    copy of the runtime in the process aborts)."""
    fake_platform("Darwin", "arm64")
    _touch(fake_torch / "lib" / "libomp.dylib")
    brew = Path(kl.MACOS_LIBOMP_PREFIXES[0])
    _touch(brew / "include" / "omp.h")
    _touch(brew / "lib" / "libomp.dylib")
    flags = kl.cpu_build_flags()
    assert f"-I{brew / 'include'}" in flags.cflags and "-Xpreprocessor" in flags.cflags
    assert flags.ldflags[0] == f"-L{fake_torch / 'lib'}" and flags.threads


def test_macos_omp_prefix_is_honoured(fake_platform, fake_torch, tmp_path, monkeypatch):
    fake_platform("Darwin", "arm64")
    prefix = tmp_path / "omp"
    _touch(prefix / "include" / "omp.h")
    _touch(prefix / "lib" / "libomp.dylib")
    monkeypatch.setenv("OMP_PREFIX", str(prefix))
    flags = kl.cpu_build_flags()
    assert f"-I{prefix / 'include'}" in flags.cflags and f"-L{prefix / 'lib'}" in flags.ldflags


def test_macos_without_libomp_runs_on_one_thread_and_says_so(fake_platform, fake_torch):
    fake_platform("Darwin", "arm64")
    flags = kl.cpu_build_flags()
    assert flags.cflags == ("-O3", "-fopenmp-simd") and flags.ldflags == ()
    assert not flags.threads
    assert flags.note.startswith("ONE thread") and "omp.h and libomp.dylib" in flags.note
    assert "brew install libomp" in flags.note
    assert kl.cpu_threads_note() == flags.note                  # what `rwkv-nvim kernels` prints


def test_macos_torch_without_openmp_uses_its_native_pool(fake_platform, fake_torch):
    """A torch built on its native thread pool: at::parallel_for calls into libtorch, no
    OpenMP flags are needed and the kernels still run on all threads."""
    fake_platform("Darwin", "arm64")
    _touch(fake_torch / "include" / "ATen" / "Config.h", "#define AT_PARALLEL_OPENMP 0\n#define AT_PARALLEL_NATIVE 1\n")
    flags = kl.cpu_build_flags()
    assert flags.cflags == ("-O3", "-fopenmp-simd") and flags.ldflags == () and flags.threads
    assert "native thread pool" in flags.note


def test_macos_intel_keeps_march_native(fake_platform, fake_torch):
    fake_platform("Darwin", "x86_64")
    _touch(fake_torch / "include" / "omp.h")
    _touch(fake_torch / "lib" / "libomp.dylib")
    flags = kl.cpu_build_flags()
    assert flags.cflags[:3] == ("-O3", "-fopenmp-simd", "-march=native") and "-Xpreprocessor" in flags.cflags


def test_unknown_system_says_one_thread(fake_platform):
    fake_platform("Plan9", "aarch64")
    flags = kl.cpu_build_flags()
    assert not flags.threads and "ONE thread" in flags.note and "-fopenmp" not in flags.cflags


def test_explicit_arguments_need_no_fake():
    assert kl.cpu_build_flags("Linux", "AMD64").cflags[-2:] == ("-march=native", "-fopenmp")


# ------------------------------------------------------------------ the path in use

X86_PATHS = ("avx512-vnni", "avx512bw", "avx2", "scalar")


def _expected_x86_path() -> str:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if "avx512bw" in flags and ({"avx512_vnni", "avx512vnni"} & flags):
        return "avx512-vnni"
    if "avx512bw" in flags:
        return "avx512bw"
    return "avx2" if {"avx2", "fma", "f16c"} <= flags else "scalar"


@pytest.fixture(scope="module")
def isa():
    if kl.kernels_disabled():
        pytest.skip("RWKV_NVIM_NO_KERNEL is set")
    name = kl.cpu_isa()
    if name is None:
        pytest.skip(f"CPU kernel unavailable: {kl.kernel_status().get('cpu')}")
    return name


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or not Path("/proc/cpuinfo").is_file(),
                    reason="an x86-64 Linux host")
def test_the_q8_path_named_is_this_cpus_widest(isa, monkeypatch):
    assert isa in X86_PATHS and isa == _expected_x86_path()
    from rwkv_engine.cli.info import cpu_kernels_line
    assert re.fullmatch(rf"q8: {isa}, q4: (avx2|scalar), q4a8: (avx2|neon-dotprod|scalar)", cpu_kernels_line())
    monkeypatch.setenv("RWKV_NVIM_NO_KERNEL", "1")
    assert cpu_kernels_line().startswith("q8: none (RWKV_NVIM_NO_KERNEL")


def test_kernels_command_names_the_path_and_threads(isa, capsys, monkeypatch):
    import argparse

    from rwkv_engine.cli import kernels
    assert kernels.run(argparse.Namespace(device="cpu", json=False)) == 0
    out = capsys.readouterr().out
    assert re.search(rf"cpu: q8: {isa}, q4: (avx2|scalar), q4a8: (avx2|neon-dotprod|scalar); threads: ", out)
    # a build without OpenMP: fewer threads than torch's, and the note, on the same line
    monkeypatch.setattr(kernels, "cpu_threads_note", lambda: "ONE thread: no omp.h found")

    class OneThread:
        def parallel_threads(self):
            return 1
    monkeypatch.setattr(kernels, "get_cpu_ops", lambda: OneThread())
    monkeypatch.setattr("torch.get_num_threads", lambda: 4)
    said = []
    info = kernels._cpu_paths(said.append)
    assert info["threads"] == 1 and info["torch_threads"] == 4
    assert "threads: 1 of 4 (ONE thread: no omp.h found) - the CPU kernels run on fewer threads" in said[0]


def test_a_narrower_path_on_request(isa):
    """RWKV_NVIM_Q8_ISA=scalar: the op runs (and names) the scalar path, which is the
    reference loop itself, so the two agree bit for bit; an unknown name is ignored."""
    import os
    import subprocess
    import sys
    script = (
        "import torch\n"
        "from rwkv_engine.core.kernel_loader import cpu_isa, get_cpu_ops\n"
        "from rwkv_engine.core.linear import quantize_q8\n"
        "print(cpu_isa())\n"
        "ops = get_cpu_ops()\n"
        "g = torch.Generator().manual_seed(1)\n"
        "wq, ws = quantize_q8(torch.randn(64, 96, generator=g))\n"
        "x = torch.randn(5, 96, generator=g)\n"
        "print(torch.equal(ops.q8_linear(x, wq, ws), ops.q8_linear_reference(x, wq, ws)))\n")
    for request, want in (("scalar", ["scalar", "True"]), ("no-such-isa", [isa])):
        env = dict(os.environ, RWKV_NVIM_Q8_ISA=request)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split()[:len(want)] == want, proc.stdout
