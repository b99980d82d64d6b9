"""`xvalid compare`: candidates against the PyTorch reference.

Reference: torch float32; torch float64 measures the float32 reference's own rounding noise,
from which the default tolerance is derived (metrics.POLICIES). With a half-precision compute
dtype (--dtype bfloat16 or float16) torch also runs in that dtype, the budget is derived from
its error against float64 instead, and every candidate is compared with the float64 reference
(the exact answer) on the same terms. For each candidate (built-in
backends and external engines) the report holds: logit metrics on unpadded rows, a verdict,
the first divergent intermediate when intermediates exist, decode drift (--decode N; the same
check for backends and engines, and an explicit "not supported" for an engine that cannot
decode) and timing at one thread count.

run_compare is five named steps: reference_step (run_reference, or the reference cache of
refcache.py), run_candidates, judge, time_candidates, build_report. It returns a
CompareResult: the plain JSON-able report (schema: schemas/compare-report.schema.json;
report.py renders it) and, beside it, the logits.
xvalid bench validates every cell of its grid with the same steps.
"""

from __future__ import annotations

import dataclasses
import platform
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__, refcache
from .backends import (BUILTIN_BACKENDS, DEFAULT_BACKENDS, Backend, BackendSpec, TorchBackend,
                       get_spec, load_core)
from .engines import (DECODE_FILES, ENGINE_INFO_FILE, PROTOCOL_VERSION, EngineRequest,
                      EngineResult, ExternalEngine, make_engines)
from .errors import EXIT_ENGINE, EXIT_FAIL, EXIT_PASS, EngineError, InputError
from .intermediates import intermediate_names
from .metrics import (COMPUTE_DTYPES, POLICIES, TolerancePolicy, logit_metrics,
                      quantization_cost, tensor_error, tensor_rmse, within)
from .modelfile import ModelFile, read_model
from .timing import Timing, time_call

REPORT_SCHEMA = "xvalid-compare-report"
REPORT_SCHEMA_VERSION = 2


@dataclass
class CompareOptions:
    dtype: str = "float32"  # the compute dtype of the candidates (metrics.COMPUTE_DTYPES);
                            # a half dtype adds a torch run in it to the reference
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    engines: tuple[str, ...] = ()
    engine_output: str | None = None
    engine_timeout: float = 300.0
    atol: float | None = None
    rtol: float | None = None
    decode: int = 0
    threads: int | None = None
    warmup: int = 1
    repeat: int = 5
    intermediates: bool = True
    cache: bool = True  # the reference cache (refcache.py): read and write it
    argv: list[str] = field(default_factory=list)  # the compare flags, for the repro line


@dataclass
class Candidate:
    name: str
    kind: str  # "reference", "backend" or "engine"
    logits: np.ndarray | None = None  # (B,S,V): the full forward (bench: a prefill of S tokens)
    intermediates: dict | None = None
    decode_logits: np.ndarray | None = None  # (B,N,V) with --decode N; None: not asked, or
                                             # an engine that wrote none
    error: str | None = None  # the engine failed to produce output
    engine: ExternalEngine | None = None
    result: EngineResult | None = None  # what the engine wrote (engines only)
    compute: dict | None = None  # {"asked", "actual" (None: unknown), "source"}: compute_dtype()
    report: dict = field(default_factory=dict)


def split_name(name: str) -> tuple[int | None, str]:
    """'layer3.attn_out' -> (3, 'attn_out'); 'logits' -> (None, 'logits')."""
    if name.startswith("layer") and "." in name:
        layer, point = name.split(".", 1)
        return int(layer[5:]), point
    return None, name


def intermediate_budgets(ref: "ReferenceRun", policy: TolerancePolicy) -> dict:
    """Per intermediate, once per run: (max |reference|, noise, budget, RMSE budget or None).
    noise: max |PyTorch in the compute dtype - float64|; scale: max |the judged reference|."""
    budgets, keep, half = {}, ref.keep, ref.half
    for name, target in ref.target_intermediates.items():
        if half:
            noise, scale = tensor_error(ref.intermediates_half[name], target, keep)
            rmse = policy.rmse_max(tensor_rmse(ref.intermediates_half[name], target, keep))
        else:
            noise, scale = tensor_error(ref.intermediates64[name], target, keep)
            rmse = None
        budgets[name] = (scale, noise, policy.atol(noise, scale), rmse)
    return budgets


