"""External engines: any program that reads a model file and writes logits (docs/engines.md).

Protocol: the command template gets {model} and {out} substituted (shell-quoted) and runs in a
shell with OUT a fresh empty directory. On exit 0 the logits are the one .npy/.bin file in
OUT (or the file named by --engine-output). A file starting with the .npy magic is read as
.npy; anything else as raw little-endian float32 of exactly B*S*V*4 bytes. Optional
intermediates: OUT/intermediates/NAME.npy with the names of docs/intermediates.md.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .errors import EngineError, InputError

NPY_MAGIC = b"\x93NUMPY"


def _load_npy(path: Path, label: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float .npy holding prod(shape) values, checked from its header before any data is
    read (a hostile header cannot make us allocate terabytes); other layouts of the same size,
    e.g. (B, S, NH*hd) for (B, S, NH, hd), are reshaped."""
    try:
        with open(path, "rb") as fp:
            version = np.lib.format.read_magic(fp)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            found, _, dtype = read_header(fp)
    except (ValueError, OSError, EOFError) as exc:
        raise EngineError(f"{label}: unreadable .npy ({exc})") from None
    if dtype.kind != "f":
        raise EngineError(f"{label}: dtype {dtype}, expected float32")
    if int(np.prod(found, dtype=np.int64)) != int(np.prod(shape)):
        raise EngineError(f"{label}: shape {list(found)}, expected {list(shape)}")
    try:
        return np.load(path, allow_pickle=False).reshape(shape)
    except (ValueError, OSError, EOFError) as exc:
        raise EngineError(f"{label}: unreadable .npy ({exc})") from None


def read_logits_file(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """Logits (B,S,V) from an .npy file or a headerless float32 file; EngineError if unusable."""
    with open(path, "rb") as fp:
        magic = fp.read(len(NPY_MAGIC))
    if magic == NPY_MAGIC:
        return _load_npy(path, path.name, shape)
    expected = int(np.prod(shape))
    size = path.stat().st_size
    if size != expected * 4:
        raise EngineError(f"{path.name}: {size} bytes of raw float32, expected {expected * 4} "
                          f"(B*S*V*4 for shape {list(shape)})")
    return np.fromfile(path, dtype="<f4").reshape(shape)


def read_intermediates(directory: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """OUT/intermediates/NAME.npy for the documented names that exist, in the reference's shapes."""
    return {name: _load_npy(directory / f"{name}.npy", f"intermediates/{name}.npy", shape)
            for name, shape in shapes.items() if (directory / f"{name}.npy").is_file()}


INTERPRETERS = ("python", "python3", "bash", "sh", "env", "exec", "valgrind", "taskset")


def program_name(template: str) -> str:
    """The engine's own file name: 'python eng.py {model} {out}' -> 'eng.py'."""
    try:
        words = shlex.split(template)
    except ValueError:
        words = template.split()
    for word in words:
        name = Path(word).name
        if word.startswith("-") or "=" in word or name.rstrip("0123456789.") in INTERPRETERS:
            continue
        return name
    return "engine"


class ExternalEngine:
    """One --engine command template."""

    def __init__(self, template: str, index: int, timeout: float, output_name: str | None = None):
        if "{out}" not in template:
            raise InputError(f"--engine {template!r}: the command must contain {{out}}")
        self.template, self.timeout, self.output_name = template, timeout, output_name
        self.name = f"engine{index}:{program_name(template)}"

    def command(self, model: Path, out: Path) -> str:
        return (self.template.replace("{model}", shlex.quote(str(model)))
                .replace("{out}", shlex.quote(str(out))))

    def run(self, model: Path, out: Path) -> float:
        """Run once into the empty directory `out`; returns wall seconds. EngineError on failure."""
        command = self.command(model, out)
        start = time.perf_counter()
        # The running Python's bin dir goes first on PATH, so 'xvalid-run {model} {out}' finds
        # the runner of this installation even when the venv is not activated.
        env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent),
                                                     os.environ.get("PATH", "")]))
        proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        try:
            _, stderr = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: shells spawn children
            proc.communicate()
            raise EngineError(f"{self.name}: timed out after {self.timeout:g} s "
                              f"(raise --engine-timeout?)") from None
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            last = (stderr.decode(errors="replace").strip().splitlines() or ["(no stderr)"])[-1]
            raise EngineError(f"{self.name}: exited with code {proc.returncode}: {last[:300]}")
        return elapsed

    def logits_path(self, out: Path) -> Path:
        if self.output_name:
            path = out / self.output_name
            if not path.is_file():
                raise EngineError(f"{self.name}: wrote no {self.output_name} in its output directory")
            return path
        found = sorted(p for p in out.iterdir() if p.is_file() and p.suffix in (".npy", ".bin"))
        if not found:
            raise EngineError(f"{self.name}: wrote no .npy or .bin file in its output directory")
        if len(found) > 1:
            raise EngineError(f"{self.name}: wrote {len(found)} candidate files "
                              f"({', '.join(p.name for p in found)}); name one with --engine-output")
        return found[0]
