"""Human-readable output (rich tables on stdout)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from .modelfile import ModelFile, named_tensors, tensor_checksum

# Not a terminal (CI logs, pipes): wide enough that the comparison tables do not fold.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 180)


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024


def config_line(mf: ModelFile) -> str:
    c = mf.config
    return (f"H={c.hidden_size} L={c.num_hidden_layers} NH={c.num_attention_heads} "
            f"KVH={c.num_key_value_heads} hd={c.head_dim} I={c.intermediate_size} V={c.vocab_size} "
            f"max_pos={c.max_position_embeddings} | {c.num_parameters / 1e6:.2f}M params")


def padding_summary(mask: np.ndarray) -> str:
    """'row 1 left 2, row 3 right 1' from the mask itself (not from the generator's notes)."""
    parts = []
    for row, keep in enumerate(mask.astype(bool)):
        if keep.all():
            continue
        real = np.flatnonzero(keep)
        if real.size == 0:
            parts.append(f"row {row} fully padded")
            continue
        left, right = int(real[0]), int(len(keep) - 1 - real[-1])
        holes = int(len(keep) - left - right - real.size)
        desc = [f"left {left}"] * bool(left) + [f"right {right}"] * bool(right) + \
               [f"{holes} inside"] * bool(holes)
        parts.append(f"row {row} " + " ".join(desc))
    return ", ".join(parts) or "none"


def reference_line(stats) -> str:
    """The generator's record of the reference's logits (meta.reference), informational only:
    a file whose record is damaged or foreign still inspects."""
    try:
        return _reference_line(stats)
    except (KeyError, TypeError, ValueError):
        return f"(unreadable record: {str(stats)[:60]})"


def _reference_line(stats: dict) -> str:
    return (f"top-1 margin min {stats['top1_margin_min']:.3g} (median "
            f"{stats['top1_margin_median']:.3g}), entropy mean {stats['entropy_mean']:.3g} of "
            f"max {stats['max_entropy']:.3g} nats, |logits| max {stats['logits_absmax']:.3g} "
            f"over {stats['rows']} unpadded rows")


def import_source_line(source: dict) -> str:
    """Where `xvalid import` took the weights from (meta.source): the checkpoint, its
    architecture, head, stored dtypes, and every config default it had to use."""
    dtypes = ", ".join(f"{count} {dtype}" for dtype, count in source.get("dtypes", {}).items())
    line = (f"{source.get('checkpoint')} ({source.get('architecture')}, "
            f"{'tied' if source.get('tied') else 'untied'} head, tensors {dtypes}"
            f"{', upcast to float32' if source.get('upcast') else ''}"
            f"{', kept as ' + source['kept'] if source.get('kept') else ''})")
    defaults = source.get("defaults") or {}
    if defaults:
        line += "; defaults for keys absent from config.json: " + ", ".join(
            f"{key}={value}" for key, value in defaults.items())
    return line


def weights_line(mf: ModelFile) -> str:
    """'int8 (q8_0, block 32): 98,304 B int8 + 12,288 B scales, 1,024 B float32; 22% of float32'
    from the tensors as stored."""
    by_dtype: dict[str, int] = {}
    scales = float32 = 0
    for key, array in named_tensors(mf):
        if not key.startswith("weights."):
            continue
        float32 += array.nbytes
        stored = mf.storage.get(key)
        dtype = stored.dtype if stored is not None else "float32"
        by_dtype[dtype] = by_dtype.get(dtype, 0) + (stored.data.nbytes if stored else array.nbytes)
        if stored is not None and stored.scales is not None:
            scales += stored.scales.nbytes
    parts = [f"{nbytes:,} B {dtype}" for dtype, nbytes in by_dtype.items()]
    if scales:
        parts.insert(1, f"{scales:,} B int8 scales")
    total = sum(by_dtype.values()) + scales
    blocks = sorted({s.block_size for s in mf.storage.values() if s.block_size is not None})
    scheme = f" (block {', '.join(map(str, blocks))})" if blocks else ""
    return (f"{mf.weight_dtype}{scheme}: {', '.join(parts)}; {total:,} B in all, "
            f"{100 * total / max(float32, 1):.0f}% of float32")


def source_line(mf: ModelFile) -> str | None:
    """The quantisation record, when the file has one."""
    if mf.source_logits is None:
        return None
    return (f"logits of the {mf.source_weight_dtype} model before its weights were converted "
            f"(compare reports the quantisation cost)")


def print_generate_summary(mf: ModelFile, path: Path, seconds: float) -> None:
    console.print(f"wrote {path} ({_size(path.stat().st_size)}) in {seconds:.2f} s")
    source = mf.meta.get("source")
    if isinstance(source, dict) and source.get("tool") == "xvalid import":
        console.print(f"  source   {import_source_line(source)}", markup=False)
    console.print(f"  config   {config_line(mf)}")
    console.print(f"  weights  {weights_line(mf)}", markup=False)
    console.print(f"  inputs   B={mf.batch_size} S={mf.seq_len}, padding: "
                  f"{padding_summary(mf.attention_mask)}")
    if "reference" in mf.meta:
        console.print(f"  reference {reference_line(mf.meta['reference'])}")


def _preview(array: np.ndarray, n: int = 4) -> str:
    flat = array.reshape(-1)[:n]
    text = ", ".join(f"{v:.4g}" if array.dtype.kind == "f" else str(v) for v in flat)
    return f"[{text}{', …' if array.size > n else ''}]"


def print_inspect(mf: ModelFile, path: Path, show_tensors: bool = True) -> None:
    c = mf.config
    console.print(f"[bold]{path}[/bold]: valid model file ({mf.source_format})")
    config = Table(title="config", show_header=False, title_justify="left")
    for key, value in c.to_json().items():
        config.add_row(key, str(value))
    config.add_row("parameters", f"{c.num_parameters:,} (lm_head tied: "
                   f"{'yes' if np.array_equal(mf.weights.lm_head, mf.weights.tok_embedding) else 'NO'})")
    console.print(config)
    console.print(f"inputs: B={mf.batch_size} S={mf.seq_len}, padding: "
                  f"{padding_summary(mf.attention_mask)}")
    if "reference" in mf.meta:
        console.print(f"reference: {reference_line(mf.meta['reference'])}")
    console.print(f"weights: {weights_line(mf)}", markup=False)
    if source_line(mf):
        console.print(f"source: {source_line(mf)}", markup=False)
    if not show_tensors:
        return
    table = Table(title="tensors (preview: the values a stored tensor means, as float32)",
                  title_justify="left")
    for column in ("key", "shape", "dtype", "bytes", "preview", "sha256[:16]"):
        table.add_column(column, justify="right" if column == "bytes" else "left")
    total = 0
    for key, array in named_tensors(mf):
        stored = mf.storage.get(key)
        nbytes = stored.nbytes if stored is not None else array.nbytes
        total += nbytes
        dtype = str(array.dtype) if stored is None else stored.dtype
        if stored is not None and stored.block_size is not None:
            dtype += f" (block {stored.block_size})"
        table.add_row(key, str(list(array.shape)), dtype, f"{nbytes:,}", _preview(array),
                      tensor_checksum(stored if stored is not None else array))
    if mf.source_logits is not None:
        total += mf.source_logits.nbytes
        table.add_row("source.logits", str(list(mf.source_logits.shape)),
                      str(mf.source_logits.dtype), f"{mf.source_logits.nbytes:,}",
                      _preview(mf.source_logits), tensor_checksum(mf.source_logits))
    console.print(table)
    console.print(f"{total:,} bytes of tensor data ({_size(total)})")


# ---------------------------------------------------------------------------------------------
# compare


def _g(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}e}" if value and (abs(value) < 1e-2 or abs(value) >= 1e4) else f"{value:.{digits + 2}g}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _share(used: float) -> str:
    """Share of the tolerance budget used: '12%', or '450x' once far over."""
    return f"{used * 100:.3g}%" if used < 10 else f"{used:.3g}x"


