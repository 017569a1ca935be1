"""Every instruction-set path of the CPU kernels against its scalar reference, without torch
and without an ARM machine: kernels/tests/cpu_kernels_check.cpp (the q8 product, the fused
step's transcendental loops, the WKV head) is

- compiled natively and run here (x86: the AVX512/AVX2 path this CPU has, and the
  narrower ones with the wider units switched off),
- cross-compiled for aarch64 (Debian: g++-aarch64-linux-gnu) and run under qemu-aarch64
  (Debian: qemu-user) on cores without dotprod (cortex-a53, cortex-a72: the NEON path) and
  with it (neoverse-n1, max: NEON and SDOT), checking which path the run-time detection
  picks, and RWKV_NVIM_Q8_ISA,
- and the torch extension's sources (the op registration included) compile for aarch64
  against torch's headers (the same headers in every wheel), so a build break on ARM shows
  here.

The q8 paths must equal the scalar reference bit for bit where the math is integer (the
driver prints its checks; see its header). Each test skips, saying what to install, where
its tools are missing; .ci/run installs them.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
DRIVER = KERNELS / "tests" / "cpu_kernels_check.cpp"
CROSS_CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
SYSROOT = Path("/usr/aarch64-linux-gnu")  # Debian's cross libc (libc6-dev-arm64-cross)
INSTALL = "apt-get install g++-aarch64-linux-gnu qemu-user"

# qemu -cpu model -> the q8 path its features call for (dotprod: Armv8.2 DotProd)
QEMU_CPUS = [("cortex-a53", "neon"), ("cortex-a72", "neon"), ("neoverse-n1", "neon-dotprod"),
             ("max", "neon-dotprod")]


def _run(cmd, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout)


def _checked(proc: subprocess.CompletedProcess) -> str:
    """The driver's output, after asserting it ended with ALL OK (the FAIL lines otherwise)."""
    out = proc.stdout + proc.stderr
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, "\n".join(fails) or out[-3000:]
    return proc.stdout


def _best(out: str) -> str:
    m = re.search(r"q8 best path on this CPU: (\S+);", out)
    assert m, out[-2000:]
    return m.group(1)


def _compiler_major(cxx: str) -> int:
    proc = _run([cxx, "-dumpversion"])
    m = re.match(r"(\d+)", proc.stdout.strip())
    return int(m.group(1)) if proc.returncode == 0 and m else 0


# ------------------------------------------------------------------------ x86 (native)

def _cpu_flags() -> set:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _x86_variants() -> list:
    """(extra flags, expected path) for this x86 CPU: its own, then each narrower one."""
    flags = _cpu_flags()
    out = []
    if {"avx512bw", "avx512_vnni"} <= flags or {"avx512bw", "avx512vnni"} <= flags:
        out.append(("-march=native", "avx512-vnni"))
        out.append(("-march=native -mno-avx512vnni", "avx512bw"))
    elif "avx512bw" in flags:
        out.append(("-march=native", "avx512bw"))
    if "avx2" in flags and {"fma", "f16c"} <= flags:
        out.append(("-march=native -mno-avx512f" if out else "-march=native", "avx2"))
    out.append(("-march=native -mno-avx512f -mno-avx2", "scalar"))
    return out


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="an x86-64 host")
@pytest.mark.parametrize("flags,isa", _x86_variants(), ids=lambda v: str(v).replace(" ", "_"))
def test_x86_paths_equal_the_scalar_reference(tmp_path, flags, isa):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "check"
    proc = _run([cxx, "-std=c++17", "-O2", "-fopenmp-simd", *flags.split(), str(DRIVER), "-o", exe])
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = _checked(_run([exe, "--expect", isa]))
    assert _best(out) == isa
    if isa != "scalar":
        assert re.search(rf"ok\s+q8 bit-exact: full int16, pow2 scales\s+{re.escape(isa)}\s", out), out
    q4a8 = "scalar" if isa == "scalar" else "avx2"   # AVX2 (or wider): the maddubs path
    for kind in range(3):
        assert re.search(rf"ok\s+q4a8 bit-exact vs scalar \(kind {kind}\)\s+{q4a8}\s+mismatches/\d+=0", out), out


# ------------------------------------------------------------------------ aarch64 (qemu)

