"""The regression gate: `xvalid bench --compare OLD.json NEW.json [--threshold PCT]`.

Rows are matched by (model, backend, batch, seq, gen, threads). For each metric (prefill,
decode per token, total) both files measured, the speedup is old median / new median. A
metric is SLOWER, and fails the gate (exit 1), when the new median exceeds the old one by
more than the threshold (percent) AND by more than the samples' own spread: twice the
combined standard deviation, 2 * sqrt(old std^2 + new std^2). A row that was valid and is now
INVALID or failed fails the gate too. Differences in model, machine and thread counts
between the files are said plainly before the table.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EXIT_FAIL, EXIT_PASS, InputError
from .rows import Row

METRICS = (("prefill", "prefill_ms"), ("decode/token", "decode_ms_per_token"),
           ("total", "total_ms"))
SPREAD_SIGMAS = 2.0


def load_bench(path: Path) -> dict:
    """A bench.json, checked enough to compare: InputError (one line) for anything else."""
    from .output import BENCH_SCHEMA, BENCH_SCHEMA_VERSION

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: unreadable ({exc})") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg}: line {exc.lineno}, column "
                         f"{exc.colno})") from None
    if not isinstance(doc, dict) or doc.get("schema") != BENCH_SCHEMA:
        raise InputError(f"{path}: not an xvalid bench file (schema {BENCH_SCHEMA!r} expected)")
    if doc.get("schema_version") != BENCH_SCHEMA_VERSION:
        raise InputError(f"{path}: bench schema version {doc.get('schema_version')!r}, this "
                         f"xvalid reads version {BENCH_SCHEMA_VERSION}")
    try:
        doc["_rows"] = [Row.from_json(row) for row in doc["rows"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: a row is malformed ({type(exc).__name__}: {exc})") from None
    return doc


@dataclass
class Change:
    row: Row            # the new row (the old one for a row that went missing)
    metric: str         # METRICS label, or "valid"
    old: float | None   # median ms
    new: float | None
    spread: float | None   # SPREAD_SIGMAS x the combined standard deviation, ms
    verdict: str        # "SLOWER", "faster", "same", "now INVALID", "now valid"

    @property
    def speedup(self) -> float | None:
        return self.old / self.new if self.old and self.new else None


@dataclass
class GateResult:
    changes: list[Change] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)   # said before the table
    notes: list[str] = field(default_factory=list)        # rows only in one file, partial runs
    threshold: float = 5.0

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.verdict in ("SLOWER", "now INVALID")]

    @property
    def exit_code(self) -> int:
        return EXIT_FAIL if self.regressions else EXIT_PASS


def judge_metric(old, new, threshold_pct: float) -> tuple[str, float]:
    """(verdict, spread) of one metric's Stats: SLOWER / faster beyond both the threshold and
    the spread, else same."""
    spread = SPREAD_SIGMAS * math.sqrt(old.std ** 2 + new.std ** 2)
    delta = new.median - old.median
    if delta > old.median * threshold_pct / 100 and delta > spread:
        return "SLOWER", spread
    if -delta > old.median * threshold_pct / 100 and -delta > spread:
        return "faster", spread
    return "same", spread


def _model_mismatches(old: dict, new: dict) -> tuple[list[str], set[str]]:
    """Lines about models that differ between the files, and the names not comparable."""
    lines, differ = [], set()
    old_models = {m["name"]: m for m in old.get("models", [])}
    new_models = {m["name"]: m for m in new.get("models", [])}
    for name in old_models.keys() & new_models.keys():
        a, b = old_models[name], new_models[name]
        fields_ = [k for k in sorted(set(a["config"]) | set(b["config"]))
                   if a["config"].get(k) != b["config"].get(k)]
        if a.get("seed") != b.get("seed"):
            fields_.append("seed")
        if fields_:
            differ.add(name)
            shown = ", ".join(f"{k} {a['config'].get(k, a.get(k))} -> {b['config'].get(k, b.get(k))}"
                              for k in fields_[:4])
            lines.append(f"model mismatch: {name} is not the same model in both files ({shown}); "
                         f"its rows are not compared")
    only_old, only_new = sorted(old_models.keys() - new_models.keys()), \
        sorted(new_models.keys() - old_models.keys())
    if only_old or only_new:
        lines.append(f"model mismatch: OLD ran {', '.join(old_models) or 'nothing'}, NEW ran "
                     f"{', '.join(new_models) or 'nothing'}")
    return lines, differ


def _machine_mismatch(old: dict, new: dict) -> list[str]:
    a, b = old.get("machine", {}), new.get("machine", {})
    keys = [k for k in ("cpu", "cores", "usable_cores", "simd", "memory_gib") if a.get(k) != b.get(k)]
    if not keys:
        return []
    shown = "; ".join(f"{k}: {a.get(k)} -> {b.get(k)}" for k in keys)
    return [f"machine mismatch: the files come from different machines ({shown}); times may "
            f"differ for that reason alone"]


def _thread_mismatch(old: dict, new: dict) -> list[str]:
    a = sorted({r.threads for r in old["_rows"]})
    b = sorted({r.threads for r in new["_rows"]})
    if a == b:
        return []
    return [f"thread mismatch: OLD ran at threads {a}, NEW at {b}; only rows at the same thread "
            f"count are compared"]


def compare_runs(old: dict, new: dict, threshold_pct: float = 5.0) -> GateResult:
    result = GateResult(threshold=threshold_pct)
    model_lines, differ = _model_mismatches(old, new)
    result.mismatches = _machine_mismatch(old, new) + model_lines + _thread_mismatch(old, new)
    for label, doc in (("OLD", old), ("NEW", new)):
        if doc.get("partial"):
            result.notes.append(f"{label} is a partial run (interrupted during "
                                f"{doc.get('interrupted_at')}): it has fewer rows")
    old_rows = {r.key: r for r in old["_rows"] if r.model not in differ}
    new_rows = {r.key: r for r in new["_rows"] if r.model not in differ}
    common = [key for key in new_rows if key in old_rows]
    if not common:
        raise InputError("nothing to compare: no row (model, backend, weight dtype, dtype, batch, "
                         "seq, gen, threads) is in both files")
    for key in common:
        a, b = old_rows[key], new_rows[key]
        if a.status == "ok" and b.status in ("invalid", "error"):
            result.changes.append(Change(b, "valid", None, None, None, "now INVALID"))
            continue
        if a.status in ("invalid", "error") and b.status == "ok":
            result.changes.append(Change(b, "valid", None, None, None, "now valid"))
            continue
        if a.status != "ok" or b.status != "ok" or a.timing != b.timing:
            continue
        for label, name in METRICS:
            sa, sb = getattr(a, name), getattr(b, name)
            if sa is None or sb is None:
                continue
            verdict, spread = judge_metric(sa, sb, threshold_pct)
            result.changes.append(Change(b, label, sa.median, sb.median, spread, verdict))
    missing = [key for key in old_rows if key not in new_rows]
    added = [key for key in new_rows if key not in old_rows]
    if missing:
        result.notes.append(f"{len(missing)} row(s) only in OLD (not compared), e.g. "
                            f"{_key_text(missing[0])}")
    if added:
        result.notes.append(f"{len(added)} row(s) only in NEW (not compared), e.g. "
                            f"{_key_text(added[0])}")
    return result


def _key_text(key: tuple) -> str:
    model, backend, batch, seq, gen, threads, weight_dtype, dtype = key
    dtypes = "".join(f" {d}" for d in (weight_dtype, dtype) if d != "float32")
    return f"{model} {backend}{dtypes} B{batch} S{seq} N{gen} t{threads}"


def print_gate(result: GateResult, old_path: Path, new_path: Path, out) -> None:
    from rich.table import Table

    for line in result.mismatches:
        out.print(f"[bold yellow]{line}[/]", markup=True, highlight=False)
    for line in result.notes:
        out.print(line, markup=False)
    table = Table(title=f"{old_path} -> {new_path} (speedup = old / new; threshold "
                  f"{result.threshold:g}% and {SPREAD_SIGMAS:g} x the combined std)",
                  title_justify="left")
    for column in ("model", "backend", "B", "S", "N", "threads", "metric", "old ms", "new ms",
                   "speedup", "change", "spread ms", "verdict"):
        table.add_column(column, justify="left" if column in ("model", "backend", "metric",
                                                              "verdict") else "right")
    style = {"SLOWER": "bold red", "now INVALID": "bold red", "faster": "green",
             "now valid": "green", "same": ""}
    for c in result.changes:
        r = c.row
        change = f"{100 * (c.new / c.old - 1):+.1f}%" if c.old and c.new else "-"
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        verdict = f"[{style[c.verdict]}]{c.verdict}[/]" if style[c.verdict] else c.verdict
        table.add_row(r.model, r.label, str(r.batch), str(r.seq), str(r.gen), str(r.threads),
                      c.metric, fmt(c.old), fmt(c.new),
                      f"{c.speedup:.2f}x" if c.speedup else "-", change, fmt(c.spread), verdict)
    out.print(table)
    bad = result.regressions
    if bad:
        out.print(f"gate: [bold red]FAIL[/]: {len(bad)} of {len(result.changes)} compared "
                  f"metrics got slower beyond {result.threshold:g}% and their spread, or "
                  f"became INVALID")
    else:
        out.print(f"gate: [bold green]PASS[/]: no metric of {len(result.changes)} got slower "
                  f"beyond {result.threshold:g}% and its spread")
