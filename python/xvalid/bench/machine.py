"""What the benchmark ran on, and the memory it can read: CPU model, cores, SIMD flags,
memory available, and the process's peak resident memory (which Linux lets us reset)."""

from __future__ import annotations

import ctypes
import os
import platform
import resource
from pathlib import Path

# The instruction-set extensions that matter for float32 kernels, as /proc/cpuinfo names them.
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
              "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "asimd", "sve")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                if fields:
                    break
                continue
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def machine_info() -> dict:
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {"cpu": info.get("model name") or platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "usable_cores": usable,
            "simd": [flag for flag in SIMD_FLAGS if flag in flags],
            "memory_gib": round(total_memory_bytes() / 2**30, 1) if total_memory_bytes() else None,
            "platform": platform.platform(), "machine": platform.machine()}


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def total_memory_bytes() -> int | None:
    return _meminfo("MemTotal")


def available_memory_bytes() -> int | None:
    """What the kernel says can be allocated now without swapping (None where unknown)."""
    return _meminfo("MemAvailable")


def _status_kb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _release_free_memory() -> None:
    """Hand memory freed by earlier work (the reference's forwards) back to the system
    (glibc's malloc_trim), so that a backend's run shows what it allocates, not what the
    allocator kept. Nothing where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """The process's peak resident memory over a stretch of work, in MiB: Linux resets the
    peak (VmHWM) when 5 is written to /proc/self/clear_refs. Where it cannot be reset, the
    peak is the process's lifetime peak (ru_maxrss) and `resettable` is False."""

    def __init__(self):
        _release_free_memory()
        self.resettable = self._reset()
        self.start_mb = self.current_mb()

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fp:
                fp.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def current_mb() -> float | None:
        kb = _status_kb("VmRSS")
        return None if kb is None else kb / 1024

    def peak_mb(self) -> float:
        kb = _status_kb("VmHWM") if self.resettable else None
        if kb is None:
            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024


def children_peak_mb() -> float:
    """The largest peak resident memory of any child process waited for so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