def budget_share(metrics: dict) -> float:
    """The larger share of a candidate's budgets: the elementwise atol and, for a half dtype,
    the RMSE bound."""
    return max(metrics["budget_used"], metrics.get("rmse_budget_used") or 0.0)


def _speed(ratio: float | None) -> str:
    """Median time relative to torch, in words."""
    if ratio is None:
        return "-"
    if abs(ratio - 1) < 0.005:
        return "1.00x"
    return f"{ratio:.2f}x slower" if ratio > 1 else f"{1 / ratio:.2f}x faster"


def _at(at: dict) -> str:
    return f"b{at['batch']} s{at['position']} t{at['token']}"


STATUS_STYLE = {"pass": "[bold green]PASS[/]", "fail": "[bold red]FAIL[/]",
                "error": "[bold yellow]ERROR[/]"}


def _where(point: dict) -> str:
    return f"layer {point['layer']}, {point['point']}" if point["layer"] is not None else point["point"]


def _decode_cell(decode: dict | None) -> str:
    """The table's decode column: 'pass', 'FAIL from step 2', 'not supported'."""
    if decode is None:
        return "-"
    if decode["status"] == "not supported":
        return "[yellow]not supported[/]"
    if decode["status"] == "fail":
        return f"[red]FAIL from step {decode['first_failing_step']}[/]"
    return "pass"


