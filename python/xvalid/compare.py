"""`xvalid compare`: candidates against the PyTorch reference.

Reference: torch float32; torch float64 measures the float32 reference's own rounding noise,
from which the default tolerance is derived (metrics.POLICIES). For each candidate (built-in
backends and external engines) the report holds: logit metrics on unpadded rows, a verdict,
the first divergent intermediate when intermediates exist, decode drift (--decode N) and
timing at one thread count. The report is a plain JSON-able dict (schema:
schemas/compare-report.schema.json); report.py renders it.
"""

from __future__ import annotations

import platform
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .backends import Backend, BackendSpec, TorchBackend, get_spec, load_core
from .engines import ExternalEngine, read_intermediates, read_logits_file
from .errors import EXIT_ENGINE, EXIT_FAIL, EXIT_PASS, EngineError, InputError
from .metrics import POLICIES, logit_metrics, tensor_error, within
from .modelfile import ModelFile, read_model
from .reference import intermediate_names
from .timing import time_call

REPORT_SCHEMA = "xvalid-compare-report"
REPORT_SCHEMA_VERSION = 1


@dataclass
class CompareOptions:
    backends: tuple[str, ...] = ("torch", "cpp")
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
    argv: list[str] = field(default_factory=list)  # the compare flags, for the repro line


@dataclass
class Candidate:
    name: str
    kind: str  # "reference", "backend" or "engine"
    logits: np.ndarray | None = None
    intermediates: dict | None = None
    error: str | None = None  # the engine failed to produce output
    report: dict = field(default_factory=dict)


def split_name(name: str) -> tuple[int | None, str]:
    """'layer3.attn_out' -> (3, 'attn_out'); 'logits' -> (None, 'logits')."""
    if name.startswith("layer") and "." in name:
        layer, point = name.split(".", 1)
        return int(layer[5:]), point
    return None, name


def intermediate_budgets(ref32: dict, ref64: dict, keep: np.ndarray, policy) -> dict:
    """Per intermediate, once per run: (max |reference|, float32-vs-float64 noise, budget)."""
    budgets = {}
    for name, ref in ref32.items():
        noise, scale = tensor_error(ref64[name], ref, keep)  # scale: max |float32 reference|
        budgets[name] = (scale, noise, policy.atol(noise, scale))
    return budgets


def divergence(cand: dict, ref32: dict, budgets: dict, keep: np.ndarray, names: list[str]) -> dict:
    """Per intermediate: error vs the float32 reference and its budget; the first over budget."""
    points, first = [], None
    for name in names:
        if name not in cand or name not in ref32:
            continue
        layer, point = split_name(name)
        error, _ = tensor_error(cand[name], ref32[name], keep)
        scale, noise, budget = budgets[name]
        row = {"name": name, "layer": layer, "point": point, "error": error, "scale": scale,
               "noise": noise, "budget": budget, "diverged": bool(not error <= budget)}
        points.append(row)
        if row["diverged"] and first is None:
            first = row
    return {"points": points, "first": first}


def decode_drift(backend, mf: ModelFile, reference_logits: np.ndarray, steps: int,
                 atol: float, rtol: float) -> dict:
    """Prefill S-steps tokens, then one token a step with the KV cache; each step's logits
    against the reference's full forward at that position (unpadded rows)."""
    S = mf.seq_len
    decoded = backend.decode(mf.input_ids, mf.attention_mask, S - steps)  # (B, steps, V)
    rows = []
    for i in range(steps):
        position = S - steps + i
        keep = mf.attention_mask[:, position].astype(bool)
        if not keep.any():
            rows.append({"step": i + 1, "position": position, "max_abs": None, "pass": True})
            continue
        cand, ref = decoded[keep, i].astype(np.float64), reference_logits[keep, position]
        diff = np.abs(cand - ref)
        diff[~np.isfinite(cand)] = np.inf
        rows.append({"step": i + 1, "position": position, "max_abs": float(diff.max()),
                     "pass": bool(within(diff, ref, atol, rtol).all())})
    return {"prefill": S - steps, "steps": rows, "pass": all(r["pass"] for r in rows)}


