"""Backends: everything that runs a model file in-process, and the one registry of them.

compare, run, the CLI's choices and the bench read REGISTRY; a new backend (transformers, a
CUDA kernel, a reduced-precision variant) is one Backend subclass and one register() call.

    name        what it is
    torch       the PyTorch reference (float32; float64 measures its rounding noise; bfloat16
                and float16 for half-precision compute, as HF transformers computes in them)
    cpp         the fast C++ kernel (packed AVX2/FMA matmul, fused ops): csrc/kernel/fast/
    cpp-clear   the clear C++ kernel (naive, double-accumulated): csrc/kernel/ops.cpp
    hf          transformers' LlamaForCausalLM (eager attention), where transformers is installed

Every backend provides (Backend):
    forward(ids, mask, capture) -> (logits (B,S,V) numpy, {name: array} or None)
    reset_cache(); step(ids, mask) -> logits (B,T,V): the KV cache, one call at a time
    decode(ids, mask, n_prefill) -> logits (B, S-n_prefill, V), built from the two above
    set_threads(n)
    profile(ids, mask, repeat) -> per-op times under shared op names (reference.OPS), or None
                                  where the backend has no op timers
    info() -> how it was built (versions, instruction set), for reports
A spec's compute_dtypes say what a backend can compute in (compare --dtype); one that computes
in float32 only is still run at a half-precision --dtype, and the report says so.
External engines (separate processes) live in engines.py.
"""

from __future__ import annotations

import abc
import contextlib
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import BuildError, InputError, ModelFileError, XValidError

if TYPE_CHECKING:  # numpy and the model file's module are imported where used: the CLI
    import numpy as np  # imports this registry first and starts a pending C++ rebuild
                        # (start_loading_core) before anything heavy

    from .modelfile import ModelFile


class Backend(abc.ABC):
    """What compare, run and bench need of an in-process backend."""

    name: str

    @abc.abstractmethod
    def forward(self, ids, mask, capture: bool = False):
        """Logits (B,S,V) from an empty cache, and the named intermediates when capture."""

    @abc.abstractmethod
    def reset_cache(self) -> None:
        """Empty the KV cache."""

    @abc.abstractmethod
    def step(self, ids, mask) -> np.ndarray:
        """Append ids (B,T) to the cache; mask (B, cached + T). Returns logits (B,T,V)."""

    @abc.abstractmethod
    def set_threads(self, n: int) -> None:
        """Threads for the following calls."""

    def decode(self, ids, mask, n_prefill: int) -> np.ndarray:
        """Prefill n_prefill tokens, then one token a step: logits (B, S - n_prefill, V)."""
        import numpy as np
        self.reset_cache()
        self.step(ids[:, :n_prefill], mask[:, :n_prefill])
        return np.concatenate([self.step(ids[:, t:t + 1], mask[:, :t + 1])
                               for t in range(n_prefill, ids.shape[1])], axis=1)

    def profile(self, ids, mask, repeat: int = 1) -> list[dict] | None:
        """Per-op totals over `repeat` forwards: [{op, calls, seconds, flops, bytes}], or
        None when this backend has no op timers."""
        return None

    def info(self) -> dict:
        """How this backend was built, for reports."""
        return {}


@dataclass(frozen=True)
class BackendSpec:
    name: str
    summary: str
    create: Callable[..., Backend]  # (model file path, the parsed file); for a compute dtype
                                    # other than float32 in compute_dtypes: (path, file, dtype)
    uses_core: bool = False   # needs the compiled module: start importing it early
    reference: bool = False   # the reference itself (compare reuses its run, in --dtype)
    compute_dtypes: tuple[str, ...] = ("float32",)  # what it can compute in
    # Raises XValidError (one line, exit 2) where the backend cannot run here, such as a
    # missing optional package; called before any work starts.
    available: Callable[[], object] | None = None

    def compute_dtype(self, asked: str) -> str:
        """What it computes in when `asked` is wanted: that, or float32 when it cannot."""
        return asked if asked in self.compute_dtypes else "float32"

    def check_available(self) -> None:
        if self.available is not None:
            self.available()