def failure_reasons(cand: dict, tol: dict) -> list[str]:
    """Why a candidate did not pass, in a few words each: the engine's error, what is off in
    its logits, where it first diverges, the first decode step that drifts."""
    if cand["status"] == "error":
        return [cand["error"]]
    reasons = []
    x = cand["metrics"]
    if x["nonfinite"]:
        reasons.append(f"{x['nonfinite']['count']} NaN/Inf in the logits, first at "
                       f"{x['nonfinite']['first']}")
    elif not x["pass"]:
        top1 = x["top1"]
        if x["budget_used"] > 1:
            reasons.append(f"logits max abs {_g(x['max_abs'])} at {_at(x['max_abs_at'])} > atol "
                           f"{tol['atol']:.2e}")
        if (x.get("rmse_budget_used") or 0) > 1:
            reasons.append(f"logits RMSE {_g(x['rmse'])} > {_g(tol['rmse_max'])} "
                           f"({tol['rmse_source']})")
        if top1["agree"] != top1["decisive_rows"]:
            reasons.append(f"top-1 differs on {top1['decisive_rows'] - top1['agree']} of "
                           f"{top1['decisive_rows']} decisive rows")
    first = (cand.get("divergence") or {}).get("first")
    if first is not None and reasons:
        reasons.append(f"first divergence: {_where(first)}")
    decode = cand.get("decode")
    if decode and decode["status"] == "fail":
        step = next(s for s in decode["steps"] if not s["pass"])
        reasons.append(f"decode drifts from step {step['step']} (position {step['position']}, "
                       f"max abs {_g(step['max_abs'])})")
    return reasons


def _by_reason(entries: list[dict]) -> str:
    by_reason: dict[str, list[str]] = {}
    for u in entries:
        by_reason.setdefault(u["reason"], []).append(u["candidate"])
    return "; ".join(f"{', '.join(names)} ({reason})" for reason, names in by_reason.items())


