"""Backends that run a model file in-process: the PyTorch reference and the C++ kernel.

Every backend is a Backend, so compare/run treat them alike:
  forward(ids, mask, capture) -> (logits (B,S,V) float32|float64 numpy, intermediates or None)
  reset_cache(), step(ids, mask) -> logits: the KV cache, one call at a time
  decode(ids, mask, n_prefill) -> logits (B, S-n_prefill, V): prefill, then one token a step
  set_threads(n)
External engines (separate processes) live in engines.py.
"""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .errors import BuildError, InputError, ModelFileError, XValidError
from .modelfile import ModelFile

BUILTIN_BACKENDS = ("torch", "cpp")


class Backend:
    """What compare and run need of an in-process backend. Subclasses provide forward,
    set_threads, and the two KV-cache calls that decode is built from."""

    name: str

    def reset_cache(self) -> None:
        raise NotImplementedError

    def step(self, ids, mask) -> np.ndarray:
        """Append ids (B,T) to the cache; mask (B, cached + T). Returns logits (B,T,V)."""
        raise NotImplementedError

    def decode(self, ids, mask, n_prefill: int) -> np.ndarray:
        """Prefill n_prefill tokens, then one token a step: logits (B, S - n_prefill, V)."""
        self.reset_cache()
        self.step(ids[:, :n_prefill], mask[:, :n_prefill])
        return np.concatenate([self.step(ids[:, t:t + 1], mask[:, :t + 1])
                               for t in range(n_prefill, ids.shape[1])], axis=1)


class TorchBackend(Backend):
    """The reference: model-spec.md in PyTorch eager, float32 or float64."""

    def __init__(self, mf: ModelFile, dtype: str = "float32"):
        from .reference import Reference
        self.name = "torch" if dtype == "float32" else f"torch-{dtype}"
        self.model = Reference(mf, dtype)

    def set_threads(self, n: int) -> None:
        import torch
        torch.set_num_threads(n)

    def forward(self, ids, mask, capture: bool = False):
        sink = {} if capture else None
        logits = self.model.forward(ids, mask, capture=sink)
        return logits.numpy(), ({k: v.numpy() for k, v in sink.items()} if capture else None)

    def reset_cache(self) -> None:
        self.cache = self.model.new_cache()

    def step(self, ids, mask) -> np.ndarray:
        return self.model.forward(ids, mask, cache=self.cache).numpy()


_core_import: Future | None = None


def _import_core():
    from . import _core
    return _core


def start_loading_core() -> None:
    """Begin importing the compiled module in a background thread. In an editable install the
    import rebuilds changed C++ (a compiler subprocess), which then overlaps the second or so
    that Python spends importing torch: the edit-to-verdict loop gets that much shorter."""
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
    """The C++ kernel through pybind11; it parses the model file itself."""

    name = "cpp"

    def __init__(self, path: str | os.PathLike):
        self.core = load_core()
        try:
            self.model = self.core.Model(str(Path(path)))
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
