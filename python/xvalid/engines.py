"""External engines: any program that reads a model file and writes logits (docs/engines.md).

Protocol version 3 (version 1 is the seed's `ENGINE MODEL OUTDIR` with logits only, version 2
added decode, intermediates, threads and timing, version 3 the compute dtype; each still works
unchanged). The command template gets placeholders substituted (shell-quoted) and runs in a
shell with {out} a fresh empty directory; the same values are in its environment:

  {model} {out}                                 the model file, the output directory
  {decode}   XVALID_DECODE_STEPS                N decode steps asked for (0: none)
  {prefill}  XVALID_PREFILL                     S - N tokens to prefill before decoding
  {threads}  XVALID_THREADS, OMP_NUM_THREADS    thread count
  {repeat}   XVALID_REPEAT, {warmup} XVALID_WARMUP   timed forwards and untimed ones before
  {dtype}    XVALID_DTYPE                       the compute dtype: float32, bfloat16, float16
             XVALID_INTERMEDIATES               1: write {out}/intermediates/, 0: skip them
             XVALID_PROTOCOL                    3

Outputs, all in {out}: the logits (B,S,V) as the one .npy/.bin file (or --engine-output),
intermediates/NAME.npy (optional), decode_logits.npy or .bin (B,N,V) when asked to decode
(optional: absent means "decode not supported"), timing.json (optional), engine.json
(optional: {"dtype": what it computed in}).

ExternalEngine.run() does one run and returns an EngineResult; ExternalEngine.time_process()
times the whole process for an engine that reports no timing. Nothing here judges results.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import EngineError, InputError
from .metrics import COMPUTE_DTYPES
from .timing import Timing

PROTOCOL_VERSION = 3
NPY_MAGIC = b"\x93NUMPY"
INTERMEDIATES_DIR = "intermediates"
TIMING_FILE = "timing.json"
ENGINE_INFO_FILE = "engine.json"
DECODE_FILES = ("decode_logits.npy", "decode_logits.bin")  # reserved: never taken for logits
PLACEHOLDERS = ("model", "out", "decode", "prefill", "threads", "repeat", "warmup", "dtype")
ENGINE_DTYPES = ("float64", *COMPUTE_DTYPES)  # what engine.json may say it computed in

# --engine NAME=CMD: a name is these characters up to the first '='.
ENGINE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


# ---------------------------------------------------------------------------------------------
# reading what an engine wrote


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


def read_logits_file(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """Logits of `shape` from an .npy file or a headerless float32 file; EngineError if unusable."""
    with open(path, "rb") as fp:
        magic = fp.read(len(NPY_MAGIC))
    if magic == NPY_MAGIC:
        return _load_npy(path, path.name, shape)
    expected = int(np.prod(shape))
    size = path.stat().st_size
    if size != expected * 4:
        raise EngineError(f"{path.name}: {size} bytes of raw float32, expected {expected * 4} "
                          f"(4 x {' x '.join(map(str, shape))} for shape {list(shape)})")
    return np.fromfile(path, dtype="<f4").reshape(shape)


@dataclass
class UnknownFile:
    """A file under intermediates/ that is not a documented name; `nearest` is the closest
    documented file name, or None when nothing is close."""

    file: str
    nearest: str | None

    def to_json(self) -> dict:
        return {"file": self.file, "nearest": self.nearest}


def read_intermediates(directory: Path, shapes: dict[str, tuple[int, ...]]
                       ) -> tuple[dict[str, np.ndarray], list[UnknownFile]]:
    """OUT/intermediates/NAME.npy for the documented names that exist, in the reference's
    shapes; and every other entry of the directory with the nearest documented file name."""
    if not directory.is_dir():
        return {}, []
    known = {f"{name}.npy": name for name in shapes}
    found, unknown = {}, []
    for path in sorted(directory.iterdir()):
        name = known.get(path.name)
        if name is not None and path.is_file():
            found[name] = _load_npy(path, f"{INTERMEDIATES_DIR}/{path.name}", shapes[name])
        else:
            entry = path.name + ("/" if path.is_dir() else "")
            nearest = difflib.get_close_matches(path.name, list(known), n=1, cutoff=0.6)
            unknown.append(UnknownFile(entry, nearest[0] if nearest else None))
    return found, unknown


def _number(value, label: str, integer: bool = False) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        kind = "a non-negative integer" if integer else "a non-negative number of ms"
        raise EngineError(f"{TIMING_FILE}: {label} must be {kind}, got {value!r}")
    return value


def _samples(value, label: str, count: int | None = None) -> list[float]:
    if not isinstance(value, list) or not value:
        raise EngineError(f"{TIMING_FILE}: {label} must be a non-empty list of ms, got {value!r}")
    if count is not None and len(value) != count:
        raise EngineError(f"{TIMING_FILE}: {label} has {len(value)} values, expected {count} "
                          f"(one per decode step)")
    return [float(_number(v, f"{label}[{i}]")) for i, v in enumerate(value)]


@dataclass
class EngineTiming:
    """An engine's own timing.json (docs/engines.md): milliseconds."""

    forward_ms: list[float]           # samples of the full forward of (B, S), after warmup
    load_ms: float | None = None      # reading the model file and getting ready
    warmup: int | None = None         # untimed forwards before the samples
    prefill_ms: float | None = None   # the prefill of S - N tokens, when it decoded
    decode_ms: list[float] | None = None  # one per decode step, when it decoded
    threads: int | None = None        # the thread count it says it ran with

    @classmethod
    def read(cls, path: Path, decode_steps: int) -> "EngineTiming":
        doc = read_json_object(path, TIMING_FILE)
        if "forward_ms" not in doc:
            raise EngineError(f"{TIMING_FILE}: forward_ms (a list of ms) is missing")
        timing = cls(forward_ms=_samples(doc["forward_ms"], "forward_ms"))
        if doc.get("load_ms") is not None:
            timing.load_ms = float(_number(doc["load_ms"], "load_ms"))
        if doc.get("warmup") is not None:
            timing.warmup = int(_number(doc["warmup"], "warmup", integer=True))
        if doc.get("threads") is not None:
            timing.threads = int(_number(doc["threads"], "threads", integer=True))
        if decode_steps and doc.get("prefill_ms") is not None:
            timing.prefill_ms = float(_number(doc["prefill_ms"], "prefill_ms"))
        if decode_steps and doc.get("decode_ms") is not None:
            timing.decode_ms = _samples(doc["decode_ms"], "decode_ms", decode_steps)
        return timing


