"""The one row type: one backend at one cell of one model. The terminal table, bench.json,
bench.csv, bench.md, the plots and the regression gate all read Rows.

Times are milliseconds. Every timed quantity is a Stats over the samples (one sample per
timed run of prefill + N decode steps); tables and the CSV quote medians.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field, fields

# Row statuses: ok (validated, timed), invalid (failed validation: never timed, ranked or in
# speedups), error (an engine could not run), skipped (the cell cannot fit), unsupported (the
# backend cannot compute in the cell's compute dtype: the C++ kernels compute in float32 only).
STATUSES = ("ok", "invalid", "error", "skipped", "unsupported")
TIMED = ("prefill_ms", "first_decode_ms", "decode_ms_per_token", "total_ms")

# How a row was timed.
TIMING_IN_PROCESS = "in-process"   # our clock around the backend's prefill and each step
TIMING_ENGINE = "engine"           # the engine's timing.json (prefill_ms, decode_ms)
TIMING_PROCESS = "process"         # an engine that reports nothing: whole runs, load included


@dataclass
class Stats:
    """Summary of samples (ms): mean, median, standard deviation (sample, 0 for one sample),
    90th percentile (linear interpolation), min, max, count, and the samples themselves."""

    mean: float
    median: float
    std: float
    p90: float
    min: float
    max: float
    n: int
    samples: list[float]

    @classmethod
    def of(cls, samples: list[float]) -> "Stats":
        if not samples:
            raise ValueError("Stats of no samples")
        ordered = sorted(samples)
        rank = 0.9 * (len(ordered) - 1)
        low = math.floor(rank)
        high = min(low + 1, len(ordered) - 1)
        p90 = ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
        std = statistics.stdev(samples) if len(samples) > 1 else 0.0
        return cls(statistics.fmean(samples), statistics.median(samples), std, p90,
                   ordered[0], ordered[-1], len(samples), list(samples))

    @classmethod
    def from_json(cls, obj: dict | None) -> "Stats | None":
        return None if obj is None else cls(**{f.name: obj[f.name] for f in fields(cls)})


@dataclass
class Row:
    model: str
    backend: str
    kind: str        # "backend" (in-process) or "engine"
    batch: int
    seq: int
    gen: int
    threads: int
    status: str      # STATUSES
    weight_dtype: str = "float32"  # how the model file stores the weights (float16, int8, ...)
    dtype: str = "float32"         # the compute dtype the cell asks for
    weight_bytes_per_token: float | None = None  # weight bytes one decode step reads, as this
                                                 # backend holds the weights
    reason: str | None = None          # why invalid, error or skipped
    timing: str | None = None          # TIMING_*
    prefill_ms: Stats | None = None    # time to first token: the prefill of B x S tokens
    first_decode_ms: Stats | None = None      # the first decode step, reported apart
    decode_ms_per_token: Stats | None = None  # steady state: mean of steps 2..N per run
    total_ms: Stats | None = None      # prefill + every decode step
    prefill_gflops: float | None = None
    prefill_roof: float | None = None  # share of the compute roof, 0..1
    decode_gbs: float | None = None    # weight bytes streamed per step / median step time
    decode_roof: float | None = None   # share of the bandwidth roof, 0..1
    peak_rss_mb: float | None = None   # peak resident memory while this backend ran the cell
    rss_growth_mb: float | None = None  # of which above the resident memory before the run
    validation: dict | None = None     # max_abs, budget_used, atol, decode, first_failing_step
    speedup: dict | None = None        # over torch at the same cell: prefill, decode, total
    # over the same backend at the same cell with float32 weights: prefill, decode
    vs_float32_weights: dict | None = None
    rank: dict | None = None           # 1 = fastest valid row of the cell: prefill, decode
    extra: dict = field(default_factory=dict)  # notes: e.g. engine peak memory unknown

    @property
    def key(self) -> tuple:
        """What identifies a row across runs (the regression gate matches on it)."""
        return (self.model, self.backend, self.batch, self.seq, self.gen, self.threads,
                self.weight_dtype, self.dtype)

    @property
    def cell_key(self) -> tuple:
        return (self.model, self.batch, self.seq, self.gen, self.threads, self.weight_dtype,
                self.dtype)

    @property
    def label(self) -> str:
        """The backend with what differs from float32: 'cpp', 'cpp int8', 'torch bfloat16'."""
        return " ".join([self.backend] + [d for d in (self.weight_dtype, self.dtype) if d != "float32"])

    @property
    def valid(self) -> bool | None:
        return None if self.status in ("skipped", "unsupported") else self.status == "ok"

    def median(self, name: str) -> float | None:
        stats = getattr(self, name)
        return None if stats is None else stats.median

    @property
    def prefill_tok_s(self) -> float | None:
        """Prompt tokens processed per second: B x S / median prefill time."""
        ms = self.median("prefill_ms")
        return self.batch * self.seq / ms * 1e3 if ms else None

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens generated per second in the steady state: B per step / median step time."""
        ms = self.median("decode_ms_per_token")
        return self.batch / ms * 1e3 if ms else None

    def to_json(self) -> dict:
        out = asdict(self)
        out["valid"] = self.valid
        out["prefill_tok_s"], out["decode_tok_s"] = self.prefill_tok_s, self.decode_tok_s
        return out

    @classmethod
    def from_json(cls, obj: dict) -> "Row":
        """A row of bench.json (derived keys such as valid and prefill_tok_s are recomputed)."""
        names = {f.name for f in fields(cls)}
        values = {key: value for key, value in obj.items() if key in names}
        for name in TIMED:
            values[name] = Stats.from_json(obj.get(name))
        return cls(**values)


