"""What a bench run writes: the terminal table, bench.json (schema xvalid-bench v1),
bench.csv and bench.md, all from the same Rows; the table's text is made once (table_lines)
for the terminal and bench.md alike, so their numbers are the same."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..files import atomic_write
from ..report import report_json
from .profile import profile_table, profile_title
from .rows import (CSV_COLUMNS, TIMING_PROCESS, Row, csv_record, format_ms, format_rate,
                   format_times)
from .run import BenchResult

BENCH_SCHEMA = "xvalid-bench"
BENCH_SCHEMA_VERSION = 1

ROOF_DRIFT = 0.25  # roofs at the end this far from the start's: said in the notes
STATUS_TEXT = {"ok": "ok", "invalid": "INVALID", "error": "ERROR", "skipped": "skipped",
               "unsupported": "not supported"}
STATUS_STYLE = {"ok": "green", "invalid": "bold red", "error": "bold yellow", "skipped": "dim",
                "unsupported": "yellow"}


def bench_json(result: BenchResult) -> dict:
    return {
        "schema": BENCH_SCHEMA,
        "schema_version": BENCH_SCHEMA_VERSION,
        "partial": result.partial,
        "interrupted_at": result.interrupted_at,
        "exit_code": result.exit_code,
        "command": result.options.command,
        "started": result.started,
        "duration_s": result.duration_s,
        "machine": result.machine,
        "versions": result.versions,
        "settings": result.options.settings(),
        "models": result.models,
        "roofs": [result.roofs[t] for t in sorted(result.roofs)],
        "roofs_end": [result.roofs_end[t] for t in sorted(result.roofs_end)],
        "cells_total": result.cells_total,
        "rows": [row.to_json() for row in result.rows],
        "profile": result.profile,
    }


# ---------------------------------------------------------------------------------------------
# numbers as text


def _with_roof(value: float | None, share: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" + (f" ({100 * share:.0f}%)" if share is not None else "")


def _spread(row: Row, name: str, best: bool) -> str:
    """'12.3 ±4%': the median and the standard deviation as a share of it; '*' fastest."""
    stats = getattr(row, name)
    if stats is None:
        return "-"
    text = format_ms(stats.median)
    if stats.n > 1 and stats.median:
        text += f" ±{100 * stats.std / stats.median:.0f}%"
    return text + (" *" if best else "")


def _speedup(row: Row) -> str:
    s = row.speedup or {}
    return f"{format_times(s.get('prefill'))} / {format_times(s.get('decode'))}" if s else "-"


def _columns(result: BenchResult) -> dict[str, bool]:
    """Which identifying columns vary (one value: said in the header lines instead)."""
    rows = result.rows
    return {"model": len({r.model for r in rows}) > 1, "N": len({r.gen for r in rows}) > 1,
            "threads": len({r.threads for r in rows}) > 1,
            "weights": len({r.weight_dtype for r in rows}) > 1,
            "dtype": len({r.dtype for r in rows}) > 1}


def table_header(result: BenchResult) -> list[str]:
    shown = _columns(result)
    return (["model"] * shown["model"] + ["backend"] + ["weights"] * shown["weights"]
            + ["dtype"] * shown["dtype"] + ["B", "S"] + ["N"] * shown["N"]
            + ["threads"] * shown["threads"]
            + ["valid", "prefill\nms", "prefill\ntok/s", "prefill\nGFLOP/s", "1st decode\nms",
               "decode\nms/tok", "decode\ntok/s", "decode\nGB/s", "total\nms", "peak RSS\nMB",
               "vs torch\nP / D"])


def table_lines(result: BenchResult) -> list[tuple[Row, list[str]]]:
    """Every row as the table's cells (the terminal and bench.md). Times are medians with the
    standard deviation in percent; roof shares in brackets; '*' marks the fastest valid
    backend at a cell when more than one was timed. INVALID and failed rows have no numbers."""
    shown = _columns(result)
    timed: dict[tuple, int] = {}
    for row in result.rows:
        if row.rank:
            timed[row.cell_key] = timed.get(row.cell_key, 0) + 1
    lines = []
    for row in result.rows:
        best = (row.rank or {}) if timed.get(row.cell_key, 0) > 1 else {}
        ident = ([row.model] * shown["model"] + [row.backend] + [row.weight_dtype] * shown["weights"]
                 + [row.dtype] * shown["dtype"] + [str(row.batch), str(row.seq)]
                 + [str(row.gen)] * shown["N"] + [str(row.threads)] * shown["threads"]
                 + [STATUS_TEXT[row.status]])
        if row.status != "ok":
            lines.append((row, ident + ["-"] * (len(table_header(result)) - len(ident))))
            continue
        total = format_ms(row.median("total_ms"))
        if row.timing == TIMING_PROCESS:
            total += " (process)"
        lines.append((row, ident + [
            _spread(row, "prefill_ms", best.get("prefill") == 1), format_rate(row.prefill_tok_s),
            _with_roof(row.prefill_gflops, row.prefill_roof), format_ms(row.median("first_decode_ms")),
            _spread(row, "decode_ms_per_token", best.get("decode") == 1),
            format_rate(row.decode_tok_s), _with_roof(row.decode_gbs, row.decode_roof), total,
            f"{row.peak_rss_mb:.0f}" if row.peak_rss_mb is not None else "-",
            _speedup(row)]))
    return lines


def header_lines(result: BenchResult) -> list[str]:
    o, m = result.options, result.machine
    lines = []
    by_name: dict[str, list[dict]] = {}  # a model appears once per weight dtype
    for model in result.models:
        by_name.setdefault(model["name"], []).append(model)
    for name, variants in by_name.items():
        model, c = variants[0], variants[0]["config"]
        weights = ", ".join(f"{v.get('weight_dtype', 'float32')} {v['weight_bytes'] / 1e6:.1f} MB"
                            for v in variants)
        lines.append(f"model {name}: H={c['hidden_size']} L={c['num_hidden_layers']} "
                     f"NH={c['num_attention_heads']} KVH={c['num_key_value_heads']} "
                     f"I={c['intermediate_size']} V={c['vocab_size']}, "
                     f"{model['parameters'] / 1e6:.1f}M parameters"
                     + (f", seed {model['seed']}" if model.get("seed") is not None else "")
                     + f"; weights a decode step reads: {weights}")
    lines.append(f"grid {o.grid}: B {o.batch} x S {o.seq} x N {o.gen} decode steps at "
                 f"threads {o.threads}; per backend and cell: a validation run, {o.warmup} "
                 f"warmup, then at least {o.repeat} timed runs and {o.min_time:g} s")
    lines.append(f"weights stored as {', '.join(o.weight_dtypes)} (the reference computes with "
                 f"the values stored); compute dtype {', '.join(o.dtypes)}, each judged at its own "
                 f"budget")
    simd = " ".join(m["simd"]) or "no SIMD flags found"
    lines.append(f"machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {simd}; "
                 f"torch {result.versions.get('torch', '?')}")
    for threads in sorted(result.roofs):
        r = result.roofs[threads]
        lines.append(f"roofs at {threads} thread{'s' * (threads > 1)}: sgemm 2048^3 "
                     f"{r['sgemm_gflops']:.1f} GFLOP/s, copy 256 MiB {r['copy_gbs']:.1f} GB/s")
    return lines


def note_lines(result: BenchResult) -> list[str]:
    """Why rows are INVALID, ERROR, skipped or not supported (skips said once per reason);
    each weight dtype's speed against float32 weights; the partial mark."""
    lines, seen = [], set()
    for row in result.rows:
        where = f"B{row.batch} S{row.seq} N{row.gen} t{row.threads}"
        if row.status in ("invalid", "error"):
            lines.append(f"{row.label} {where}: {STATUS_TEXT[row.status]}: {row.reason}")
        elif row.status == "skipped" and (row.model, where) not in seen:
            seen.add((row.model, where))
            lines.append(f"{where}: skipped: {row.reason}")
        elif row.status == "unsupported" and (row.backend, row.dtype) not in seen:
            seen.add((row.backend, row.dtype))
            lines.append(f"{row.backend} at --dtype {row.dtype}: not supported ({row.reason})")

        if row.status == "ok" and row.validation and row.validation.get("decode") == "not supported":
            lines.append(f"{row.backend} {where}: decode not checked or timed (the engine wrote "
                         f"no decode logits)")
    lines += weight_dtype_lines(result)
    for threads, end in sorted(result.roofs_end.items()):
        start = result.roofs.get(threads)
        changed = [f"{name} {start[key]:.1f} at the start, {end[key]:.1f} at the end"
                   for name, key in (("sgemm GFLOP/s", "sgemm_gflops"), ("copy GB/s", "copy_gbs"))
                   if start and abs(end[key] / start[key] - 1) > ROOF_DRIFT]
        if changed:
            lines.append(f"the machine's speed changed during the run at {threads} "
                         f"thread{'s' * (threads > 1)} ({'; '.join(changed)}): other work on it? "
                         f"Roof shares use the start's")
    if any(row.rank for row in result.rows):
        lines.append("'*' marks the fastest valid backend at a cell; INVALID backends are never timed "
                     "or ranked")
    if result.partial:
        done = len({(r.model, r.cell_key) for r in result.rows})
        lines.append(f"PARTIAL: interrupted during {result.interrupted_at}; {done} of "
                     f"{result.cells_total} cells measured")
    return lines