def read_json_object(path: Path, name: str) -> dict:
    """An engine's JSON file (`name` as the protocol calls it) as a dict; EngineError, one line
    naming the file, when it is unreadable, not JSON or not an object."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise EngineError(f"{name}: unreadable ({exc})") from None
    except json.JSONDecodeError as exc:
        raise EngineError(f"{name}: not valid JSON ({exc.msg}: line {exc.lineno}, "
                          f"column {exc.colno})") from None
    if not isinstance(doc, dict):
        raise EngineError(f"{name}: expected a JSON object, got {type(doc).__name__}")
    return doc


def read_engine_dtype(path: Path) -> str | None:
    """The "dtype" of an engine's engine.json (None when it has none); EngineError when the
    file is not a JSON object or the dtype is not one of ENGINE_DTYPES."""
    doc = read_json_object(path, ENGINE_INFO_FILE)
    dtype = doc.get("dtype")
    if dtype is not None and dtype not in ENGINE_DTYPES:
        raise EngineError(f"{ENGINE_INFO_FILE}: dtype must be one of {', '.join(ENGINE_DTYPES)}, "
                          f"got {dtype!r}")
    return dtype


def written_files(out: Path) -> str:
    """What an engine left in `out`, for error messages: 'logits.bin, intermediates/ (27 files)'."""
    entries = []
    for path in sorted(out.iterdir()):
        if path.is_dir():
            count = sum(1 for p in path.rglob("*") if p.is_file())
            entries.append(f"{path.name}/ ({count} file{'' if count == 1 else 's'})")
        else:
            entries.append(path.name)
    return ", ".join(entries) if entries else "nothing"


# ---------------------------------------------------------------------------------------------
# names


INTERPRETERS = ("python", "python3", "bash", "sh", "env", "exec", "valgrind", "taskset")


def program_name(template: str) -> str:
    """The engine's own file name, the default candidate name: the basename of the command's
    first word, skipping interpreters, options and VAR=value ('python eng.py ...' -> 'eng.py')."""
    try:
        words = shlex.split(template)
    except ValueError:
        words = template.split()
    for word in words:
        name = Path(word).name
        if word.startswith("-") or "=" in word or name.rstrip("0123456789.") in INTERPRETERS:
            continue
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.")
        if name:
            return name
    return "engine"


def parse_engine_spec(spec: str) -> tuple[str | None, str]:
    """'NAME=CMD' -> (NAME, CMD) when the text before the first '=' is a name
    ([A-Za-z0-9_.-]+); anything else is a command without a name: (None, spec).
    So 'eng --opt=1 {out}' is a command (a space before the '='), and a command that starts
    with a variable assignment must be named ('n=OMP_PROC_BIND=1 ./eng ...') or use 'env'."""
    head, sep, rest = spec.partition("=")
    if sep and ENGINE_NAME.fullmatch(head):
        return head, rest
    return None, spec


def engine_names(specs: list[tuple[str | None, str]], taken: set[str]) -> list[str]:
    """One unique name per engine: the given name (a clash is a usage error), else the
    program's name, with '-2', '-3', ... added when it is already taken."""
    explicit = [name for name, _ in specs if name]
    for name in explicit:
        if name in taken or explicit.count(name) > 1:
            raise InputError(f"--engine {name}=...: the name {name!r} is used twice "
                             f"(candidate names must be unique)")
    used = set(taken) | set(explicit)
    names = []
    for name, template in specs:
        if not name:
            base = name = program_name(template)
            n = 1
            while name in used:
                n += 1
                name = f"{base}-{n}"
            used.add(name)
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# running