def divergence(cand: dict, target: dict, budgets: dict, keep: np.ndarray, names: list[str]) -> dict:
    """Per intermediate: error vs the judged reference (float32; float64 for a half dtype) and
    its budget (and RMSE budget, half dtypes); the first over budget.
    Also what was not compared: how many of the expected points exist, the layers with none,
    and the names before the first divergence that the candidate did not write (the bug may
    be there: the first divergence is the first among the points compared)."""
    points, first, missing_before = [], None, []
    for name in names:
        if name not in target:
            continue
        if name not in cand:
            if first is None:
                missing_before.append(name)
            continue
        layer, point = split_name(name)
        error, _ = tensor_error(cand[name], target[name], keep)
        scale, noise, budget, rmse_budget = budgets[name]
        row = {"name": name, "layer": layer, "point": point, "error": error, "scale": scale,
               "noise": noise, "budget": budget, "diverged": bool(not error <= budget)}
        if rmse_budget is not None:
            row.update(rmse=tensor_rmse(cand[name], target[name], keep), rmse_budget=rmse_budget)
            row["diverged"] = row["diverged"] or not row["rmse"] <= rmse_budget
        points.append(row)
        if row["diverged"] and first is None:
            first = row
    layers = sorted({split_name(name)[0] for name in names if split_name(name)[0] is not None})
    with_points = {p["layer"] for p in points}
    return {"points": points, "first": first, "compared": len(points),
            "expected": sum(1 for name in names if name in target),
            "layers_without_points": [layer for layer in layers if layer not in with_points],
            "not_compared_before_first": missing_before if first is not None else []}


def decode_drift(decoded: np.ndarray, mask: np.ndarray, reference_logits: np.ndarray,
                 atol: float, rtol: float, rmse_budgets: np.ndarray | None = None) -> dict:
    """The decode check for every candidate, backend or engine. decoded (B, N, V): the logits
    of N one-token steps through the KV cache after a prefill of S-N tokens; step i (1-based)
    is position S-N+i-1, compared with the reference's full forward there on unpadded rows.
    rmse_budgets (S,), half dtypes: each position's RMSE bound."""
    S, steps = mask.shape[1], decoded.shape[1]
    rows = []
    for i in range(steps):
        position = S - steps + i
        keep = mask[:, position].astype(bool)
        if not keep.any():
            rows.append({"step": i + 1, "position": position, "max_abs": None, "pass": True})
            continue
        cand, ref = decoded[keep, i].astype(np.float64), reference_logits[keep, position]
        diff = np.abs(cand - ref)
        diff[~np.isfinite(cand)] = np.inf
        row = {"step": i + 1, "position": position, "max_abs": float(diff.max()),
               "pass": bool(within(diff, ref, atol, rtol).all())}
        if rmse_budgets is not None:
            row.update(rmse=float(np.sqrt(np.mean(diff ** 2))),
                       rmse_budget=float(rmse_budgets[position]))
            row["pass"] = row["pass"] and row["rmse"] <= row["rmse_budget"]
        rows.append(row)
    first = next((r for r in rows if not r["pass"]), None)
    return {"status": "pass" if first is None else "fail", "prefill": S - steps, "steps": rows,
            "pass": first is None, "first_failing_step": first["step"] if first else None}


def decode_not_supported(prefill: int, reason: str) -> dict:
    """An explicit 'not checked' for a candidate that cannot decode: never a silent pass."""
    return {"status": "not supported", "prefill": prefill, "steps": [], "pass": None,
            "first_failing_step": None, "reason": reason}


def versions(backend_info: dict[str, dict]) -> dict:
    """Versions of everything that ran; `backends` has each built-in candidate's info()."""
    out = {"xvalid": __version__, "python": platform.python_version(), "numpy": np.__version__,
           "torch": refcache.torch_version(), "machine": platform.machine(),
           "platform": platform.platform()}
    if backend_info:
        out["backends"] = backend_info
    return out


def repro_command(mf: ModelFile, model: Path, opts: CompareOptions) -> str:
    """One copy-pasteable line: regenerate the model (when xvalid wrote it), then compare."""
    compare = shlex.join(["xvalid", "compare", str(model), *opts.argv])
    generator = mf.meta.get("generator")
    generate = generator.get("command") if isinstance(generator, dict) else None
    if isinstance(generate, str) and generate.startswith("xvalid generate "):
        return f"{generate} -o {shlex.quote(str(model))} && {compare}"
    return compare


# ---------------------------------------------------------------------------------------------
# The steps. run_compare calls them in this order; xvalid bench reuses reference, candidates
# (load_backend, run_engine), judge and time_engine on every cell of its grid.