def _cross_tools():
    missing = [tool for tool in (CROSS_CXX, QEMU) if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not found (Debian: {INSTALL})")


def _qemu_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.pop("RWKV_NVIM_Q8_ISA", None)
    if SYSROOT.is_dir():
        env.setdefault("QEMU_LD_PREFIX", str(SYSROOT))  # for a dynamically linked build
    env.update(extra or {})
    return env


def _cross_build(out: Path, cxx: list, extra: tuple = ()) -> Path:
    """The driver for aarch64: static when the cross libc allows, else dynamic (run with
    QEMU_LD_PREFIX)."""
    base = [*cxx, "-std=c++17", "-O2", *extra, str(DRIVER), "-o", out]
    proc = _run([*base[:-2], "-static", *base[-2:]])
    if proc.returncode != 0:
        proc = _run(base)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def arm64_driver(tmp_path_factory):
    _cross_tools()
    return _cross_build(tmp_path_factory.mktemp("arm64") / "check", [CROSS_CXX])


@pytest.mark.parametrize("cpu,expected", QEMU_CPUS)
def test_aarch64_paths_equal_the_scalar_reference_under_qemu(arm64_driver, cpu, expected):
    """GCC >= 10 builds the SDOT path with a target attribute: a core with dotprod gets it."""
    if _compiler_major(CROSS_CXX) < 10:
        expected = "neon"
    out = _checked(_run([QEMU, "-cpu", cpu, arm64_driver, "--expect", expected], env=_qemu_env()))
    assert _best(out) == expected
    assert "fp16->fp32 (all 65536)" in out
    for path in {"neon", expected}:
        for kind in ("full int16", "small int16", "extremes"):
            assert re.search(rf"ok\s+q8 bit-exact: {kind}, pow2 scales\s+{path}\s+mismatches/\d+=0", out), out
    q4a8 = "neon-dotprod" if expected == "neon-dotprod" else "scalar"   # SDOT, else the reference
    for kind in range(3):
        assert re.search(rf"ok\s+q4a8 bit-exact vs scalar \(kind {kind}\)\s+{q4a8}\s+mismatches/\d+=0", out), out
    for what in ("tanh vs scalar", "decay \\(softplus\\) vs scalar", "wkv rows T=1 in place vs scalar",
                 "wkv cols T=33 vs scalar"):
        assert re.search(rf"ok\s+{what}\s+neon\s", out), (what, out)


@pytest.mark.parametrize("request_isa,cpu,best,active", [
    ("neon", "max", "neon-dotprod", "neon"),               # a narrower path on request
    ("neon-dotprod", "cortex-a53", "neon", "neon"),        # one this core cannot run: ignored
    ("scalar", "neoverse-n1", "neon-dotprod", "scalar"),
])
def test_aarch64_path_request(arm64_driver, request_isa, cpu, best, active):
    if _compiler_major(CROSS_CXX) < 10:
        pytest.skip("this cross compiler builds no SDOT path")
    out = _checked(_run([QEMU, "-cpu", cpu, arm64_driver, "--expect", best, "--expect-active", active],
                        env=_qemu_env({"RWKV_NVIM_Q8_ISA": request_isa})))
    assert f"active (RWKV_NVIM_Q8_ISA={request_isa}): {active}" in out


def test_aarch64_whole_build_with_dotprod(tmp_path):
    """The build where the whole file has dotprod (Apple's arm64 default, or
    -march=...+dotprod): the SDOT path without a target attribute."""
    _cross_tools()
    exe = _cross_build(tmp_path / "check", [CROSS_CXX], ("-march=armv8.2-a+dotprod",))
    out = _checked(_run([QEMU, "-cpu", "neoverse-n1", exe, "--expect", "neon-dotprod"], env=_qemu_env()))
    assert _best(out) == "neon-dotprod"


def _clang() -> str | None:
    for name in ("clang++", *(f"clang++-{v}" for v in range(22, 13, -1))):
        if shutil.which(name):
            return name
    return None


def test_aarch64_clang_build(tmp_path):
    """LLVM clang (Apple clang's upstream) cross-builds the driver too: with clang >= 16 the
    SDOT path comes from a target attribute, older ones build the NEON path alone."""
    _cross_tools()
    clang = _clang()
    if clang is None:
        pytest.skip("no clang++ (Debian: apt-get install clang)")
    if not SYSROOT.is_dir():
        pytest.skip(f"no aarch64 sysroot at {SYSROOT} ({INSTALL})")
    ld = shutil.which("aarch64-linux-gnu-ld")
    cmd = [clang, "--target=aarch64-linux-gnu", f"--sysroot={SYSROOT}", f"-fuse-ld={ld}" if ld else "-fuse-ld=lld"]
    exe = _cross_build(tmp_path / "check", cmd)
    expected = "neon-dotprod" if _compiler_major(clang) >= 16 else "neon"
    out = _checked(_run([QEMU, "-cpu", "neoverse-n1", exe, "--expect", expected], env=_qemu_env()))
    assert _best(out) == expected


# ------------------------------------------------------------------------ the torch extension

def _torch_includes() -> list:
    import torch
    base = Path(torch.__file__).resolve().parent / "include"
    return [f"-isystem{base}", f"-isystem{base / 'torch' / 'csrc' / 'api' / 'include'}"]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["rwkv7_cpu_linear.cpp", "rwkv7_cpu_step.cpp", "wkv7_cpu.cpp"])