def weight_dtype_lines(result: BenchResult) -> list[str]:
    """Per backend that reads the stored weights (not torch, which computes on their float32
    values) and per weight dtype: its decode speed against the same backend with float32
    weights, cell by cell."""
    by_label: dict[tuple, list[Row]] = {}
    for row in result.rows:
        if row.kind == "backend" and row.backend == "torch":
            continue
        if row.vs_float32_weights and row.vs_float32_weights.get("decode"):
            by_label.setdefault((row.model, row.label, row.weight_dtype), []).append(row)
    lines = []
    for (model, label, weight_dtype), rows in by_label.items():
        cells = ", ".join(f"{format_times(r.vs_float32_weights['decode'])} at B{r.batch} S{r.seq} "
                          f"t{r.threads}" for r in rows)
        megabytes = rows[0].weight_bytes_per_token / 1e6
        lines.append(f"{label}: decode tokens/s with {weight_dtype} weights ({megabytes:.1f} MB a "
                     f"step) over float32 weights: {cells}" + (f" ({model})" if len(
                         {m["name"] for m in result.models}) > 1 else ""))
    return lines


def print_bench(result: BenchResult, out: Console) -> None:
    for line in header_lines(result):
        out.print(line, markup=False)
    header = table_header(result)
    table = Table(title_justify="left", box=box.SIMPLE_HEAD, title="validated before timed: "
                  "prefill logits and every decode step against the torch float32 reference "
                  "(median ±std; roof shares in brackets)")
    for column in header:
        left = column in ("model", "backend", "valid")
        table.add_column(column, justify="left" if left else "right", no_wrap=left)
    valid_at = header.index("valid")
    lines = table_lines(result)
    for i, (row, cells) in enumerate(lines):
        cells = [escape(c) for c in cells]
        cells[valid_at] = f"[{STATUS_STYLE[row.status]}]{cells[valid_at]}[/]"
        last_of_cell = i + 1 == len(lines) or lines[i + 1][0].cell_key != row.cell_key
        table.add_row(*cells, end_section=last_of_cell and len(lines) > 1)
    out.print(table)
    for line in note_lines(result):
        out.print(line, markup=False, style="bold red" if line.startswith("PARTIAL") else None)
    if result.profile:
        print_profile(result.profile, out)