REGISTRY: dict[str, BackendSpec] = {}


def register(spec: BackendSpec) -> BackendSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"backend {spec.name!r} registered twice")
    REGISTRY[spec.name] = spec
    return spec


def backend_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get_spec(name: str) -> BackendSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown backend {name!r} (choose from {', '.join(REGISTRY)})") from None


def create_backend(name: str, path: str | os.PathLike, mf: ModelFile) -> Backend:
    return get_spec(name).create(Path(path), mf)


# ---------------------------------------------------------------------------------------------
# torch: the reference


class TorchBackend(Backend):
    """The reference in PyTorch eager (docs/model.md): float32, float64, bfloat16 or float16.
    Outputs are numpy arrays, half-precision ones exactly upcast to float32."""

    def __init__(self, mf: ModelFile, dtype: str = "float32"):
        from .reference import Reference
        self.name = "torch" if dtype == "float32" else f"torch-{dtype}"
        self.dtype = dtype
        self.model = Reference(mf, dtype)

    def set_threads(self, n: int) -> None:
        import torch
        torch.set_num_threads(n)

    def forward(self, ids, mask, capture: bool = False):
        sink = {} if capture else None
        logits = self.model.forward(ids, mask, capture=sink)
        return _numpy(logits), ({k: _numpy(v) for k, v in sink.items()} if capture else None)

    def reset_cache(self) -> None:
        self.cache = self.model.new_cache()

    def step(self, ids, mask) -> np.ndarray:
        return _numpy(self.model.forward(ids, mask, cache=self.cache))

    def profile(self, ids, mask, repeat: int = 1) -> list[dict]:
        """Per-op totals through torch.profiler, under the C++ kernel's op names (reference.
        OPS); flops and bytes are not counted (None). One profiled forward warms the profiler
        up and is not counted; each label's time still includes the profiler's own overhead
        on the aten calls inside it."""
        from torch.profiler import ProfilerActivity, profile, schedule

        from . import reference
        reference.label_ops = True
        try:
            with _quiet_stderr_fd(), profile(activities=[ProfilerActivity.CPU], schedule=schedule(
                    wait=0, warmup=1, active=repeat, repeat=1)) as prof:
                for _ in range(repeat + 1):
                    self.model.forward(ids, mask)
                    prof.step()
        finally:
            reference.label_ops = False
        events = {e.key: e for e in prof.key_averages() if e.key in reference.OPS}
        return [{"op": name, "calls": events[name].count,
                 "seconds": events[name].cpu_time_total * 1e-6, "flops": None, "bytes": None}
                for name in reference.OPS if name in events]

    def info(self) -> dict:
        import torch
        return {"torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": self.dtype}


def _numpy(t) -> np.ndarray:
    """A torch tensor as numpy; bfloat16 (which numpy lacks) and float16 exactly as float32."""
    from .reference import upcast
    return t.to(upcast(t.dtype)).numpy()