# bench.csv: the first twelve columns are a contract (docs/bench.md); more follow.
CSV_COLUMNS = ("backend", "batch", "seq", "gen", "threads", "valid", "prefill_ms",
               "decode_ms_per_token", "total_ms", "prefill_tok_s", "decode_tok_s", "peak_rss_mb",
               "model", "status", "timing", "first_decode_ms", "prefill_ms_std",
               "decode_ms_per_token_std", "total_ms_std", "prefill_ms_p90",
               "decode_ms_per_token_p90", "samples", "prefill_gflops", "prefill_roof_pct",
               "decode_gbs", "decode_roof_pct", "speedup_prefill", "speedup_decode",
               "speedup_total", "rss_growth_mb", "reason", "weight_dtype", "dtype",
               "weight_bytes_per_token", "decode_vs_float32_weights")


# Numbers as the table, bench.md and the plots print them (one place, so they agree).


def format_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.1f}"


def format_rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def format_times(value: float | None) -> str:
    """A speedup: '1.71x', '10.6x'."""
    if not value:
        return "-"
    return f"{value:.2f}x" if value < 10 else f"{value:.1f}x"


def csv_record(row: Row) -> dict:
    """One bench.csv line: medians, standard deviations and p90s; empty where not measured."""
    def pct(share):
        return None if share is None else 100 * share

    def stat(name, key):
        stats = getattr(row, name)
        return None if stats is None else getattr(stats, key)

    speedup = row.speedup or {}
    samples = row.total_ms.n if row.total_ms else None
    return {"backend": row.backend, "batch": row.batch, "seq": row.seq, "gen": row.gen,
            "threads": row.threads, "valid": row.valid, "prefill_ms": row.median("prefill_ms"),
            "decode_ms_per_token": row.median("decode_ms_per_token"),
            "total_ms": row.median("total_ms"), "prefill_tok_s": row.prefill_tok_s,
            "decode_tok_s": row.decode_tok_s, "peak_rss_mb": row.peak_rss_mb,
            "model": row.model, "status": row.status, "timing": row.timing,
            "first_decode_ms": row.median("first_decode_ms"),
            "prefill_ms_std": stat("prefill_ms", "std"),
            "decode_ms_per_token_std": stat("decode_ms_per_token", "std"),
            "total_ms_std": stat("total_ms", "std"),
            "prefill_ms_p90": stat("prefill_ms", "p90"),
            "decode_ms_per_token_p90": stat("decode_ms_per_token", "p90"),
            "samples": samples, "prefill_gflops": row.prefill_gflops,
            "prefill_roof_pct": pct(row.prefill_roof), "decode_gbs": row.decode_gbs,
            "decode_roof_pct": pct(row.decode_roof), "speedup_prefill": speedup.get("prefill"),
            "speedup_decode": speedup.get("decode"), "speedup_total": speedup.get("total"),
            "rss_growth_mb": row.rss_growth_mb, "reason": row.reason,
            "weight_dtype": row.weight_dtype, "dtype": row.dtype,
            "weight_bytes_per_token": row.weight_bytes_per_token,
            "decode_vs_float32_weights": (row.vs_float32_weights or {}).get("decode")}


def rank_and_compare(rows: list[Row]) -> None:
    """Speedups over torch and ranks within each cell, over valid rows only: an INVALID or
    failed backend is never ranked and never in a speedup, however fast it was."""
    by_cell: dict[tuple, list[Row]] = {}
    for row in rows:
        row.speedup = row.rank = row.vs_float32_weights = None
        if row.status == "ok":
            by_cell.setdefault(row.cell_key, []).append(row)
    # each weight dtype against float32 weights: the same backend, cell and compute dtype
    float32_rows = {row.key[:6] + (row.dtype,): row for row in rows
                    if row.status == "ok" and row.weight_dtype == "float32" and row.timing != TIMING_PROCESS}
    for row in rows:
        base = float32_rows.get(row.key[:6] + (row.dtype,))
        if row.status == "ok" and row.weight_dtype != "float32" and base is not None and row.timing == base.timing:
            row.vs_float32_weights = {label: (base.median(name) / row.median(name)
                                              if base.median(name) and row.median(name) else None)
                                      for label, name in (("prefill", "prefill_ms"),
                                                          ("decode", "decode_ms_per_token"))}
    metrics = {"prefill": "prefill_ms", "decode": "decode_ms_per_token", "total": "total_ms"}
    for cell_rows in by_cell.values():
        # A process timing (load included) is not comparable with a forward's time.
        comparable = [r for r in cell_rows if r.timing != TIMING_PROCESS]
        torch_row = next((r for r in comparable if r.backend == "torch"), None)
        for row in comparable:
            if torch_row is not None and row is not torch_row:
                row.speedup = {label: (torch_row.median(name) / row.median(name)
                                       if torch_row.median(name) and row.median(name) else None)
                               for label, name in metrics.items()}
            row.rank = {}
        for label in ("prefill", "decode"):
            timed = sorted((r for r in comparable if r.median(metrics[label])),
                           key=lambda r: r.median(metrics[label]))
            for place, row in enumerate(timed, 1):
                row.rank[label] = place