@dataclass
class ReferenceRun:
    """The torch reference on one input: float32 (what candidates are compared with) and
    float64 (which measures the float32 reference's own rounding noise). With a half compute
    dtype also torch in that dtype, whose error against float64 sets the budget; candidates
    are then compared with float64."""

    logits: np.ndarray                  # float32 reference, (B, S, V)
    logits64: np.ndarray                # float64 reference, (B, S, V)
    mask: np.ndarray                    # (B, S) 0/1
    intermediates: dict | None = None   # float32, by name, when captured
    intermediates64: dict | None = None
    dtype: str = "float32"              # the compute dtype (metrics.COMPUTE_DTYPES)
    logits_half: np.ndarray | None = None       # torch in `dtype` when half, as float32 values
    intermediates_half: dict | None = None

    @property
    def keep(self) -> np.ndarray:
        """(B, S) bool: the unpadded positions, where every metric is taken."""
        return self.mask.astype(bool)

    @property
    def half(self) -> bool:
        return self.dtype != "float32"

    @property
    def torch_logits(self) -> np.ndarray:
        """PyTorch's own result in the compute dtype."""
        return self.logits_half if self.half else self.logits

    @property
    def target(self) -> np.ndarray:
        """What candidates are compared with: the float32 reference, float64 for a half dtype."""
        return self.logits64 if self.half else self.logits

    @property
    def target_intermediates(self) -> dict | None:
        return self.intermediates64 if self.half else self.intermediates

    @property
    def torch_intermediates(self) -> dict | None:
        return self.intermediates_half if self.half else self.intermediates

    @property
    def noise(self) -> float:
        """Max |PyTorch in the compute dtype - float64| over unpadded rows: its rounding noise
        (float32: the float32 reference's)."""
        keep = self.keep
        return float(np.abs(self.torch_logits[keep] - self.logits64[keep]).max())

    @property
    def noise_rmse(self) -> float:
        """RMS of PyTorch's error in the compute dtype against float64, over unpadded rows."""
        return tensor_rmse(self.torch_logits, self.logits64, self.keep)

    def position_rmse(self) -> np.ndarray:
        """(S,): the RMS of PyTorch's error at each position, over its unpadded rows (0 where
        every row is padded): the decode steps' RMSE unit."""
        keep = self.keep
        return np.array([tensor_rmse(self.torch_logits[:, p], self.logits64[:, p], keep[:, p])
                         for p in range(keep.shape[1])])

    @property
    def noise32(self) -> float:
        """Max |float32 - float64|: the float32 budget's noise, also in a half-dtype run."""
        keep = self.keep
        return float(np.abs(self.logits[keep] - self.logits64[keep]).max())

    @property
    def absmax(self) -> float:
        return float(np.abs(self.logits[self.keep]).max())


def run_reference(ref32: TorchBackend, ref64: TorchBackend, ids: np.ndarray, mask: np.ndarray,
                  capture: bool, half: TorchBackend | None = None) -> ReferenceRun:
    """Step 1: the float32 and float64 forwards of (ids, mask), and the half-dtype one when
    `half` is given; intermediates only when asked for (for a large model they are hundreds
    of MB each)."""
    logits32, inter32 = ref32.forward(ids, mask, capture=capture)
    logits64, inter64 = ref64.forward(ids, mask, capture=capture)
    run = ReferenceRun(logits32, logits64, np.asarray(mask), inter32, inter64)
    if half is not None:
        run.dtype = half.dtype
        run.logits_half, run.intermediates_half = half.forward(ids, mask, capture=capture)
    return run


@dataclass
class TorchRow:
    """What the torch candidate adds to the reference run it is (its logits are the float32
    reference's): kept in the reference cache with it."""

    load_ms: float                            # parse + building the float32 reference
    info: dict                                # TorchBackend.info()
    decode_logits: np.ndarray | None = None   # (B, N, V) with --decode N
    timing: dict | None = None                # time_forward's, without ratio_to_torch


@dataclass
class ReferenceStep:
    """Step 1's outcome: the reference, the thread count every candidate runs at, the torch
    candidate's own results, and where they came from (the report's reference_cache)."""

    ref: ReferenceRun
    threads: int
    torch_row: TorchRow | None         # None when torch is not a candidate
    torch_backend: TorchBackend | None = None  # the torch candidate, in the compute dtype;
                                               # None when read from the cache (torch not imported)
    cache_report: dict = field(default_factory=dict)
    store: tuple | None = None         # (ReferenceCache, key) to store into after the run


# CompareOptions fields by whether they change what reference_step returns, and so belong in
# the cache key (tests/test_refcache.py fails on a new field in neither).
REFERENCE_OPTIONS = ("dtype", "backends", "intermediates", "decode", "threads", "warmup", "repeat")
NON_REFERENCE_OPTIONS = ("engines", "engine_output", "engine_timeout", "atol", "rtol", "cache",
                         "argv")


def torch_is_candidate(opts: CompareOptions) -> bool:
    return any(get_spec(name).reference for name in opts.backends)


def reference_options(opts: CompareOptions) -> dict:
    """The cache key's options: the reference's own, and with torch a candidate, what its row
    holds (decode logits, forward timing). An unset --threads is torch's default, named by
    what decides it (refcache.default_threads_fingerprint) rather than asked of torch."""
    torch_row = ({"decode": opts.decode, "warmup": opts.warmup, "repeat": opts.repeat}
                 if torch_is_candidate(opts) else None)
    half = [opts.dtype] if opts.dtype != "float32" else []
    return {"dtypes": ["float32", "float64", *half], "intermediates": opts.intermediates,
            "threads": opts.threads or {"default": refcache.default_threads_fingerprint()},
            "torch_row": torch_row}