def unchecked_line(report: dict) -> str | None:
    """'decode not checked: eng (not supported ...)', 'compute dtype not verified: eng (...)';
    None when every asked check ran."""
    parts = []
    decode = [u for u in report["unchecked"] if u["check"] == "decode"]
    if decode:
        checked = [c["name"] for c in report["candidates"] if c["kind"] != "reference"
                   and c.get("decode", {}).get("status") in ("pass", "fail")]
        none = "" if checked else f"no candidate checked --decode {report['decode_steps']}; "
        parts.append(f"{none}decode not checked: {_by_reason(decode)}")
    dtype = [u for u in report["unchecked"] if u["check"] == "dtype"]
    if dtype:
        parts.append(f"compute dtype not verified: {_by_reason(dtype)}")
    return "; ".join(parts) or None


def tolerance_line(tol: dict) -> str:
    """The budget and where it comes from, in the compute dtype."""
    if tol["dtype"] == "float32":
        return (f"tolerance (compute dtype float32): atol {tol['atol']:.2e} "
                f"({tol['atol_source']}; reference noise float32 vs float64 "
                f"{tol['reference_noise']:.2e}), rtol {tol['rtol']:g}")
    rmse = (f", RMSE <= {tol['rmse_max']:.2e} ({tol['rmse_source']})"
            if tol.get("rmse_max") is not None else "")
    return (f"tolerance (compute dtype {tol['dtype']}): atol {tol['atol']:.2e} "
            f"({tol['atol_source']}){rmse}, rtol {tol['rtol']:g}; candidates vs the float64 "
            f"reference")


def compute_notes(report: dict) -> list[str]:
    """One line per candidate that does not compute in the dtype asked for (or does not say),
    with what its verdict then means. Nothing when every candidate computes in it."""
    tol, lines = report["tolerance"], []
    for cand in report["candidates"]:
        c = cand.get("compute_dtype")
        if c is None or c["actual"] == c["asked"] or (c["asked"], c["actual"]) == ("float32",
                                                                                   "float64"):
            continue  # a float64 engine at the float32 budget: as before dtypes were asked
        name, asked, actual = cand["name"], c["asked"], c["actual"]
        if actual is None:
            lines.append(f"{name}: compute dtype unknown (asked {asked} via XVALID_DTYPE; its "
                         f"command has no {{dtype}} and it wrote no engine.json): judged at the "
                         f"{asked} budget all the same")
        elif actual in ("float32", "float64") and asked in ("bfloat16", "float16"):
            tighter = (f"; its float32 budget would be {tol['float32_atol']:.2e}, "
                       f"{tol['atol'] / tol['float32_atol']:.3g}x tighter"
                       if tol.get("float32_atol") else "")
            lines.append(f"{name} computes in {actual}, not {asked} ({c['source']}): held to the "
                         f"{asked} budget, which a correct {actual} kernel meets with room to "
                         f"spare{tighter}. This checks what it computes, not its {asked} "
                         f"rounding; --dtype float32 holds it to its own precision")
        else:
            lines.append(f"{name} computes in {actual}, not {asked} ({c['source']}): judged at "
                         f"the {asked} budget")
    return lines


def quiet_lines(report: dict, model: Path) -> list[str]:
    """-q: one line per candidate that failed or did not run, with the reason; a line for the
    checks that could not run; then the verdict."""
    lines = []
    for cand in report["candidates"]:
        if cand["status"] != "pass":
            reasons = failure_reasons(cand, report["tolerance"])
            text = "; ".join(reasons)
            if cand["status"] == "fail":
                text = f"{cand['name']}: {text}"
            lines.append(f"{cand['status'].upper()} {text}")
    note = unchecked_line(report)
    if note:
        lines.append(f"NOTE {note}")
    lines.append(f"{report['verdict'].upper()} {model}")
    return lines


