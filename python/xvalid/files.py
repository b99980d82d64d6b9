"""Output files written atomically: a reader never sees a half-written file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import XValidError


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], binary: bool = False) -> None:
    """Call write(fp) on a temporary file beside `path`, then rename it into place.

    An error or Ctrl-C leaves no half-written file: either the old file or the new one.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise XValidError(f"{path}: directory {directory} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise XValidError(f"{path}: cannot write ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as fp:
            write(fp)
            fp.flush()
            os.fsync(fp.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise XValidError(f"{path}: cannot write ({exc.strerror or exc})") from None
        raise

def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """A real .npy (NPY format, C order), atomically."""
    atomic_write(path, lambda fp: np.save(fp, np.ascontiguousarray(array)), binary=True)


def save_arrays(directory: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """DIR/NAME.npy for every array (the intermediates layout of docs/intermediates.md)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise XValidError(f"{directory}: cannot create directory ({exc.strerror})") from None
    for name, array in arrays.items():
        save_npy(directory / f"{name}.npy", array)