def reference_step(model: Path, mf: ModelFile, opts: CompareOptions, parse_s: float,
                   progress, read_signature: list[int] | None = None) -> ReferenceStep:
    """Step 1: the reference from the cache when it holds this file's with these options
    (torch is not imported), else computed (run_reference), to be stored after the run.
    read_signature: the file's refcache.stat_signature from before `mf` was read; the cache
    is used only if the file is still the same after its digest is taken."""
    cache = key = None
    lookup = refcache.Lookup("off", reason="--no-cache" if not opts.cache else
                             f"{model} is not a regular file")
    if opts.cache and model.is_file():
        progress("looking up the reference cache")
        cache = refcache.ReferenceCache()
        digest = cache.file_digest(model)
        if refcache.stat_signature(model) != read_signature:
            lookup = refcache.Lookup("off", reason=f"{model} changed while compare read it")
            return compute_reference(mf, opts, parse_s, progress, lookup)
        key = refcache.reference_key(digest, reference_options(opts))
        lookup = cache.load(key)
        if lookup.status == "hit":
            try:
                step = unpack_reference(lookup.entry, mf, opts)
            except refcache.EntryDamaged as exc:
                lookup = refcache.Lookup("damaged", reason=str(exc))
            else:
                step.cache_report = cache_report(cache, lookup, "cache")
                return step
    step = compute_reference(mf, opts, parse_s, progress, lookup, cache)
    step.store = (cache, key) if cache is not None else None
    return step


def compute_reference(mf: ModelFile, opts: CompareOptions, parse_s: float, progress,
                      lookup: refcache.Lookup, cache=None) -> ReferenceStep:
    """The float32 and float64 reference forwards in torch, at the run's thread count;
    `lookup`: why the cache did not supply them."""
    import torch

    threads = opts.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    half = opts.dtype != "float32"
    progress(f"running the reference (float32, float64{f' and {opts.dtype}' if half else ''})")
    start = time.perf_counter()
    torch_backend = TorchBackend(mf, opts.dtype)  # the torch candidate: PyTorch in the compute dtype
    torch_load_ms = (parse_s + time.perf_counter() - start) * 1e3
    ref32 = TorchBackend(mf, "float32") if half else torch_backend
    ref = run_reference(ref32, TorchBackend(mf, "float64"), mf.input_ids, mf.attention_mask,
                        opts.intermediates, torch_backend if half else None)
    torch_row = TorchRow(torch_load_ms, torch_backend.info()) if torch_is_candidate(opts) else None
    return ReferenceStep(ref, threads, torch_row, torch_backend,
                         cache_report(cache, lookup, "computed"))


def cache_report(cache, lookup: refcache.Lookup, source: str) -> dict:
    """The report's reference_cache: where the reference came from, why an entry was not used
    (reason), and whether the computed one was stored (else why not: not_stored)."""
    return {"source": source, "lookup": lookup.status, "reason": lookup.reason,
            "stored": False, "not_stored": None,
            "entry": lookup.entry.key_hash if lookup.entry is not None else None,
            "dir": str(cache.root) if cache is not None else None}


def pack_reference(step: ReferenceStep) -> tuple[dict[str, np.ndarray], dict]:
    """A ReferenceStep as a cache entry's arrays and JSON meta (unpack_reference reverses)."""
    ref, row = step.ref, step.torch_row
    arrays = {"logits": ref.logits, "logits64": ref.logits64, "mask": ref.mask}
    if ref.half:
        arrays["logits_half"] = ref.logits_half
    for prefix, captured in (("i32.", ref.intermediates), ("i64.", ref.intermediates64),
                             ("ihalf.", ref.intermediates_half)):
        arrays.update({prefix + name: a for name, a in (captured or {}).items()})
    meta = {"threads": step.threads, "intermediates": list(ref.intermediates or ()),
            "dtype": ref.dtype}
    if row is not None:
        if row.decode_logits is not None:
            arrays["torch.decode"] = row.decode_logits
        meta["torch_row"] = {"load_ms": row.load_ms, "info": row.info, "timing": row.timing}
    return arrays, meta


def unpack_reference(entry: refcache.Entry, mf: ModelFile, opts: CompareOptions) -> ReferenceStep:
    """A cache entry back as a ReferenceStep, checked against the file and the options;
    refcache.EntryDamaged when it does not fit them."""
    a, meta = entry.arrays, entry.meta
    B, S, V = mf.batch_size, mf.seq_len, mf.config.vocab_size
    try:
        names, dtype = meta["intermediates"], meta["dtype"]
        half = dtype != "float32"
        threads, row_meta = meta["threads"], meta.get("torch_row")
        fits = (a["logits"].shape == a["logits64"].shape == (B, S, V)
                and dtype == opts.dtype and ("logits_half" in a) == half
                and (not half or a["logits_half"].shape == (B, S, V))
                and np.array_equal(a["mask"], mf.attention_mask)
                and bool(names) == opts.intermediates and isinstance(threads, int)
                and (row_meta is not None) == torch_is_candidate(opts)
                and ("torch.decode" in a) == (row_meta is not None and opts.decode > 0))
        inter32 = {name: a["i32." + name] for name in names} if names else None
        inter64 = {name: a["i64." + name] for name in names} if names else None
        inter_half = {name: a["ihalf." + name] for name in names} if names and half else None
        row = (TorchRow(float(row_meta["load_ms"]), dict(row_meta["info"]), a.get("torch.decode"),
                        dict(row_meta["timing"])) if row_meta is not None else None)
    except (KeyError, TypeError, ValueError) as exc:
        raise refcache.EntryDamaged(f"its contents are incomplete ({exc})") from None
    if not fits:
        raise refcache.EntryDamaged("its arrays do not fit this model file and these options")
    run = ReferenceRun(a["logits"], a["logits64"], a["mask"], inter32, inter64, dtype,
                       a["logits_half"] if half else None, inter_half)
    return ReferenceStep(run, threads, row)