def _versions(backend_info: dict[str, dict]) -> dict:
    """Versions of everything that ran; `backends` has each built-in candidate's info()."""
    import torch
    out = {"xvalid": __version__, "python": platform.python_version(), "numpy": np.__version__,
           "torch": torch.__version__, "machine": platform.machine(), "platform": platform.platform()}
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


def run_backend(spec: BackendSpec, model: Path, mf: ModelFile, threads: int,
                capture: bool) -> tuple[Candidate, Backend]:
    """Load a registered backend (timed apart from the forward) and run the file's inputs."""
    if spec.uses_core:
        load_core()  # import (and in an editable install, rebuild) before the clock starts
    start = time.perf_counter()
    backend = spec.create(model, mf)
    load_ms = (time.perf_counter() - start) * 1e3
    backend.set_threads(threads)
    logits, inter = backend.forward(mf.input_ids, mf.attention_mask, capture=capture)
    cand = Candidate(spec.name, "backend", logits, inter)
    cand.report["load_ms"] = load_ms
    return cand, backend


def run_engine(engine: ExternalEngine, model: Path, shape: tuple[int, ...],
               shapes: dict[str, tuple[int, ...]] | None) -> Candidate:
    """One external engine in a fresh output directory; its failure is the candidate's error."""
    cand = Candidate(engine.name, "engine")
    cand.report["command"] = engine.template
    with tempfile.TemporaryDirectory(prefix="xvalid-engine-") as tmp:
        out = Path(tmp)
        try:
            cand.report["process_ms"] = engine.run(model.resolve(), out) * 1e3
            cand.logits = read_logits_file(engine.logits_path(out), shape)
            if shapes:
                cand.intermediates = read_intermediates(out / "intermediates", shapes) or None
        except EngineError as exc:
            cand.error = str(exc)
    return cand


def time_forward(backend, mf: ModelFile, threads: int, opts: CompareOptions) -> dict:
    """Median/min/max of the forward alone (no capture), after warmup, at `threads`."""
    backend.set_threads(threads)
    return time_call(lambda: backend.forward(mf.input_ids, mf.attention_mask), opts.warmup,
                     opts.repeat).to_json()


