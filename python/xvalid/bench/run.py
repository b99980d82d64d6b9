"""Running the grid: every backend at every cell is validated before it is timed.

For each model, thread count and cell (B rows, S prompt tokens, N decode steps):
 1. inputs: seeded random ids (B, S+N), no padding;
 2. reference (compare.run_reference): torch float32 and float64 over all S+N positions, and
    the tolerance compare derives from their difference;
 3. one untimed run per candidate: an in-process backend prefills S tokens and decodes N one
    at a time (its peak memory is measured on this run); an external engine gets the cell's
    model file and N decode steps (compare.run_engine);
 4. compare.judge: the prefill logits against the reference's first S positions, each decode
    step against the full forward at its position. A candidate that fails is INVALID: it is
    not timed, and never ranked or in a speedup;
 5. timing: --warmup untimed runs, then timed runs alternating between the backends (machine
    noise hits them alike) until each has --repeat samples and --min-time seconds of them.
    An engine is run --repeat times and its own timing.json read; an engine that writes none
    is timed as a whole process (load included) and labelled so.

Two dtype axes. --weight-dtype: each model is benchmarked once per storage dtype of its
weights (a file in that dtype for the C++ backends and engines; the reference runs on the
values it stores, upcast or dequantised, so every backend is judged at the float32 budget).
--dtype: the compute dtype; at bfloat16 or float16 torch runs in it and is judged by the
budget PyTorch's own error sets (compare --dtype), and a backend that computes in float32
only (the C++ kernels) gets an "unsupported" row, never a silent float32 run.

Ctrl-C ends the run; the cells finished so far are kept and the result is marked partial.
"""

from __future__ import annotations

import dataclasses
import datetime
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..backends import DEFAULT_BACKENDS, Backend, TorchBackend, backend_names, get_spec
from ..compare import (Candidate, Tolerance, derive_tolerance, judge, load_backend,
                       run_engine, run_reference, versions)
from ..config import ModelConfig
from ..dtypes import store_weights
from ..engines import EngineRequest, ExternalEngine, make_engines
from ..errors import (EXIT_ENGINE, EXIT_FAIL, EXIT_INTERRUPTED, EXIT_PASS, EngineError,
                      XValidError)
from ..generate import generate_model
from ..modelfile import ModelFile, read_model, write_model
from ..report import failure_reasons
from .grid import Cell, cells, skip_reason
from .machine import PeakMemory, available_memory_bytes, children_peak_mb, machine_info
from .roofs import forward_flops, measure_roofs, weight_bytes_per_step
from .rows import (TIMING_ENGINE, TIMING_IN_PROCESS, TIMING_PROCESS, Row, Stats,
                   rank_and_compare)

MAX_SAMPLES = 1000  # timed runs per backend and cell, whatever --min-time asks


@dataclass
class ModelSpec:
    """One model to benchmark: a model file, or a config generated with BenchOptions.seed."""

    name: str
    path: Path | None = None
    config: ModelConfig | None = None


@dataclass
class BenchOptions:
    models: list[ModelSpec]
    batch: list[int]
    seq: list[int]
    gen: list[int]
    threads: list[int]
    weight_dtypes: list[str] = field(default_factory=lambda: ["float32"])  # storage of the weights
    dtypes: list[str] = field(default_factory=lambda: ["float32"])         # compute dtypes
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    engines: tuple[str, ...] = ()
    engine_output: str | None = None
    engine_timeout: float = 300.0
    warmup: int = 1
    repeat: int = 3
    min_time: float = 0.5     # seconds of timed runs per backend and cell, at least
    seed: int = 123           # generated weights, and every cell's inputs
    profile: bool = False
    grid: str = "default"
    command: str = ""

    def settings(self) -> dict:
        return {"grid": self.grid, "batch": self.batch, "seq": self.seq, "gen": self.gen,
                "threads": self.threads, "weight_dtypes": self.weight_dtypes,
                "dtypes": self.dtypes, "backends": list(self.backends),
                "engines": list(self.engines), "warmup": self.warmup, "repeat": self.repeat,
                "min_time_s": self.min_time, "seed": self.seed, "profile": self.profile}