def store_reference(step: ReferenceStep, candidates: list[Candidate]) -> None:
    """After the run: a computed reference (and the torch row's decode logits and timing) into
    the cache; step.cache_report says whether it was stored."""
    if step.store is None:
        return
    cache, key = step.store
    torch_cand = next((c for c in candidates if c.kind == "reference"), None)
    if step.torch_row is not None and torch_cand is not None:
        step.torch_row.decode_logits = torch_cand.decode_logits
        step.torch_row.timing = {k: v for k, v in torch_cand.report["timing"].items()
                                 if k != "ratio_to_torch"}
    not_stored = cache.store(key, *pack_reference(step))
    step.cache_report.update(stored=not_stored is None, not_stored=not_stored,
                             entry=refcache.key_hash(key) if not_stored is None else None)


@dataclass(frozen=True)
class Tolerance:
    """The budget every candidate is judged by: atol from PyTorch's noise in the compute dtype
    (metrics.POLICIES) unless given, rtol as given or the policy's; for a half dtype also an
    RMSE bound (unless --atol is given: then the budget is the user's alone)."""

    atol: float
    rtol: float
    atol_given: bool
    noise: float    # ReferenceRun.noise
    absmax: float   # ReferenceRun.absmax
    policy: TolerancePolicy = POLICIES["float32"]
    rmse_max: float | None = None     # half dtypes: policy.rmse_factor x noise_rmse
    noise_rmse: float | None = None   # half dtypes: ReferenceRun.noise_rmse
    float32_atol: float | None = None  # half dtypes: the float32 budget of the same run

    @property
    def half(self) -> bool:
        return self.policy.dtype != "float32"

    def atol_source(self) -> str:
        p = self.policy
        if self.atol_given:
            return "--atol"
        if not self.half:
            return (f"max({p.noise_factor:g} x reference noise, "
                    f"{p.atol_floor:g} x max(1, max|logits|))")
        noise_term = f"{p.noise_factor:g} x PyTorch {p.dtype} error vs float64 ({self.noise:.2g})"
        if p.noise_factor * self.noise >= p.atol_floor * max(1.0, self.absmax):
            return noise_term
        return f"{p.atol_floor:g} x max(1, max|logits|) (one {p.dtype} ulp; {noise_term} is less)"

    def to_json(self) -> dict:
        out = {"dtype": self.policy.dtype, "atol": self.atol, "rtol": self.rtol,
               "atol_source": self.atol_source(), "reference_noise": self.noise,
               "reference_absmax": self.absmax,
               "compared_with": "float64" if self.half else "float32"}
        if self.half:
            out.update(rmse_max=self.rmse_max, reference_noise_rmse=self.noise_rmse,
                       float32_atol=self.float32_atol)
            if self.rmse_max is not None:
                out["rmse_source"] = (f"{self.policy.rmse_factor:g} x PyTorch {self.policy.dtype}"
                                      f" RMSE vs float64 ({self.noise_rmse:.2g})")
        return out


def derive_tolerance(ref: ReferenceRun, atol: float | None = None,
                     rtol: float | None = None) -> Tolerance:
    """The budget of ref's compute dtype (metrics.POLICIES)."""
    policy = POLICIES[ref.dtype]
    noise, absmax = ref.noise, ref.absmax
    tol = Tolerance(atol if atol is not None else policy.atol(noise, absmax),
                    rtol if rtol is not None else policy.rtol, atol is not None, noise, absmax,
                    policy)
    if not ref.half:
        return tol
    noise_rmse = ref.noise_rmse
    return dataclasses.replace(
        tol, noise_rmse=noise_rmse,
        rmse_max=None if atol is not None else policy.rmse_max(noise_rmse),
        float32_atol=POLICIES["float32"].atol(ref.noise32, absmax))


def load_backend(spec: BackendSpec, model: Path, mf: ModelFile,
                 dtype: str = "float32") -> tuple[Backend, float]:
    """A registered backend, in `dtype` when it can compute in it (else float32), and its load
    time in ms (the compiled module is imported, and in an editable install rebuilt, before
    the clock starts)."""
    if spec.uses_core:
        load_core()
    actual = spec.compute_dtype(dtype)
    start = time.perf_counter()
    backend = spec.create(model, mf) if actual == "float32" else spec.create(model, mf, actual)
    return backend, (time.perf_counter() - start) * 1e3


def run_backend(spec: BackendSpec, model: Path, mf: ModelFile, threads: int,
                capture: bool, dtype: str = "float32") -> tuple[Candidate, Backend]:
    """Load a registered backend (timed apart from the forward) and run the file's inputs."""
    backend, load_ms = load_backend(spec, model, mf, dtype)
    backend.set_threads(threads)
    logits, inter = backend.forward(mf.input_ids, mf.attention_mask, capture=capture)
    cand = Candidate(spec.name, "backend", logits, inter)
    cand.report["load_ms"] = load_ms
    return cand, backend