def test_torch_extension_compiles_for_aarch64(tmp_path, source):
    """The CPU extension's sources as kernel_loader builds them on Linux aarch64 (no -march,
    -fopenmp), compiled to an object with the cross compiler against torch's headers:
    code generation included, so the SDOT target attribute and the NEON intrinsics are
    checked, not only the syntax. (Not linked: that needs an aarch64 libtorch.)"""
    if shutil.which(CROSS_CXX) is None:
        pytest.skip(f"{CROSS_CXX} not found (Debian: {INSTALL})")
    from rwkv_engine.core.kernel_loader import cpu_build_flags
    flags = cpu_build_flags("Linux", "aarch64")
    obj = tmp_path / (source + ".o")
    proc = _run([CROSS_CXX, "-std=c++20", "-fPIC", *flags.cflags, "-DTORCH_EXTENSION_NAME=rwkv_nvim_wkv7_cpu",
                 "-DTORCH_API_INCLUDE_EXTENSION_H", *_torch_includes(), "-c", str(KERNELS / source), "-o", obj],
                timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    if source == "rwkv7_cpu_linear.cpp" and shutil.which("aarch64-linux-gnu-objdump"):
        asm = _run(["aarch64-linux-gnu-objdump", "-d", obj]).stdout
        assert re.search(r"\bsdot\b", asm) and re.search(r"\bsmlal2?\b", asm), "no SDOT / SMLAL in the q8 product"


@pytest.mark.slow
def test_macos_flags_compile_the_extension_with_clang(tmp_path, monkeypatch):
    """The flags cpu_build_flags gives Apple clang on an arm64 Mac (-Xpreprocessor -fopenmp,
    omp.h from the torch dir), used by LLVM clang cross-compiling for aarch64: the q8
    product gets SDOT and the parallel loops become OpenMP forks (libomp's
    __kmpc_fork_call), not one thread. Apple's own clang and SDK are not here."""
    if shutil.which(CROSS_CXX) is None or not SYSROOT.is_dir():
        pytest.skip(f"no aarch64 sysroot (Debian: {INSTALL})")
    clang = _clang()
    if clang is None or _compiler_major(clang) < 16:
        pytest.skip("no clang++ >= 16 (Debian: apt-get install clang-16 libomp-16-dev)")
    resource = _run([clang, "-print-resource-dir"]).stdout.strip()
    omp_h = Path(resource) / "include" / "omp.h"
    if not omp_h.is_file():
        pytest.skip(f"no omp.h for {clang} (Debian: apt-get install libomp-{_compiler_major(clang)}-dev)")
    import torch

    from rwkv_engine.core import kernel_loader as kl
    fake_torch = tmp_path / "torch"
    (fake_torch / "include" / "ATen").mkdir(parents=True)
    (fake_torch / "lib").mkdir()
    (fake_torch / "include" / "omp.h").write_bytes(omp_h.read_bytes())
    real = Path(torch.__file__).resolve().parent
    (fake_torch / "include" / "ATen" / "Config.h").write_bytes((real / "include" / "ATen" / "Config.h").read_bytes())
    (fake_torch / "lib" / "libomp.dylib").write_bytes(b"")
    monkeypatch.setattr(kl, "_torch_dir", lambda: fake_torch)
    flags = kl.cpu_build_flags("Darwin", "arm64")
    assert "-Xpreprocessor" in flags.cflags and flags.threads
    obj = tmp_path / "linear.o"
    proc = _run([clang, "--target=aarch64-linux-gnu", f"--sysroot={SYSROOT}", "-std=c++20", "-fPIC", *flags.cflags,
                 "-DTORCH_EXTENSION_NAME=rwkv_nvim_wkv7_cpu", "-DTORCH_API_INCLUDE_EXTENSION_H", *_torch_includes(),
                 "-c", str(KERNELS / "rwkv7_cpu_linear.cpp"), "-o", obj], timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    if shutil.which("aarch64-linux-gnu-objdump"):
        asm = _run(["aarch64-linux-gnu-objdump", "-dr", obj]).stdout
        assert re.search(r"\bsdot\b", asm) and "__kmpc_fork_call" in asm
