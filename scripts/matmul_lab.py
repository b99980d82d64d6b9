#!/usr/bin/env python3
"""Times the fast C++ matmul (csrc/kernel/fast) against torch.matmul in one process, at the
same thread count, and prints GFLOP/s (GB/s of weights for the decode rows) and the ratio to
torch. Every variant is checked against a float64 reference before it is timed. The roofs are
measured in the same run: torch's 2048^3 sgemm (compute) and a 256 MB copy (bandwidth).

    .venv/bin/python scripts/matmul_lab.py [--threads 2] [--repeats 7] [--quick] [--best]
                                           [--threads 1 --cpu-time] [--lib PATH]

Times are medians of per-call times over repeats of back-to-back calls, torch and the fast
code alternating run by run so that noise hits both alike (a median of single calls, because
on a shared machine a parallel region now and then waits a whole 4 ms scheduler tick for a
core). --best reports the fastest call instead.

Without --lib the shared library is built with g++ into build/matmul-lab/ (the AVX2 unit with
-mavx2 -mfma, the portable one without). XVALID_ISA=portable times the portable code.
Exit 0 if every variant is within tolerance, 1 if one is not, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "csrc" / "kernel" / "fast"

# minimind2-small: hidden 512, intermediate 1408, vocab 6400, kv dim 128. (N, K) per projection.
PROJECTIONS = {"q/o": (512, 512), "k/v": (128, 512), "gate/up": (1408, 512),
               "down": (512, 1408), "head": (6400, 512)}
PREFILL_M = (128, 512, 2048)
DECODE_M = (1, 4)


def build(out_dir: Path) -> Path:
    """g++ the fast matmul into a shared library; one compile per translation unit."""
    out_dir.mkdir(parents=True, exist_ok=True)
    flags = ["-std=c++17", "-O3", "-fopenmp", "-fPIC", "-Wall"]
    units = [("matmul.cpp", []), ("matmul_portable.cpp", []), ("matmul_capi.cpp", [])]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-DXVALID_HAVE_AVX2=1")
        units.append(("matmul_avx2.cpp", ["-mavx2", "-mfma", "-mf16c"]))
    objects = []
    for name, extra in units:
        obj = out_dir / (name + ".o")
        subprocess.run(["g++", *flags, *extra, "-c", str(SOURCES / name), "-o", str(obj)], check=True)
        objects.append(str(obj))
    lib = out_dir / "libxvalid_fast_matmul.so"
    subprocess.run(["g++", "-shared", "-fopenmp", *objects, "-o", str(lib)], check=True)
    return lib


class FastMatmul:
    def __init__(self, lib_path: Path):
        lib = ctypes.CDLL(str(lib_path))
        P, I = ctypes.c_void_p, ctypes.c_int
        lib.xvalid_fast_matmul_nt.argtypes = [P, P, P, I, I, I, P, P, I, I]
        lib.xvalid_fast_matmul_nt_swiglu.argtypes = [P, P, P, P, I, I, I, P, P, I]
        lib.xvalid_fast_matmul_isa.restype = ctypes.c_char_p
        self.lib = lib
        self.isa = lib.xvalid_fast_matmul_isa().decode()

    def matmul_nt(self, C, A, B, threads, accumulate=False, row_scale=None, col_scale=None):
        M, K = A.shape
        N = B.shape[0]
        self.lib.xvalid_fast_matmul_nt(C.ctypes.data, A.ctypes.data, B.ctypes.data, M, N, K,
                                       _ptr(row_scale), _ptr(col_scale), int(accumulate), threads)

    def swiglu(self, out, A, Bg, Bu, threads):
        M, K = A.shape
        N = Bg.shape[0]
        self.lib.xvalid_fast_matmul_nt_swiglu(out.ctypes.data, A.ctypes.data, Bg.ctypes.data,
                                              Bu.ctypes.data, M, N, K, None, None, threads)


def _ptr(a):
    return None if a is None else a.ctypes.data


STAT = statistics.median  # or min, with --best
CLOCK = time.perf_counter  # or time.thread_time, with --cpu-time


def call_times(fn, min_time: float = 0.03, min_calls: int = 3) -> list[float]:
    """Seconds of each of back-to-back calls of fn, for at least min_time and min_calls.
    Back to back, so OpenMP workers stay awake between calls as they do inside a forward."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_time:
        t = CLOCK()
        fn()
        times.append(CLOCK() - t)
    return times