def compute_dtype(asked: str, spec: BackendSpec | None = None,
                  engine: ExternalEngine | None = None, result: EngineResult | None = None
                  ) -> dict:
    """What a candidate computes in, and how we know: a backend's registry entry; an engine's
    engine.json, else its command's {dtype} placeholder; float32 assumed for an engine that
    says nothing when float32 is asked; otherwise unknown (actual None, reported unchecked)."""
    if spec is not None:
        return {"asked": asked, "actual": spec.compute_dtype(asked), "source": "backend"}
    if result is not None and result.dtype is not None:
        return {"asked": asked, "actual": result.dtype, "source": "engine.json"}
    if engine.takes_dtype:
        return {"asked": asked, "actual": asked, "source": "{dtype} in its command"}
    if asked == "float32":
        return {"asked": asked, "actual": "float32", "source": "assumed (the protocol's default)"}
    return {"asked": asked, "actual": None, "source": "unknown"}


def run_engine(engine: ExternalEngine, model: Path, shape: tuple[int, int, int],
               request: EngineRequest, shapes: dict[str, tuple[int, ...]] | None) -> Candidate:
    """One external engine, one run; its failure is the candidate's error."""
    cand = Candidate(engine.name, "engine", engine=engine)
    cand.report.update(command=engine.template, protocol=PROTOCOL_VERSION)
    try:
        result = cand.result = engine.run(model.resolve(), shape, request, shapes)
    except EngineError as exc:
        cand.error = str(exc)
        cand.compute = compute_dtype(request.dtype, engine=engine)
        return cand
    cand.compute = compute_dtype(request.dtype, engine=engine, result=result)
    cand.logits = result.logits
    cand.decode_logits = result.decode_logits
    if result.intermediates or result.unknown_intermediates:
        cand.intermediates = result.intermediates
    cand.report.update(process_ms=result.process_ms, wrote=result.files,
                       unknown_intermediates=[u.to_json() for u in result.unknown_intermediates])
    if result.timing is not None and result.timing.load_ms is not None:
        cand.report["load_ms"] = result.timing.load_ms
    return cand


def reference_candidate(name: str, step: ReferenceStep) -> Candidate:
    """The torch candidate: the reference's own run in the compute dtype; from the cache, with
    the decode logits and forward timing stored beside it (the timing marked cached)."""
    cand = Candidate(name, "reference", step.ref.torch_logits, step.ref.torch_intermediates)
    cand.report["load_ms"] = step.torch_row.load_ms
    if step.torch_backend is None:
        cand.decode_logits = step.torch_row.decode_logits
        cand.report["timing"] = dict(step.torch_row.timing, cached=True)
    return cand


def run_candidates(model: Path, mf: ModelFile, opts: CompareOptions, engines: list[ExternalEngine],
                   step: ReferenceStep, request: EngineRequest, progress
                   ) -> tuple[list[Candidate], dict[str, Backend]]:
    """Step 2: every candidate's logits (and decode logits with --decode). The torch
    candidate is the reference's own run in the compute dtype (step.torch_backend). Returns the
    candidates in report order and the in-process backends by name (for timing)."""
    candidates: list[Candidate] = []
    backends: dict[str, Backend] = {}
    ref, threads = step.ref, step.threads
    for name in opts.backends:
        spec = get_spec(name)
        if spec.reference:
            cand = reference_candidate(name, step)
            if step.torch_backend is not None:
                backends[name] = step.torch_backend
        else:
            progress(f"running {name}")
            cand, backends[name] = run_backend(spec, model, mf, threads, opts.intermediates,
                                               opts.dtype)
        cand.compute = compute_dtype(opts.dtype, spec=spec)
        if opts.decode and cand.decode_logits is None:
            progress(f"decoding {name}")
            cand.decode_logits = backends[name].decode(mf.input_ids, mf.attention_mask,
                                                       mf.seq_len - opts.decode)
        candidates.append(cand)
    shapes = ({name: array.shape for name, array in ref.intermediates.items()}
              if ref.intermediates is not None else None)
    for engine in engines:
        progress(f"running {engine.name}")
        candidates.append(run_engine(engine, model, ref.logits.shape, request, shapes))
    return candidates, backends


def check_decode(cand: Candidate, ref: ReferenceRun, steps: int, tol: Tolerance,
                 rmse_budgets: np.ndarray | None = None) -> dict:
    """Decode drift of one candidate from its decode logits, against the judged reference's
    full forward; an engine that wrote none does not support decode (said, never passed)."""
    if cand.decode_logits is None:
        return decode_not_supported(ref.mask.shape[1] - steps, "not supported by this engine: "
                                    f"it wrote no {' or '.join(DECODE_FILES)}")
    return decode_drift(cand.decode_logits, ref.mask, ref.target, tol.atol, tol.rtol,
                        rmse_budgets)