def print_compare(report: dict, out: Console = console) -> None:
    m, tol = report["model"], report["tolerance"]
    c = m["config"]
    out.print(f"[bold]{m['path']}[/bold]: H={c['hidden_size']} L={c['num_hidden_layers']} "
                  f"NH={c['num_attention_heads']} KVH={c['num_key_value_heads']} "
                  f"V={c['vocab_size']} | B={m['batch_size']} S={m['seq_len']} "
                  f"({_plural(m['unpadded_rows'], 'unpadded row')}, {m['padded_rows']} padded) | "
                  f"{_plural(report['threads'], 'thread')}")
    out.print(tolerance_line(tol))
    out.print(f"reference: {cache_line(report['reference_cache'])}", markup=False)

    decode_asked = bool(report["decode_steps"])
    half = tol["dtype"] != "float32"
    show_dtype = half or any((c.get("compute_dtype") or {}).get("actual") in ("bfloat16", "float16")
                             for c in report["candidates"])
    title = ("logits vs reference (torch float64, the exact answer; budget from torch "
             f"{tol['dtype']})" if half else
             "logits vs reference (torch float32; the torch row: vs float64)")
    table = Table(title=title, title_justify="left")
    columns = (["candidate"] + ["computes in"] * show_dtype +
               ["max abs", "at", "mean abs", "RMSE", "max rel", "cosine", "NMSE",
                "KL mean/max", "top-1", "budget"] + ["decode"] * decode_asked + ["verdict"])
    for col in columns:
        table.add_column(col, justify="left" if col in ("candidate", "computes in", "at",
                                                         "decode", "verdict") else "right")
    for cand in report["candidates"]:
        status = STATUS_STYLE[cand["status"]]
        dtype = [_dtype_cell(cand.get("compute_dtype"))] * show_dtype
        if "metrics" not in cand:  # the engine did not run
            table.add_row(cand["name"], *dtype, "[yellow]did not run (below)[/]",
                          *[""] * (len(columns) - 3 - show_dtype), status)
            continue
        x = cand["metrics"]
        top1 = x["top1"]
        nan = x["nonfinite"]
        table.add_row(
            cand["name"] + (" (ref)" if cand["kind"] == "reference" else ""), *dtype,
            _g(x["max_abs"]), _at(x["max_abs_at"]), _g(x["mean_abs"]), _g(x["rmse"]),
            _g(x["max_rel"]), "-" if x["cosine"] is None else f"{x['cosine']:.9f}", _g(x["nmse"]),
            f"{_g(x['kl_mean'])}/{_g(x['kl_max'])}",
            f"{top1['agree']}/{top1['decisive_rows']}", _share(budget_share(x)),
            *[_decode_cell(cand.get("decode"))] * decode_asked,
            status + (f" [red]{nan['count']} NaN/Inf, first at {nan['first']}[/]" if nan else ""))
    out.print(table)
    for line in compute_notes(report):
        out.print(f"[yellow]{line}[/]")

    for cand in report["candidates"]:
        if cand["status"] == "error":
            out.print(f"{STATUS_STYLE['error']} {cand['error']}")
        for unknown in cand.get("unknown_intermediates", []):
            hint = f"; did you mean {unknown['nearest']}?" if unknown["nearest"] else ""
            out.print(f"{cand['name']}: [yellow]intermediates/{unknown['file']}: not a known "
                      f"intermediate{hint}[/] (ignored; names: docs/intermediates.md)")
        div = cand.get("divergence")
        if div:
            print_divergence(cand["name"], div, out)
        if cand.get("decode"):
            print_decode(cand, out)

    timed = [c for c in report["candidates"] if "timing" in c]
    if timed:
        print_timing(report, timed, out)

    verdict = report["verdict"]
    note = unchecked_line(report)
    failing = [c["name"] for c in report["candidates"] if c["status"] != "pass"]
    if verdict == "pass":
        worst = max(budget_share(c["metrics"]) for c in report["candidates"])
        scope = f"; [yellow]{note}[/]" if note else ""
        out.print(f"verdict: {STATUS_STYLE['pass']} ({_plural(len(report['candidates']), 'candidate')} "
                      f"within atol {tol['atol']:.2e}; worst uses {_share(worst)} of the budget"
                      f"{scope})")
    else:
        out.print(f"verdict: {STATUS_STYLE[verdict]} ({', '.join(failing)})")
        for cand in report["candidates"]:
            if cand["status"] == "fail":
                x = cand["metrics"]
                atol = (f"; smallest passing atol {_g(x['min_passing_atol'])} (budget "
                        f"{tol['atol']:.2e})" if not x["pass"] else "")
                out.print(f"  {cand['name']}: {'; '.join(failure_reasons(cand, tol))}{atol}")
        if note:
            out.print(f"  [yellow]{note}[/]")
        out.print(f"reproduce: {report['repro']}")
    if report.get("quantization"):
        out.print(quantization_line(report["quantization"]), markup=False)


