"""--profile: where the time of one prefill goes, op by op, every in-process backend side by
side under the shared op names (reference.OPS: the C++ kernel's timers and the labels the
torch reference gives its ops for torch.profiler).

Only backends that passed validation at the cell are profiled. Times are per forward (the
total over --repeat forwards divided by --repeat). torch.profiler adds its own overhead to
every aten call, so torch's op times are somewhat inflated; the forward's time measured
without the profiler is printed beside their sum.
"""

from __future__ import annotations

from ..reference import OPS
from ..timing import time_call
from .grid import Cell
from .rows import Row


def profile_cell(model, cell: Cell, opts, rows: list[Row], view) -> dict:
    """{model, batch, seq, threads, repeat, backends: {name: {forward_ms, ops: [...]} or None
    (no op timers)}} for the prefill of `cell`."""
    from .run import cell_inputs

    ids, mask = cell_inputs(model.mf.config, cell, opts.seed)
    ids, mask = ids[:, :cell.seq], mask[:, :cell.seq]
    valid = [r.backend for r in rows if r.status == "ok" and r.backend in model.backends
             and (r.batch, r.seq, r.gen, r.threads) == (cell.batch, cell.seq, cell.gen,
                                                          cell.threads)]
    out = {"model": model.name, "batch": cell.batch, "seq": cell.seq, "threads": cell.threads,
           "repeat": opts.repeat, "ops": list(OPS), "backends": {}}
    for name in valid:
        backend = model.backends[name]
        backend.set_threads(cell.threads)
        view.status(f"profiling {name}")
        ops = backend.profile(ids, mask, opts.repeat)
        if ops is None:
            out["backends"][name] = None
            continue
        forward_ms = time_call(lambda: backend.forward(ids, mask), 1, opts.repeat).median_ms
        total = sum(op["seconds"] for op in ops) or 1.0
        out["backends"][name] = {"forward_ms": forward_ms, "ops": [
            {"op": op["op"], "calls": op["calls"] // opts.repeat,
             "ms": op["seconds"] * 1e3 / opts.repeat, "share": op["seconds"] / total,
             "gflops": op["flops"] / op["seconds"] * 1e-9 if op["flops"] and op["seconds"] else None,
             "gbs": op["bytes"] / op["seconds"] * 1e-9 if op["bytes"] and op["seconds"] else None}
            for op in ops]}
    return out


def profile_table(profile: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the side-by-side table (the terminal and bench.md print it):
    per backend ms and share per forward, GFLOP/s where the backend counts flops, and each
    other backend's time relative to torch's."""
    named = {name: b for name, b in profile["backends"].items() if b is not None}
    counted = [name for name, b in named.items() if any(op["gflops"] for op in b["ops"])]
    relative = [name for name in named if name != "torch"] if "torch" in named else []
    header = ["op"] + [f"{name} {unit}" for name in named for unit in ("ms", "%")]
    header += [f"{name} GFLOP/s" for name in counted]
    header += [f"torch/{name}" for name in relative]
    by_op = {name: {op["op"]: op for op in b["ops"]} for name, b in named.items()}
    lines = []
    for op_name in profile["ops"]:
        if not any(op_name in ops for ops in by_op.values()):
            continue
        line = [op_name]
        for name in named:
            op = by_op[name].get(op_name)
            line += [f"{op['ms']:.3f}", f"{100 * op['share']:.1f}"] if op else ["-", "-"]
        for name in counted:
            op = by_op[name].get(op_name)
            line.append(f"{op['gflops']:.1f}" if op and op["gflops"] else "-")
        for name in relative:
            mine, theirs = by_op["torch"].get(op_name), by_op[name].get(op_name)
            line.append(f"{mine['ms'] / theirs['ms']:.2f}x" if mine and theirs and theirs["ms"]
                        else "-")
        lines.append(line)
    sums = {name: sum(op["ms"] for op in b["ops"]) for name, b in named.items()}
    filler = [""] * (len(counted))
    lines.append(["sum of ops"] + [v for name in named for v in (f"{sums[name]:.3f}", "100")]
                 + filler + [f"{sums['torch'] / sums[n]:.2f}x" if sums[n] else "-"
                             for n in relative])
    lines.append(["forward, no profiler"] + [v for name in named
                                              for v in (f"{named[name]['forward_ms']:.3f}", "")]
                 + filler + [f"{named['torch']['forward_ms'] / named[n]['forward_ms']:.2f}x"
                             for n in relative])
    return header, lines


def profile_title(profile: dict) -> str:
    none = [name for name, b in profile["backends"].items() if b is None]
    note = f"; no op timers: {', '.join(none)}" if none else ""
    return (f"per-op profile: {profile['model']} prefill B{profile['batch']} S{profile['seq']}, "
            f"{profile['threads']} thread{'s' * (profile['threads'] > 1)}, ms per forward over "
            f"{profile['repeat']} forward{'s' * (profile['repeat'] > 1)}{note}")