def judge(candidates: list[Candidate], ref: ReferenceRun, tol: Tolerance, decode_steps: int = 0,
          names: list[str] = ()) -> None:
    """Step 3: each candidate's status (pass, fail, error) with its metrics, first divergence
    (when it has intermediates) and decode drift, into cand.report. A candidate's logits may
    cover the first S positions of the reference's only (bench: the prefill of a prompt);
    they are compared there."""
    budgets = intermediate_budgets(ref, tol.policy) if ref.intermediates is not None else {}
    # Half dtypes: each decode step's RMSE against PyTorch's own at that position.
    decode_rmse = (tol.policy.rmse_factor * ref.position_rmse()
                   if decode_steps and tol.rmse_max is not None else None)
    for cand in candidates:
        r = cand.report
        r.update(name=cand.name, kind=cand.kind)
        if cand.compute is not None:
            r["compute_dtype"] = cand.compute
        if cand.error:
            r.update(status="error", error=cand.error)
            continue
        S = cand.logits.shape[1]
        keep = ref.keep[:, :S]
        # The reference row is measured against float64: its own noise, a sanity check.
        against = (ref.logits64 if cand.kind == "reference" else ref.target)[:, :S]
        r["metrics"] = logit_metrics(cand.logits, against, keep, tol.atol, tol.rtol, 2 * tol.atol,
                                     tol.rmse_max)
        if cand.intermediates is not None and cand.kind != "reference":
            r["divergence"] = divergence(cand.intermediates, ref.target_intermediates, budgets,
                                         keep, names)
        r["status"] = "pass" if r["metrics"]["pass"] else "fail"
        if decode_steps:
            r["decode"] = check_decode(cand, ref, decode_steps, tol, decode_rmse)
            if r["decode"]["status"] == "fail":
                r["status"] = "fail"


def time_forward(backend, mf: ModelFile, threads: int, opts: CompareOptions) -> dict:
    """Median/min/max of the forward alone (no capture), after warmup, at `threads`."""
    backend.set_threads(threads)
    timing = time_call(lambda: backend.forward(mf.input_ids, mf.attention_mask), opts.warmup,
                       opts.repeat)
    return dict(timing.to_json(), measures="forward")


def time_engine(cand: Candidate, model: Path, request: EngineRequest) -> dict:
    """The engine's own forward timing (timing.json) when it wrote one, else `--repeat` whole
    processes, load included. EngineError if a timing run fails."""
    own = cand.result.timing
    if own is None:
        return dict(cand.engine.time_process(model.resolve(), request).to_json(),
                    measures="process")
    out = dict(Timing.from_samples(own.forward_ms, own.warmup or 0).to_json(), measures="forward")
    if own.threads is not None:
        out["threads"] = own.threads
    if own.prefill_ms is not None:
        out["prefill_ms"] = own.prefill_ms
    if own.decode_ms is not None:
        out["decode_ms"] = own.decode_ms
        out["decode_median_ms"] = Timing.from_samples(own.decode_ms, 0).median_ms
    return out


def time_candidates(candidates: list[Candidate], backends: dict[str, Backend], model: Path,
                    mf: ModelFile, threads: int, opts: CompareOptions, request: EngineRequest,
                    progress) -> None:
    """Step 4: forward timing of every candidate that ran, and the ratio to torch. A timing
    run that fails turns an engine's status into an error."""
    for cand in candidates:
        if cand.report.get("timing", {}).get("cached"):
            continue
        progress(f"timing {cand.name}")
        if cand.name in backends:
            cand.report["timing"] = time_forward(backends[cand.name], mf, threads, opts)
        elif not cand.error:
            try:
                cand.report["timing"] = time_engine(cand, model, request)
            except EngineError as exc:
                cand.error = str(exc).replace(f"{cand.name}: ", f"{cand.name}: timing run: ", 1)
                cand.report.update(status="error", error=cand.error)
    torch_ms = next((c.report["timing"]["median_ms"] for c in candidates
                     if c.name == "torch" and "timing" in c.report), None)
    for cand in candidates:
        timing = cand.report.get("timing")
        if torch_ms and timing and timing["measures"] == "forward":
            timing["ratio_to_torch"] = timing["median_ms"] / torch_ms


def quantization_report(mf: ModelFile, ref: ReferenceRun) -> dict | None:
    """The quantisation cost when the file records the model its weights were converted from
    (its `source` logits, computed in float64): the float64 reference of the stored model
    against them, so float32 rounding noise stays out. Information about the quantisation
    beside the verdict, never part of it. None without a record."""
    if mf.source_logits is None:
        return None
    return {"weight_dtype": mf.weight_dtype, "source_weight_dtype": mf.source_weight_dtype,
            **quantization_cost(ref.logits64, mf.source_logits, ref.keep)}