def run_compare(model: Path, opts: CompareOptions, progress=lambda message: None) -> dict:
    """Everything `xvalid compare` computes, as a JSON-able report with an `exit_code`."""
    import torch

    if opts.decode < 0:
        raise InputError("--decode must be >= 0")
    engines = [ExternalEngine(template, index, opts.engine_timeout, opts.engine_output)
               for index, template in enumerate(opts.engines, start=1)]
    progress("reading the model file")
    start = time.perf_counter()
    mf = read_model(model)
    parse_s = time.perf_counter() - start
    if opts.decode and not opts.decode < mf.seq_len:
        raise InputError(f"--decode {opts.decode} needs at least one prefill token "
                         f"(the inputs have S = {mf.seq_len} tokens)")
    keep = mf.attention_mask.astype(bool)
    if not keep.any():
        raise InputError("every input position is padding: nothing to compare")
    threads = opts.threads or torch.get_num_threads()
    torch.set_num_threads(threads)

    progress("running the reference (float32 and float64)")
    start = time.perf_counter()
    ref32 = TorchBackend(mf, "float32")
    torch_load_s = parse_s + time.perf_counter() - start
    ref64 = TorchBackend(mf, "float64")
    # Intermediates only when asked for: for a large model they are hundreds of MB each.
    logits32, inter32 = ref32.forward(mf.input_ids, mf.attention_mask, capture=opts.intermediates)
    logits64, inter64 = ref64.forward(mf.input_ids, mf.attention_mask, capture=opts.intermediates)
    noise = float(np.abs(logits32[keep] - logits64[keep]).max())
    ref_absmax = float(np.abs(logits32[keep]).max())
    policy = POLICIES["float32"]
    atol = opts.atol if opts.atol is not None else policy.atol(noise, ref_absmax)
    rtol = opts.rtol if opts.rtol is not None else policy.rtol
    names = intermediate_names(mf.config.num_hidden_layers)

    candidates: list[Candidate] = []
    backends: dict[str, Backend] = {}
    for name in opts.backends:
        spec = get_spec(name)
        if spec.reference:
            cand = Candidate(name, "reference", logits32, inter32)
            cand.report["load_ms"] = torch_load_s * 1e3
            backends[name] = ref32
        else:
            progress(f"running {name}")
            cand, backends[name] = run_backend(spec, model, mf, threads, opts.intermediates)
        candidates.append(cand)
    for engine in engines:
        progress(f"running {engine.name}")
        shapes = {name: inter32[name].shape for name in names} if opts.intermediates else None
        candidates.append(run_engine(engine, model, logits32.shape, shapes))

    progress("computing metrics")
    budgets = intermediate_budgets(inter32, inter64, keep, policy) if opts.intermediates else {}
    for cand in candidates:
        r = cand.report
        r.update(name=cand.name, kind=cand.kind)
        if cand.error:
            r.update(status="error", error=cand.error)
            continue
        # The reference row is measured against float64: its own noise, a sanity check.
        against = logits64 if cand.kind == "reference" else logits32
        r["metrics"] = logit_metrics(cand.logits, against, keep, atol, rtol, 2 * atol)
        if cand.intermediates and cand.kind != "reference":
            r["divergence"] = divergence(cand.intermediates, inter32, budgets, keep, names)
        r["status"] = "pass" if r["metrics"]["pass"] else "fail"

    if opts.decode:
        for cand in candidates:
            if cand.name in backends:
                progress(f"decode drift: {cand.name}")
                drift = decode_drift(backends[cand.name], mf, logits32, opts.decode, atol, rtol)
                cand.report["decode"] = drift
                if not drift["pass"]:
                    cand.report["status"] = "fail"

    for cand in candidates:
        if cand.name in backends:
            progress(f"timing {cand.name}")
            cand.report["timing"] = time_forward(backends[cand.name], mf, threads, opts)
    torch_ms = next((c.report["timing"]["median_ms"] for c in candidates
                     if c.name == "torch" and "timing" in c.report), None)
    for cand in candidates:
        if torch_ms and "timing" in cand.report:
            cand.report["timing"]["ratio_to_torch"] = cand.report["timing"]["median_ms"] / torch_ms

    statuses = [c.report["status"] for c in candidates]
    exit_code = (EXIT_ENGINE if "error" in statuses else EXIT_FAIL if "fail" in statuses
                 else EXIT_PASS)
    c = mf.config
    return {
        "schema": REPORT_SCHEMA,
        "schema_version": REPORT_SCHEMA_VERSION,
        "model": {"path": str(model), "config": c.to_json(), "parameters": c.num_parameters,
                  "seed": mf.meta["seed"] if isinstance(mf.meta.get("seed"), int) else None,
                  "batch_size": mf.batch_size, "seq_len": mf.seq_len,
                  "unpadded_rows": int(keep.sum()), "padded_rows": int((~keep).sum())},
        "versions": _versions({name: b.info() for name, b in backends.items()}),
        "threads": threads,
        "tolerance": {"dtype": policy.dtype, "atol": atol, "rtol": rtol,
                      "atol_source": "--atol" if opts.atol is not None else
                      f"max({policy.noise_factor:g} x reference noise, "
                      f"{policy.atol_floor:g} x max(1, max|logits|))",
                      "reference_noise": noise, "reference_absmax": ref_absmax},
        "candidates": [c.report for c in candidates],
        "verdict": {EXIT_PASS: "pass", EXIT_FAIL: "fail", EXIT_ENGINE: "error"}[exit_code],
        "exit_code": exit_code,
        "repro": repro_command(mf, model, opts) if exit_code != EXIT_PASS else None,
        "_arrays": {"reference": logits32, "reference-float64": logits64,
                    **{c.name: c.logits for c in candidates if c.logits is not None}},
    }