@contextlib.contextmanager
def _quiet_stderr_fd():
    """Silence file descriptor 2 meanwhile: torch's profiler prints 'profiler_start/stop'
    lines there from C++, which would break the one-line-per-message output."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ---------------------------------------------------------------------------------------------
# cpp: the C++ kernels through the compiled module


_core_import: Future | None = None


def _editable_rebuild_finder():
    """scikit-build-core's import finder when this is an editable install that rebuilds the
    compiled module on its first import and has not yet (docs/dev-loop.md), else None."""
    for finder in sys.meta_path:
        if ("xvalid._core" in getattr(finder, "known_wheel_files", ())
                and getattr(finder, "rebuild_flag", False) is True
                and getattr(finder, "rebuilt", True) is False
                and callable(getattr(finder, "rebuild", None))):
            return finder
    return None


def _import_core():
    # The editable install's finder rebuilds inside the import of _core, where Python holds
    # its global import lock: every import in the main thread would wait for the compiler.
    # So the rebuild runs here first, outside that lock, and the import finds nothing to do.
    finder = _editable_rebuild_finder()
    if finder is not None:
        finder.rebuilt = True  # as the finder marks it itself: one rebuild per process
        finder.rebuild()       # subprocess.CalledProcessError when the build fails
    from . import _core
    return _core


def start_loading_core() -> None:
    """Begin importing the compiled module in a background thread. In an editable install the
    import first rebuilds changed C++ (a compiler subprocess), which then overlaps what Python
    does meanwhile (imports, reading the model file and the cached reference, or importing
    torch and computing it): the edit-to-verdict loop gets that much shorter."""
    global _core_import
    if _core_import is None:
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xvalid-core-import")
        _core_import = pool.submit(_import_core)
        pool.shutdown(wait=False)


def load_core():
    """The compiled module (in an editable install this rebuilds changed C++ first)."""
    start_loading_core()
    try:
        return _core_import.result()
    except ImportError as exc:
        raise XValidError(f"the C++ backend is not built ({exc}); reinstall with "
                          f"'bash scripts/setup.sh' (see docs/dev-loop.md)") from None
    except subprocess.CalledProcessError:  # the editable install's rebuild-on-import failed
        raise BuildError("the C++ rebuild failed (compiler output above)") from None


class CppBackend(Backend):
    """A C++ kernel through pybind11 ('fast' or 'clear'); it parses the model file itself."""

    def __init__(self, path: str | os.PathLike, kernel: str = "fast", name: str = "cpp"):
        self.name = name
        self.core = load_core()
        try:
            self.model = self.core.Model(str(Path(path)), kernel)
        except self.core.ModelFileError as exc:
            raise ModelFileError(str(exc)) from None

    def set_threads(self, n: int) -> None:
        self.core.set_num_threads(n)

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as exc:
            raise InputError(str(exc)) from None

    def forward(self, ids, mask, capture: bool = False):
        out = self._call(self.model.forward, ids, mask, capture=capture)
        return out if capture else (out, None)

    def reset_cache(self) -> None:
        self.model.reset_cache()

    def step(self, ids, mask) -> np.ndarray:
        return self._call(self.model.step, ids, mask)

    def profile(self, ids, mask, repeat: int = 1) -> list[dict]:
        self.model.reset_profile()
        self.model.set_profiling(True)
        try:
            for _ in range(repeat):
                self._call(self.model.forward, ids, mask)
            return self.model.profile()
        finally:
            self.model.set_profiling(False)

    def info(self) -> dict:
        return {"kernel": self.model.kernel, **self.core.build_info()}


# ---------------------------------------------------------------------------------------------
# hf: transformers' LlamaForCausalLM, where transformers is installed (the `hf` extra)


def require_transformers():
    """The transformers module, or one line saying how to install it (exit 2)."""
    try:
        import transformers
    except ImportError:
        from .hf import INSTALL_HINT
        raise XValidError(f"transformers is not installed: {INSTALL_HINT}") from None
    return transformers


def hf_backend(mf: ModelFile, dtype: str = "float32") -> Backend:
    from .hf_backend import HfBackend  # numpy and transformers only when it runs
    return HfBackend(mf, dtype)


register(BackendSpec("torch", "PyTorch eager, float32 (or --dtype): the reference",
                     lambda path, mf, dtype="float32": TorchBackend(mf, dtype), reference=True,
                     compute_dtypes=("float32", "bfloat16", "float16")))
register(BackendSpec("cpp", "the fast C++ kernel (packed AVX2/FMA matmul, fused ops)",
                     lambda path, mf: CppBackend(path, "fast", "cpp"), uses_core=True))
register(BackendSpec("cpp-clear", "the clear C++ kernel (naive, double-accumulated)",
                     lambda path, mf: CppBackend(path, "clear", "cpp-clear"), uses_core=True))
register(BackendSpec("hf", "transformers' LlamaForCausalLM, eager attention, float32 "
                     "(or --dtype; needs the hf extra)",
                     lambda path, mf, dtype="float32": hf_backend(mf, dtype),
                     available=require_transformers,
                     compute_dtypes=("float32", "bfloat16", "float16")))

BUILTIN_BACKENDS = backend_names()
DEFAULT_BACKENDS = ("torch", "cpp")