@dataclass
class EngineRequest:
    """What one run of an engine is asked for; also its environment and placeholders."""

    seq_len: int                 # S, tokens per input row
    decode_steps: int = 0        # N; the engine prefills S - N then decodes N one at a time
    threads: int = 1
    repeat: int = 1              # forwards to time, for an engine that times itself
    warmup: int = 0
    intermediates: bool = True   # whether compare reads them (an engine may skip them if 0)
    dtype: str = "float32"       # the compute dtype asked for (compare --dtype)

    def values(self) -> dict[str, str]:
        return {"decode": str(self.decode_steps), "prefill": str(self.seq_len - self.decode_steps),
                "threads": str(self.threads), "repeat": str(self.repeat),
                "warmup": str(self.warmup), "dtype": self.dtype}

    def environment(self) -> dict[str, str]:
        v = self.values()
        return {"XVALID_PROTOCOL": str(PROTOCOL_VERSION), "XVALID_DECODE_STEPS": v["decode"],
                "XVALID_PREFILL": v["prefill"], "XVALID_THREADS": v["threads"],
                "OMP_NUM_THREADS": v["threads"], "XVALID_REPEAT": v["repeat"],
                "XVALID_WARMUP": v["warmup"], "XVALID_INTERMEDIATES": str(int(self.intermediates)),
                "XVALID_DTYPE": v["dtype"]}


@dataclass
class EngineResult:
    """Everything one run of an engine produced, read and shape-checked."""

    logits: np.ndarray                       # (B, S, V), as written (any float dtype)
    decode_logits: np.ndarray | None         # (B, N, V); None: it wrote no decode output
    intermediates: dict[str, np.ndarray]     # documented names it wrote, reference shapes
    unknown_intermediates: list[UnknownFile]  # other files under intermediates/
    timing: EngineTiming | None              # its timing.json; None when it wrote none
    process_ms: float                        # wall time of the whole process
    files: str = ""                          # what it wrote, as written_files() lists it
    logits_file: str = ""
    dtype: str | None = None                 # what engine.json says it computed in, if it does