@dataclass
class BenchResult:
    options: BenchOptions
    machine: dict
    started: str
    models: list[dict] = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    roofs: dict[int, dict] = field(default_factory=dict)   # by thread count, at the start
    roofs_end: dict[int, dict] = field(default_factory=dict)   # measured again at the end
    rows: list[Row] = field(default_factory=list)
    profile: dict | None = None
    partial: bool = False
    interrupted_at: str | None = None
    duration_s: float = 0.0
    cells_total: int = 0

    @property
    def exit_code(self) -> int:
        if self.partial:
            return EXIT_INTERRUPTED
        statuses = {row.status for row in self.rows}
        return EXIT_ENGINE if "error" in statuses else EXIT_FAIL if "invalid" in statuses \
            else EXIT_PASS


class NullView:
    """What run_bench reports as it goes; bench/live.py draws it on a terminal."""

    def start(self, result: BenchResult) -> None: ...
    def set_total(self, total_work: float) -> None: ...
    def status(self, text: str) -> None: ...
    def cell_done(self, rows: list[Row], work: float) -> None: ...
    def stop(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# models and backends


@dataclass
class LoadedModel:
    name: str
    weight_dtype: str         # how the weights are stored in `path`
    mf: ModelFile             # weights as stored, in float32 (its inputs are replaced per cell)
    stored: dict              # the stored form of the weights that are not float32 (by key)
    path: Path | None         # a file the C++ backends and engines can read
    ref32: TorchBackend       # the reference, also the torch candidate
    ref64: TorchBackend       # for the tolerance only
    backends: dict[str, Backend]   # the in-process candidates by name, torch included if asked
    info: dict
    half_refs: dict[str, TorchBackend] = field(default_factory=dict)  # torch in a half dtype

    def half_ref(self, dtype: str) -> TorchBackend:
        """torch computing in `dtype` (bfloat16, float16): the reference's half-precision run
        and the torch candidate at that compute dtype, made on first use."""
        if dtype not in self.half_refs:
            self.half_refs[dtype] = TorchBackend(self.mf, dtype)
        return self.half_refs[dtype]


def load_model(spec: ModelSpec, weight_dtype: str, opts: BenchOptions, workdir: Path, view
               ) -> LoadedModel:
    """The model with its weights stored in weight_dtype, and its backends. float32 is the
    file as given (or generated); another dtype is converted from it and written for the C++
    backends and engines as safetensors, which they map in place."""
    if spec.path is not None:
        view.status(f"reading {spec.path}")
        mf, path, source = read_model(spec.path), spec.path, "file"
    else:
        view.status(f"generating {spec.name}")
        mf = generate_model(spec.config, batch_size=1, seq_len=1, seed=opts.seed, pad=0)
        path, source = None, "preset"
    converted = weight_dtype != mf.weight_dtype
    if converted:  # the stored values define the model (dtypes.store_weights)
        mf = store_weights(mf, weight_dtype)
    stored = mf.storage
    needs_file = opts.engines or any(not get_spec(n).reference for n in opts.backends)
    if needs_file and converted:
        view.status(f"writing {spec.name} with {weight_dtype} weights")
        path = workdir / f"{spec.name}-{weight_dtype}.safetensors"
        write_model(mf, path, progress=False, container="safetensors")
    elif path is None and needs_file:
        path = workdir / f"{spec.name}.json"  # the C++ backends read the weights from a file
        write_model(mf, path, progress=False)
    view.status(f"loading the backends for {spec.name} ({weight_dtype} weights)")
    start = time.perf_counter()
    ref32 = TorchBackend(mf, "float32")
    load_ms = {"torch": (time.perf_counter() - start) * 1e3}
    backends: dict[str, Backend] = {}
    for name in opts.backends:
        spec_b = get_spec(name)
        if spec_b.reference:
            backends[name] = ref32
        else:
            backends[name], load_ms[name] = load_backend(spec_b, path, mf)
    cfg = mf.config
    info = {"name": spec.name, "weight_dtype": weight_dtype, "source": source,
            "path": str(spec.path) if spec.path else None,
            "config": cfg.to_json(), "parameters": cfg.num_parameters,
            "seed": mf.meta.get("seed") if isinstance(mf.meta.get("seed"), int) else None,
            "weight_bytes": weight_bytes_per_step(cfg, weight_dtype),
            "load_ms": load_ms}
    return LoadedModel(spec.name, weight_dtype, mf, stored, path, ref32, TorchBackend(mf, "float64"),
                       backends, info)


def cell_inputs(cfg: ModelConfig, cell: Cell, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """ids (B, S+N) int32 drawn from a generator seeded by (seed, B, S, N); mask all ones.
    The same cell gets the same tokens in every run and at every thread count."""
    rng = np.random.default_rng([seed, cell.batch, cell.seq, cell.gen])
    ids = rng.integers(0, cfg.vocab_size, size=(cell.batch, cell.positions), dtype=np.int32)
    return ids, np.ones_like(ids, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# one generation: the prefill of S tokens, then N one-token steps


@dataclass
class Generation:
    prefill_ms: float
    step_ms: list[float]                 # one per decode step
    prefill_logits: np.ndarray           # (B, S, V)
    decode_logits: np.ndarray | None     # (B, N, V); None when N = 0


def generate_once(backend: Backend, ids: np.ndarray, mask: np.ndarray, S: int) -> Generation:
    """Prefill ids[:, :S] from an empty cache, then feed ids[:, t] for t = S .. S+N-1 one at a
    time (teacher forcing: the inputs, not the argmax, so every backend does the same work
    and each step can be checked against the reference's full forward)."""
    backend.reset_cache()
    start = time.perf_counter()
    prefill = backend.step(ids[:, :S], mask[:, :S])
    prefill_ms = (time.perf_counter() - start) * 1e3
    step_ms, steps = [], []
    for t in range(S, ids.shape[1]):
        start = time.perf_counter()
        steps.append(backend.step(ids[:, t:t + 1], mask[:, :t + 1]))
        step_ms.append((time.perf_counter() - start) * 1e3)
    return Generation(prefill_ms, step_ms, prefill,
                      np.concatenate(steps, axis=1) if steps else None)


@dataclass
class Samples:
    """Timed runs of one backend at one cell (ms). The steady-state per-token time of a run
    is the mean of its steps 2..N (the first step, often slower, is kept apart); with N = 1
    it is that one step."""

    prefill: list[float] = field(default_factory=list)
    first_decode: list[float] = field(default_factory=list)
    per_token: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)

    def add(self, prefill_ms: float | None, step_ms: list[float] | None,
            total_ms: float | None = None) -> None:
        if prefill_ms is not None:
            self.prefill.append(prefill_ms)
        if step_ms:
            self.first_decode.append(step_ms[0])
            self.per_token.append(statistics.fmean(step_ms[1:] or step_ms))
        if total_ms is None and prefill_ms is not None:
            total_ms = prefill_ms + sum(step_ms or [])
        if total_ms is not None:
            self.total.append(total_ms)

    def enough(self, repeat: int, min_time_s: float) -> bool:
        return len(self.total) >= MAX_SAMPLES or (
            len(self.total) >= repeat and sum(self.total) >= min_time_s * 1e3)

    def fill(self, row: Row) -> None:
        stats = lambda xs: Stats.of(xs) if xs else None  # noqa: E731
        row.prefill_ms, row.first_decode_ms = stats(self.prefill), stats(self.first_decode)
        row.decode_ms_per_token, row.total_ms = stats(self.per_token), stats(self.total)


def time_backends(backends: dict[str, Backend], ids, mask, S: int, opts: BenchOptions,
                  view) -> dict[str, Samples]:
    """--warmup untimed runs each, then timed runs in turn (a, b, a, b, ...) until every
    backend has enough."""
    for name, backend in backends.items():
        view.status(f"warming up {name}")
        for _ in range(opts.warmup):
            generate_once(backend, ids, mask, S)
    samples = {name: Samples() for name in backends}
    active = list(backends)
    while active:
        view.status(f"timing {', '.join(active)}")
        for name in list(active):
            run = generate_once(backends[name], ids, mask, S)
            samples[name].add(run.prefill_ms, run.step_ms)
            if samples[name].enough(opts.repeat, opts.min_time):
                active.remove(name)
    return samples


# ---------------------------------------------------------------------------------------------
# one cell


def validation_summary(report: dict, tol: Tolerance) -> dict:
    metrics, decode = report.get("metrics") or {}, report.get("decode")
    return {"status": report["status"], "max_abs": metrics.get("max_abs"),
            "budget_used": metrics.get("budget_used"), "atol": tol.atol,
            "decode": decode["status"] if decode else None,
            "first_failing_step": decode.get("first_failing_step") if decode else None}


def judged_row(base: dict, cand: Candidate, tol: Tolerance) -> Row:
    """A Row with the verdict of compare.judge: ok, invalid (with the reasons) or error."""
    status = cand.report["status"]
    row = Row(**base, kind="engine" if cand.kind == "engine" else "backend",
              status={"pass": "ok", "fail": "invalid", "error": "error"}[status])
    if status != "pass":
        row.reason = "; ".join(failure_reasons(cand.report, tol.to_json()))
    if status != "error":
        row.validation = validation_summary(cand.report, tol)
    return row


def add_derived(row: Row, cfg: ModelConfig, roof: dict | None) -> None:
    """GFLOP/s of the prefill and weight GB/s of a decode step, and their shares of the roofs."""
    prefill, step = row.median("prefill_ms"), row.median("decode_ms_per_token")
    if prefill:
        row.prefill_gflops = forward_flops(cfg, row.batch, row.seq) / prefill * 1e-6
        if roof:
            row.prefill_roof = row.prefill_gflops / roof["sgemm_gflops"]
    if step and row.weight_bytes_per_token:
        row.decode_gbs = row.weight_bytes_per_token / step * 1e-6
        if roof:
            row.decode_roof = row.decode_gbs / roof["copy_gbs"]


def held_weight_bytes(cfg: ModelConfig, name: str, weight_dtype: str, dtype: str) -> float:
    """Weight bytes one decode step of this candidate reads: torch holds the weights in its
    compute dtype (the stored values upcast); the C++ backends and engines read the file's."""
    reference = name in backend_names() and get_spec(name).reference
    return weight_bytes_per_step(cfg, dtype if reference else weight_dtype)


def run_cell(model: LoadedModel, engines: list[ExternalEngine], cell: Cell, dtype: str,
             opts: BenchOptions, roof: dict | None, workdir: Path, view) -> list[Row]:
    """One cell at one compute dtype: every candidate validated, then the valid ones timed."""
    cfg = model.mf.config
    base = dict(model=model.name, batch=cell.batch, seq=cell.seq, gen=cell.gen,
                threads=cell.threads, weight_dtype=model.weight_dtype, dtype=dtype)
    names = list(model.backends) + [engine.name for engine in engines]
    kinds = {name: "engine" if i >= len(model.backends) else "backend" for i, name in enumerate(names)}
    reason = skip_reason(cfg, cell, len(names), available_memory_bytes())
    if reason:
        return [Row(**base, backend=name, kind=kinds[name], status="skipped", reason=reason)
                for name in names]
    # a backend that cannot compute in dtype is said so, and left out of this cell
    unsupported = [Row(**base, backend=name, kind="backend", status="unsupported",
                       reason=f"computes in float32 only, not {dtype}")
                   for name in model.backends if get_spec(name).compute_dtype(dtype) != dtype]
    backends = {name: backend for name, backend in model.backends.items()
                if get_spec(name).compute_dtype(dtype) == dtype}
    half = model.half_ref(dtype) if dtype != "float32" else None
    if half is not None:
        half.set_threads(cell.threads)
        backends = {name: half if get_spec(name).reference else backend for name, backend in backends.items()}
    ids, mask = cell_inputs(cfg, cell, opts.seed)
    S, N = cell.seq, cell.gen

    view.status(f"{cell.label()}: reference (float32 and float64" + (f", {dtype})" if half else ")"))
    ref = run_reference(model.ref32, model.ref64, ids, mask, capture=False, half=half)
    tol = derive_tolerance(ref)
    candidates: list[Candidate] = []
    memory: dict[str, tuple[float, float | None]] = {}
    for name, backend in backends.items():
        view.status(f"{cell.label()}: validating {name}")
        kind = "reference" if get_spec(name).reference else "backend"
        peak = PeakMemory()
        try:
            run = generate_once(backend, ids, mask, S)
        except XValidError as exc:  # e.g. a shape the backend refuses: this cell's error
            candidates.append(Candidate(name, kind, error=f"{name}: {exc}"))
            continue
        memory[name] = (peak.peak_mb(), None if peak.start_mb is None
                        else peak.peak_mb() - peak.start_mb)
        # the torch candidate is judged like the others, against the reference's target
        candidates.append(Candidate(name, "backend" if half else kind, run.prefill_logits,
                                    decode_logits=run.decode_logits))
    engine_runs: dict[str, tuple[EngineRequest, Path, float]] = {}
    if engines:
        # the JSON container, weights as stored: what every engine reads
        cell_path = workdir / f"cell-{model.weight_dtype}-{cell.batch}x{cell.seq}+{cell.gen}.json"
        cell_mf = dataclasses.replace(model.mf, input_ids=ids, attention_mask=mask,
                                      meta=dict(model.mf.meta, bench_cell=cell.label()))
        write_model(cell_mf, cell_path, progress=False)  # cell_mf keeps the stored form
        for engine in engines:
            view.status(f"{cell.label()}: validating {engine.name}")
            request = EngineRequest(cell.positions, N, cell.threads, 1, opts.warmup,
                                    intermediates=False, dtype=dtype)
            before = children_peak_mb()
            candidates.append(run_engine(engine, cell_path, ref.logits.shape, request, None))
            engine_runs[engine.name] = (request, cell_path, before)
    judge(candidates, ref, tol, N)
    del ref

    rows = [judged_row(dict(base, backend=c.name), c, tol) for c in candidates]
    valid = {row.backend: backends[row.backend] for row in rows
             if row.status == "ok" and row.backend in backends}
    samples = time_backends(valid, ids, mask, S, opts, view) if valid else {}
    for row in rows:
        if row.backend in samples:
            row.timing = TIMING_IN_PROCESS
            samples[row.backend].fill(row)
            row.peak_rss_mb, row.rss_growth_mb = memory[row.backend]
    for cand, row in zip(candidates, rows):
        if cand.kind == "engine" and row.status == "ok":
            time_engine_cell(cand, row, *engine_runs[cand.name], opts, view)
    rows += unsupported
    for row in rows:
        row.weight_bytes_per_token = held_weight_bytes(cfg, row.backend, model.weight_dtype, dtype)
        add_derived(row, cfg, roof)
    order = {name: i for i, name in enumerate(names)}
    return sorted(rows, key=lambda row: order[row.backend])


def time_engine_cell(cand: Candidate, row: Row, request: EngineRequest, cell_path: Path,
                     children_before: float, opts: BenchOptions, view) -> None:
    """An engine's samples: its validation run and --repeat - 1 more, each read from its
    timing.json; without one, each run's whole-process time (load included)."""
    results = [cand.result]
    try:
        for i in range(opts.repeat - 1):
            view.status(f"timing {cand.name} (run {i + 2} of {opts.repeat})")
            results.append(cand.engine.run(cell_path.resolve(), cand.logits.shape, request, None))
    except EngineError as exc:
        row.status, row.reason = "error", f"timing run: {exc}"
        return
    samples = Samples()
    if any(r.timing is None for r in results):
        row.timing = TIMING_PROCESS
        for r in results:
            samples.add(None, None, r.process_ms)
    else:
        row.timing = TIMING_ENGINE
        for r in results:
            t = r.timing
            if request.decode_steps == 0:
                for forward_ms in t.forward_ms:  # with no decode, a forward is the prefill
                    samples.add(forward_ms, None)
            elif t.prefill_ms is not None:
                samples.add(t.prefill_ms, t.decode_ms)
        if not samples.total:
            row.timing = TIMING_PROCESS  # it decoded without saying how long it took
            for r in results:
                samples.add(None, None, r.process_ms)
    samples.fill(row)
    peak = children_peak_mb()
    if peak > children_before:
        row.peak_rss_mb = peak
    else:
        row.extra["peak_rss"] = "not measured: no higher than an earlier child process's peak"


# ---------------------------------------------------------------------------------------------
# the run


def cell_work(cfg: ModelConfig, cell: Cell, candidates: int) -> float:
    """A rough cost of one cell for the progress bar's ETA: the flops of the reference's two
    forwards and of every candidate's runs, per thread, plus a fixed overhead."""
    flops = forward_flops(cfg, cell.batch, cell.positions)
    return flops * (3 + 4 * candidates) / cell.threads + 2e8


def run_bench(opts: BenchOptions, view=None) -> BenchResult:
    """The whole grid; returns what was measured (partial on Ctrl-C). Usage errors (unknown
    backend, bad engine spec) are raised before anything runs."""
    view = view or NullView()
    for name in opts.backends:
        get_spec(name)
    taken = {*backend_names(), "reference", "reference-float64"}
    engines = make_engines(opts.engines, taken, opts.engine_timeout, opts.engine_output)
    if opts.profile:  # one cell: the first value of every axis
        opts = dataclasses.replace(opts, batch=opts.batch[:1], seq=opts.seq[:1],
                                   gen=opts.gen[:1], threads=opts.threads[:1],
                                   weight_dtypes=opts.weight_dtypes[:1], dtypes=opts.dtypes[:1])
    grid = cells(opts.batch, opts.seq, opts.gen, opts.threads)
    variants = len(opts.models) * len(opts.weight_dtypes) * len(opts.dtypes)
    result = BenchResult(opts, machine_info(),
                         datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         cells_total=len(grid) * variants)
    start = time.perf_counter()
    candidates = len(opts.backends) + len(engines)
    with tempfile.TemporaryDirectory(prefix="xvalid-bench-") as tmp:
        workdir = Path(tmp)
        current = "start"
        view.start(result)
        try:
            for threads in opts.threads:
                current = f"roofs at {threads} threads"
                view.status(f"measuring the roofs at {threads} thread{'s' * (threads > 1)}")
                result.roofs[threads] = measure_roofs(threads, repeat=3)
            backend_info: dict[str, dict] = {}
            for spec in opts.models:
                for weight_dtype in opts.weight_dtypes:
                    current = f"loading {spec.name} ({weight_dtype} weights)"
                    model = load_model(spec, weight_dtype, opts, workdir, view)
                    result.models.append(model.info)
                    backend_info.update({n: b.info() for n, b in model.backends.items()})
                    result.versions = versions(backend_info)
                    if len(result.models) == 1:  # the others are taken to be alike
                        view.set_total(sum(cell_work(model.mf.config, c, candidates) for c in grid)
                                       * variants)
                    for cell in grid:
                        for backend in (model.ref32, *model.backends.values()):
                            backend.set_threads(cell.threads)
                        for dtype in opts.dtypes:
                            current = " ".join([spec.name] + [f"{weight_dtype} weights"] * (weight_dtype != "float32")
                                               + [f"{dtype} compute"] * (dtype != "float32") + [cell.label()])
                            rows = run_cell(model, engines, cell, dtype, opts,
                                            result.roofs.get(cell.threads), workdir, view)
                            result.rows.extend(rows)
                            rank_and_compare(result.rows)
                            view.cell_done(rows, cell_work(model.mf.config, cell, candidates))
                    if opts.profile:
                        current = f"profile {spec.name}"
                        from .profile import profile_cell
                        result.profile = profile_cell(model, grid[0], opts, result.rows, view)
                    del model
            for threads in opts.threads:  # a machine shared with other work shows it here
                current = f"roofs at {threads} threads, at the end"
                view.status(f"measuring the roofs again at {threads} thread{'s' * (threads > 1)}")
                result.roofs_end[threads] = measure_roofs(threads, repeat=3)
        except KeyboardInterrupt:
            result.partial, result.interrupted_at = True, current
        finally:
            view.stop()
    if not result.versions:
        result.versions = versions({})
    rank_and_compare(result.rows)
    result.duration_s = time.perf_counter() - start
    return result