def quantization_line(q: dict) -> str:
    """The quantisation cost in one line (llama.cpp's KLD report's numbers)."""
    return (f"quantisation cost ({q['weight_dtype']} weights vs the {q['source_weight_dtype']} "
            f"model they came from, over {_plural(q['rows'], 'position')}; not part of the "
            f"verdict): KL mean {_g(q['kl_mean'])}, median {_g(q['kl_median'])}, p99 "
            f"{_g(q['kl_p99'])}, max {_g(q['kl_max'])} nats; top-1 same {q['top1_agree']}/"
            f"{q['rows']} ({100 * q['top1_agreement']:.1f}%); dp RMS {100 * q['dp_rms']:.3g}%, "
            f"max {100 * q['dp_max_abs']:.3g}%")


def _dtype_cell(compute: dict | None) -> str:
    """The table's 'computes in' column: the dtype, yellow when not the one asked for."""
    if compute is None:
        return "-"
    if compute["actual"] is None:
        return "[yellow]unknown[/]"
    return compute["actual"] if compute["actual"] == compute["asked"] else \
        f"[yellow]{compute['actual']}[/]"


def cache_line(cache: dict) -> str:
    """Where the reference came from, for the report's text."""
    where = f"entry {(cache['entry'] or '')[:12]} in {cache['dir']}"
    if cache["source"] == "cache":
        return f"from the reference cache ({where}; torch not imported)"
    if cache["lookup"] == "off":
        return f"computed; the cache is off ({cache['reason']})"
    text = ("computed" if cache["lookup"] == "miss" else
            f"recomputed (the cached entry was {cache['lookup']}: {cache['reason']})")
    if cache["stored"]:
        return f"{text}; stored in the reference cache ({where})"
    return f"{text}; not stored in the reference cache ({cache['not_stored']})"


def cache_warning(cache: dict) -> str | None:
    """The one stderr line for a cache entry that was not trusted, or a reference that could
    not be stored; None when the cache did what was asked."""
    if cache["lookup"] in ("damaged", "stale"):
        done = "recomputed and replaced" if cache["stored"] else "recomputed, not stored"
        return f"the cached reference was {cache['lookup']} ({cache['reason']}): {done}"
    if cache["not_stored"]:
        return f"the reference was not cached: {cache['not_stored']}"
    return None


def print_decode(cand: dict, out: Console = console) -> None:
    d = cand["decode"]
    if d["status"] == "not supported":
        out.print(f"{cand['name']} [yellow]decode: {d['reason']}[/] (its verdict covers the "
                  f"full forward only; docs/engines.md: decode)")
        return
    steps = ", ".join(f"{s['step']}:{_g(s['max_abs'])}" for s in d["steps"])
    where = (f" from step {d['first_failing_step']}" if d["status"] == "fail" else "")
    out.print(f"{cand['name']} decode drift (prefill {d['prefill']}, then 1 token a step; max "
              f"abs per step vs the full forward): {steps} -> {STATUS_STYLE[d['status']]}{where}")