def print_profile(profile: dict, out: Console) -> None:
    header, lines = profile_table(profile)
    table = Table(title=profile_title(profile), title_justify="left")
    for column in header:
        table.add_column(column, justify="left" if column == "op" else "right")
    for line in lines:
        table.add_row(*line)
    out.print(table)


# ---------------------------------------------------------------------------------------------
# files


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def bench_csv(result: BenchResult) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in result.rows:
        record = csv_record(row)
        writer.writerow([_csv_value(record[column]) for column in CSV_COLUMNS])
    return buffer.getvalue()


def _md_table(header: list[str], lines: list[list[str]]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(c) for c in line) + " |" for line in lines]
    return out


def bench_md(result: BenchResult) -> str:
    lines = ["## xvalid bench" + (" (PARTIAL)" if result.partial else ""), ""]
    lines += [f"- {line}" for line in header_lines(result)]
    header = [column.replace("\n", " ") for column in table_header(result)]
    lines += ["", *_md_table(header, [c for _, c in table_lines(result)]), ""]
    notes = note_lines(result)
    if notes:
        lines += [f"- {line}" for line in notes] + [""]
    if result.profile:
        header, rows = profile_table(result.profile)
        lines += [f"{profile_title(result.profile)}:", "", *_md_table(header, rows), ""]
    lines.append(f"`{result.options.command}`" if result.options.command else "")
    return "\n".join(lines).rstrip() + "\n"


def write_outputs(result: BenchResult, out: Path) -> list[Path]:
    """bench.json, bench.csv, bench.md and the plots into `out` (created), each atomically."""
    from ..errors import XValidError
    from .plots import write_plots

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise XValidError(f"{out}: cannot create directory ({exc.strerror})") from None
    written = []
    for name, text in (("bench.json", report_json(bench_json(result))),
                       ("bench.csv", bench_csv(result)), ("bench.md", bench_md(result))):
        atomic_write(out / name, lambda fp, text=text: fp.write(text))
        written.append(out / name)
    written += write_plots(result, out)
    return written