@dataclass
class ExternalEngine:
    """One --engine: a command template with a candidate name."""

    template: str
    name: str
    timeout: float = 300.0
    output_name: str | None = None  # --engine-output: the logits file's name in {out}
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if "{out}" not in self.template:
            raise InputError(f"--engine {self.template!r}: the command must contain {{out}}")

    @property
    def takes_dtype(self) -> bool:
        """Its command passes the compute dtype on ({dtype}): that declares it computes in it."""
        return "{dtype}" in self.template

    def command(self, model: Path, out: Path, request: EngineRequest) -> str:
        values = {"model": str(model), "out": str(out), **request.values()}
        command = self.template
        for key in PLACEHOLDERS:
            command = command.replace("{" + key + "}", shlex.quote(values[key]))
        return command

    def run(self, model: Path, logits_shape: tuple[int, int, int], request: EngineRequest,
            intermediate_shapes: dict[str, tuple[int, ...]] | None = None) -> EngineResult:
        """One run in a fresh output directory, everything it wrote read and checked.
        EngineError (its message starts with the engine's name) when it failed or wrote
        something unusable."""
        with tempfile.TemporaryDirectory(prefix="xvalid-engine-") as tmp:
            out = Path(tmp)
            try:
                process_ms = self.run_process(model, out, request)
                return self._read_outputs(out, logits_shape, request, intermediate_shapes,
                                          process_ms)
            except EngineError as exc:
                message = str(exc)
                prefix = f"{self.name}: "
                raise EngineError(message if message.startswith(prefix) else prefix + message
                                  ) from None

    def _read_outputs(self, out, logits_shape, request, intermediate_shapes, process_ms):
        path = self.logits_path(out)
        logits = read_logits_file(path, logits_shape)
        intermediates, unknown = ({}, []) if intermediate_shapes is None else \
            read_intermediates(out / INTERMEDIATES_DIR, intermediate_shapes)
        decoded = None
        if request.decode_steps:
            B, _, V = logits_shape
            decoded = self._decode_logits(out, (B, request.decode_steps, V))
        timing = (EngineTiming.read(out / TIMING_FILE, request.decode_steps)
                  if (out / TIMING_FILE).is_file() else None)
        dtype = (read_engine_dtype(out / ENGINE_INFO_FILE)
                 if (out / ENGINE_INFO_FILE).is_file() else None)
        return EngineResult(logits, decoded, intermediates, unknown, timing, process_ms,
                            written_files(out), path.name, dtype)

    def _decode_logits(self, out: Path, shape: tuple[int, int, int]) -> np.ndarray | None:
        found = [out / name for name in DECODE_FILES if (out / name).is_file()]
        if len(found) > 1:
            raise EngineError(f"wrote both {DECODE_FILES[0]} and {DECODE_FILES[1]}; write one")
        return read_logits_file(found[0], shape) if found else None

    def run_process(self, model: Path, out: Path, request: EngineRequest) -> float:
        """Run the command once into the empty directory `out`; returns wall milliseconds.
        EngineError on a non-zero exit or a timeout (the whole process group is killed)."""
        command = self.command(model, out, request)
        # The running Python's bin dir goes first on PATH, so 'xvalid-run {model} {out}' finds
        # the runner of this installation even when the venv is not activated.
        env = dict(os.environ, **request.environment(), **self.extra_env,
                   PATH=os.pathsep.join([str(Path(sys.executable).parent),
                                         os.environ.get("PATH", "")]))
        start = time.perf_counter()
        proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        try:
            _, stderr = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: shells spawn children
            proc.communicate()
            raise EngineError(f"{self.name}: timed out after {self.timeout:g} s "
                              f"(raise --engine-timeout?)") from None
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if proc.returncode != 0:
            last = (stderr.decode(errors="replace").strip().splitlines() or ["(no stderr)"])[-1]
            raise EngineError(f"{self.name}: exited with code {proc.returncode}: {last[:300]}")
        return elapsed_ms

    def time_process(self, model: Path, request: EngineRequest) -> Timing:
        """For an engine that reports no timing: `request.repeat` whole runs (load included),
        each into a fresh directory, asked for no decode and no intermediates."""
        quiet = EngineRequest(request.seq_len, 0, request.threads, 1, 0, intermediates=False,
                              dtype=request.dtype)
        samples = []
        for _ in range(request.repeat):
            with tempfile.TemporaryDirectory(prefix="xvalid-engine-") as tmp:
                samples.append(self.run_process(model, Path(tmp), quiet))
        return Timing.from_samples(samples, warmup=0)

    def logits_path(self, out: Path) -> Path:
        """The logits file: --engine-output's name, else the one .npy/.bin in `out` that is
        not a decode file. The message lists what the engine wrote when there is none."""
        if self.output_name:
            path = out / self.output_name
            if not path.is_file():
                raise EngineError(f"{self.name}: wrote no {self.output_name} in its output "
                                  f"directory (it wrote: {written_files(out)})")
            return path
        found = sorted(p for p in out.iterdir() if p.is_file() and p.suffix in (".npy", ".bin")
                       and p.name not in DECODE_FILES)
        if not found:
            raise EngineError(f"{self.name}: wrote no .npy or .bin file in its output directory "
                              f"(it wrote: {written_files(out)})")
        if len(found) > 1:
            raise EngineError(f"{self.name}: wrote {len(found)} candidate files "
                              f"({', '.join(p.name for p in found)}); name one with --engine-output")
        return found[0]


def make_engines(specs: tuple[str, ...], taken: set[str], timeout: float,
                 output_name: str | None) -> list[ExternalEngine]:
    """ExternalEngines for the --engine values, named (see parse_engine_spec, engine_names)."""
    parsed = [parse_engine_spec(spec) for spec in specs]
    names = engine_names(parsed, taken)
    return [ExternalEngine(template, name, timeout, output_name)
            for name, (_, template) in zip(names, parsed)]