def print_timing(report: dict, timed: list[dict], out: Console = console) -> None:
    m = report["model"]
    decoding = any("decode_ms" in c["timing"] for c in timed)
    timing = Table(title=f"timing (forward of B={m['batch_size']} S={m['seq_len']}, "
                   f"{_plural(report['threads'], 'thread')})", title_justify="left")
    columns = ["candidate", "load ms", "median ms", "min ms", "max ms", "runs", "vs torch"]
    columns += ["prefill ms", "decode ms/step"] * decoding
    for col in columns:
        timing.add_column(col, justify="left" if col in ("candidate", "runs") else "right")
    for cand in timed:
        t = cand["timing"]
        runs = f"{t['repeat']} (+{t['warmup']} warmup)"
        if t["measures"] == "process":
            runs = f"{t['repeat']} (process, load included)"
        if t.get("cached"):
            runs += " cached"
        if t.get("threads", report["threads"]) != report["threads"]:
            runs += f" [yellow]ran {_plural(t['threads'], 'thread')}[/]"
        load = f"{cand['load_ms']:.1f}" if "load_ms" in cand else "-"
        decode = [f"{t['prefill_ms']:.3f}" if "prefill_ms" in t else "-",
                  f"{t['decode_median_ms']:.3f}" if "decode_median_ms" in t else "-"] * decoding
        timing.add_row(cand["name"], load, f"{t['median_ms']:.3f}", f"{t['min_ms']:.3f}",
                       f"{t['max_ms']:.3f}", runs, _speed(t.get("ratio_to_torch")), *decode)
    out.print(timing)


def print_divergence(name: str, div: dict, out: Console = console) -> None:
    points = div["points"]
    coverage = f"{div['compared']} of {div['expected']} points compared"
    gaps = div["layers_without_points"]
    if gaps:
        coverage += f"; {_plural(len(gaps), 'layer')} with none: {', '.join(map(str, gaps))}"
    if not points:
        out.print(f"{name}: [yellow]no intermediates compared (0 of {div['expected']} known "
                  f"names written)[/]")
        return
    layers = sorted({p["layer"] for p in points if p["layer"] is not None})
    kinds = list(dict.fromkeys(p["point"] for p in points if p["layer"] is not None))
    table = Table(title=f"{name}: max abs error per layer and sublayer (red: over budget)",
                  title_justify="left")
    table.add_column("layer")
    for kind in kinds:
        table.add_column(kind, justify="right")
    cell = {(p["layer"], p["point"]): p for p in points}

    def fmt(p):
        if p is None:
            return ""
        text = _g(p["error"], 1)
        return f"[red]{text}[/]" if p["diverged"] else text

    for layer in layers:
        table.add_row(str(layer), *(fmt(cell.get((layer, k))) for k in kinds))
    if layers:
        out.print(table)
    edges = [p for p in points if p["layer"] is None]
    if edges:
        out.print("  " + ", ".join(f"{p['name']} {fmt(p)}" for p in edges))
    first = div["first"]
    if first is None:
        out.print(f"{name}: no divergence: every intermediate within its budget ({coverage})")
        return
    detail = (f"max abs {_g(first['error'])} > budget {_g(first['budget'])}"
              if not first["error"] <= first["budget"] else
              f"RMSE {_g(first['rmse'])} > budget {_g(first['rmse_budget'])}, max abs "
              f"{_g(first['error'])} within {_g(first['budget'])}")
    out.print(f"{name}: [bold red]first divergence: {_where(first)}[/] "
              f"({first['name']}: {detail}; {coverage})")
    missing = div["not_compared_before_first"]
    if missing:
        listed = ", ".join(missing) if len(missing) <= 4 else f"{len(missing)} points"
        out.print(f"  [yellow]not compared before it (the engine wrote no such file): {listed}[/]")


def report_json(report: dict) -> str:
    """The report as JSON text; non-finite floats (a NaN candidate) become strings."""
    import json
    import math

    def clean(obj):
        if isinstance(obj, float) and not math.isfinite(obj):
            return str(obj)
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        return obj

    return json.dumps(clean(report), indent=2, allow_nan=False) + "\n"