def median_seconds(fn, repeats: int) -> float:
    """STAT of the per-call times over `repeats` runs of back-to-back calls."""
    return STAT([t for _ in range(repeats) for t in call_times(fn)])


def timed_pair(ours, theirs, repeats):
    """Both timed alternately (one run of calls each in turn), so noise hits both alike."""
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        t_ours += call_times(ours)
        t_theirs += call_times(theirs)
    return STAT(t_ours), STAT(t_theirs)


def max_rel_error(got: np.ndarray, A: np.ndarray, B: np.ndarray) -> float:
    """max |got - ref| / (sqrt(K) * max |term|) per row of A against float64."""
    ref = A.astype(np.float64) @ B.astype(np.float64).T
    scale = np.abs(A).max(axis=1, keepdims=True).astype(np.float64) * np.abs(B).max() * np.sqrt(A.shape[1])
    return float((np.abs(got - ref) / scale).max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="M=2048 rows and decode only, 3 repeats")
    parser.add_argument("--best", action="store_true", help="fastest call instead of the median")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time CPU seconds of the calling thread (needs --threads 1): "
                             "immune to other processes on a shared machine")
    parser.add_argument("--lib", type=Path, help="a prebuilt libxvalid_fast_matmul.so")
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1:
        print("error: --threads and --repeats must be >= 1", file=sys.stderr)
        return 2
    if args.cpu_time and args.threads != 1:
        print("error: --cpu-time measures one thread; use it with --threads 1", file=sys.stderr)
        return 2
    global CLOCK, STAT  # noqa: PLW0603 (the lab's two timing choices)
    CLOCK = time.thread_time if args.cpu_time else time.perf_counter
    repeats = 3 if args.quick else args.repeats
    STAT = min if args.best else statistics.median
    fast = FastMatmul(args.lib or build(ROOT / "build" / "matmul-lab"))
    n = args.threads
    torch.set_num_threads(n)
    rng = np.random.default_rng(0)
    print(f"threads {n} (torch {torch.__version__}: {torch.get_num_threads()}), isa {fast.isa}, "
          f"{'best' if args.best else 'median'} of {repeats}"
          f"{', CPU time' if args.cpu_time else ''}")

    # bandwidth roof: the larger of torch's (threaded) and numpy's copy of 256 MB,
    # counting bytes read + written
    src = torch.ones(64 * 2**20, dtype=torch.float32)
    dst = torch.empty_like(src)
    t_torch = median_seconds(lambda: dst.copy_(src), repeats)
    t_numpy = median_seconds(lambda: np.copyto(dst.numpy(), src.numpy()), repeats)
    copy_bw = 2 * src.numel() * 4 / min(t_torch, t_numpy) / 1e9
    print(f"copy 256 MB (read + write): torch {2 * src.numel() * 4 / t_torch / 1e9:.1f} GB/s, "
          f"numpy {2 * src.numel() * 4 / t_numpy / 1e9:.1f} GB/s")
    del src, dst

    failed = False
    rows = []
    ms = (2048,) if args.quick else PREFILL_M
    cases = [(name, M, N, K) for M in ms for name, (N, K) in PROJECTIONS.items()]
    cases += [("sgemm", 2048, 2048, 2048)]
    print(f"\n{'case':10} {'M':>5} {'N':>5} {'K':>5} {'fast GF/s':>10} {'torch GF/s':>10} {'ratio':>6}  err")
    def measure(M, N, K):
        """Checked once against float64, then timed against torch: (err, ok, t_fast, t_torch)."""
        A = rng.standard_normal((M, K), dtype=np.float32)
        B = rng.standard_normal((N, K), dtype=np.float32)
        C = np.empty((M, N), dtype=np.float32)
        tA, tB = torch.from_numpy(A), torch.from_numpy(B)
        fast.matmul_nt(C, A, B, n)
        err = max_rel_error(C, A, B)
        t_fast, t_torch = timed_pair(lambda: fast.matmul_nt(C, A, B, n), lambda: tA @ tB.T, repeats)
        return err, err < 1e-5, t_fast, t_torch

    for name, M, N, K in cases:
        err, ok, t_fast, t_torch = measure(M, N, K)
        failed |= not ok
        gf = 2 * M * N * K / 1e9
        rows.append((name, M, gf / t_fast, gf / t_torch))
        print(f"{name:10} {M:5} {N:5} {K:5} {gf / t_fast:10.1f} {gf / t_torch:10.1f} "
              f"{t_torch / t_fast:6.2f}  {err:.1e}{'' if ok else '  FAIL'}", flush=True)

    # decode: weight bytes per second
    print(f"\n{'decode':10} {'M':>5} {'N':>5} {'K':>5} {'fast GB/s':>10} {'torch GB/s':>10} {'ratio':>6}  err")
    dec = list(PROJECTIONS.items()) + [("4096^2", (4096, 4096))]
    for M in DECODE_M:
        for name, (N, K) in dec:
            err, ok, t_fast, t_torch = measure(M, N, K)
            failed |= not ok
            gb = N * K * 4 / 1e9
            print(f"{name:10} {M:5} {N:5} {K:5} {gb / t_fast:10.1f} {gb / t_torch:10.1f} "
                  f"{t_torch / t_fast:6.2f}  {err:.1e}{'' if ok else '  FAIL'}", flush=True)
            if name == "4096^2" and M == 1:
                print(f"{'':10} gemv 4096^2: {gb / t_fast / copy_bw:.0%} of the copy bandwidth")

    # fused SwiGLU vs torch's silu(x @ g.T) * (x @ u.T)
    print(f"\n{'swiglu':10} {'M':>5} {'N':>5} {'K':>5} {'fast GF/s':>10} {'torch GF/s':>10} {'ratio':>6}")
    for M in ((1, 2048) if args.quick else (1, 128, 512, 2048)):
        N, K = PROJECTIONS["gate/up"]
        A = rng.standard_normal((M, K), dtype=np.float32)
        Bg = rng.standard_normal((N, K), dtype=np.float32) * 0.05
        Bu = rng.standard_normal((N, K), dtype=np.float32) * 0.05
        out = np.empty((M, N), dtype=np.float32)
        tA, tG, tU = (torch.from_numpy(x) for x in (A, Bg, Bu))
        fast.swiglu(out, A, Bg, Bu, n)
        want = (torch.nn.functional.silu(tA.double() @ tG.double().T) * (tA.double() @ tU.double().T)).numpy()
        err = float(np.abs(out - want).max() / np.abs(want).max())
        failed |= not err < 1e-5
        t_fast, t_torch = timed_pair(lambda: fast.swiglu(out, A, Bg, Bu, n),
                                     lambda: torch.nn.functional.silu(tA @ tG.T) * (tA @ tU.T), repeats)
        gf = 4 * M * N * K / 1e9
        print(f"{'gate/up':10} {M:5} {N:5} {K:5} {gf / t_fast:10.1f} {gf / t_torch:10.1f} "
              f"{t_torch / t_fast:6.2f}  {err:.1e}{'' if err < 1e-5 else '  FAIL'}", flush=True)

    _, _, fast_gf, torch_gf = next(r for r in rows if r[0] == "sgemm")
    print(f"\nfast 2048^3: {fast_gf:.1f} GFLOP/s = {fast_gf / torch_gf:.0%} of torch's sgemm (the compute roof)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