def build_report(model: Path, mf: ModelFile, opts: CompareOptions, threads: int,
                 tol: Tolerance, candidates: list[Candidate], backend_info: dict[str, dict],
                 reference_cache: dict, quantization: dict | None = None) -> dict:
    """Step 5: the JSON-able report (schemas/compare-report.schema.json) with its verdict;
    `quantization`: quantization_report's, reported beside the verdict."""
    statuses = [c.report["status"] for c in candidates]
    exit_code = (EXIT_ENGINE if "error" in statuses else EXIT_FAIL if "fail" in statuses
                 else EXIT_PASS)
    c = mf.config
    keep = mf.attention_mask.astype(bool)
    return {
        "schema": REPORT_SCHEMA,
        "schema_version": REPORT_SCHEMA_VERSION,
        "model": {"path": str(model), "config": c.to_json(), "parameters": c.num_parameters,
                  "seed": mf.meta["seed"] if isinstance(mf.meta.get("seed"), int) else None,
                  "batch_size": mf.batch_size, "seq_len": mf.seq_len,
                  "unpadded_rows": int(keep.sum()), "padded_rows": int((~keep).sum()),
                  "weight_dtype": mf.weight_dtype},
        "versions": versions(backend_info),
        "threads": threads,
        "engine_protocol": PROTOCOL_VERSION,
        "tolerance": tol.to_json(),
        "reference_cache": reference_cache,
        "decode_steps": opts.decode,
        "candidates": [c.report for c in candidates],
        "unchecked": unchecked(candidates),
        "verdict": {EXIT_PASS: "pass", EXIT_FAIL: "fail", EXIT_ENGINE: "error"}[exit_code],
        "exit_code": exit_code,
        "repro": repro_command(mf, model, opts) if exit_code != EXIT_PASS else None,
        "quantization": quantization,
    }


def unchecked(candidates: list[Candidate]) -> list[dict]:
    """Checks that were asked for but could not run on a candidate that did run: the verdict
    covers the checks that ran and the report names these. Decode on an engine that wrote no
    decode output; the compute dtype of an engine asked for a half dtype that neither took
    {dtype} nor wrote engine.json."""
    out = [{"candidate": c.name, "check": "decode", "reason": c.report["decode"]["reason"]}
           for c in candidates
           if c.report.get("decode", {}).get("status") == "not supported"]
    out += [{"candidate": c.name, "check": "dtype",
             "reason": f"asked to compute in {c.compute['asked']} (XVALID_DTYPE), but its "
                       f"command has no {{dtype}} and it wrote no {ENGINE_INFO_FILE}: what it "
                       f"computed in is unknown"}
            for c in candidates
            if not c.error and c.compute is not None and c.compute["actual"] is None]
    return out


# ---------------------------------------------------------------------------------------------
# the pipeline


@dataclass
class CompareResult:
    """What run_compare computed: the JSON-able report and, beside it, the arrays."""

    report: dict                     # schemas/compare-report.schema.json, with its exit_code
    arrays: dict[str, np.ndarray]    # logits by name: reference, reference-float64, candidates

    @property
    def exit_code(self) -> int:
        return self.report["exit_code"]


def prepare(model: Path, opts: CompareOptions, progress) -> tuple[ModelFile, list[ExternalEngine], float]:
    """Options and the model file checked before anything runs: (the file, the engines, the
    seconds spent parsing it)."""
    if opts.decode < 0:
        raise InputError("--decode must be >= 0")
    if opts.dtype not in COMPUTE_DTYPES:
        raise InputError(f"--dtype {opts.dtype!r}: choose from {', '.join(COMPUTE_DTYPES)}")
    # Names taken by the built-in candidates and by --save-logits' reference files.
    taken = {*BUILTIN_BACKENDS, "reference", "reference-float64"}
    engines = make_engines(opts.engines, taken, opts.engine_timeout, opts.engine_output)
    progress("reading the model file")
    start = time.perf_counter()
    mf = read_model(model)
    parse_s = time.perf_counter() - start
    if opts.decode and not opts.decode < mf.seq_len:
        raise InputError(f"--decode {opts.decode} needs at least one prefill token "
                         f"(the inputs have S = {mf.seq_len} tokens)")
    if not mf.attention_mask.astype(bool).any():
        raise InputError("every input position is padding: nothing to compare")
    return mf, engines, parse_s


def run_compare(model: Path, opts: CompareOptions, progress=lambda message: None) -> CompareResult:
    """Everything `xvalid compare` computes: prepare, reference, candidates, judge, time,
    report."""
    read_signature = refcache.stat_signature(model)  # before the file is read
    mf, engines, parse_s = prepare(model, opts, progress)
    step = reference_step(model, mf, opts, parse_s, progress, read_signature)
    ref, threads = step.ref, step.threads
    tol = derive_tolerance(ref, opts.atol, opts.rtol)

    request = EngineRequest(mf.seq_len, opts.decode, threads, opts.repeat, opts.warmup,
                            opts.intermediates, opts.dtype)
    candidates, backends = run_candidates(model, mf, opts, engines, step, request, progress)
    progress("computing metrics")
    judge(candidates, ref, tol, opts.decode, intermediate_names(mf.config.num_hidden_layers))
    time_candidates(candidates, backends, model, mf, threads, opts, request, progress)
    store_reference(step, candidates)
    # Every built-in candidate's info(); torch's from the cache when it did not run.
    backend_info = {c.name: backends[c.name].info() if c.name in backends else
                    step.torch_row.info for c in candidates if c.kind != "engine"}
    report = build_report(model, mf, opts, threads, tol, candidates, backend_info,
                          step.cache_report, quantization_report(mf, ref))
    arrays = {"reference": ref.logits, "reference-float64": ref.logits64,
              **{c.name: c.logits for c in candidates if c.logits is not None}}
    return CompareResult(report, arrays)
