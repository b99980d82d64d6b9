#!/usr/bin/env python3
"""Runs `xvalid generate` + `xvalid compare --decode 4` over the acceptance grid of the C++
kernel issue (GQA 8/8, 8/2, 8/1; hidden 64..512; seq-len 1..128; batch 1..4; padded rows) and
prints one row per model: every candidate's max abs error and share of the budget, decode
drift, and the C++/torch time ratio. Exit 0 only if every model passes.

    .venv/bin/python scripts/acceptance_sweep.py [--quick] [--csv sweep.csv]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from xvalid.report import console as stdout_console  # wide enough for CI logs

XVALID = [sys.executable, "-m", "xvalid"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="hidden 64 and 512 only")
    parser.add_argument("--csv", type=Path, help="also write the rows as CSV")
    args = parser.parse_args()
    hiddens = (64, 512) if args.quick else (64, 128, 256, 512)
    shapes = ((1, 1), (5, 4), (33, 3), (128, 2))  # (seq-len, batch)
    console = Console(stderr=True)
    table = Table(title="xvalid compare over the acceptance grid")
    for col in ("H", "KVH", "S", "B", "pad", "torch max abs", "cpp max abs", "cpp budget",
                "decode", "cpp/torch time", "verdict"):
        table.add_column(col, justify="right")
    rows, failed = [], 0
    cases = list(itertools.product(hiddens, (8, 2, 1), shapes))
    with tempfile.TemporaryDirectory() as tmp, console.status("") as status:
        model, report = Path(tmp) / "m.json", Path(tmp) / "r.json"
        for n, (hidden, kvh, (seq, batch)) in enumerate(cases, 1):
            pad = batch - 1 if batch > 1 else int(seq > 1)
            decode = 4 if seq > 4 else 0
            status.update(f"{n}/{len(cases)}: H={hidden} KVH={kvh} S={seq} B={batch}")
            subprocess.run([*XVALID, "generate", "--hidden", str(hidden), "--kv-heads", str(kvh),
                            "--seq-len", str(seq), "--batch-size", str(batch), "--pad", str(pad),
                            "--vocab", "512", "-o", str(model)], check=True, capture_output=True)
            proc = subprocess.run([*XVALID, "compare", str(model), "--decode", str(decode),
                                   "--repeat", "5", "--json", str(report)], capture_output=True)
            r = json.loads(report.read_text())
            torch, cpp = (next(c for c in r["candidates"] if c["name"] == name)
                          for name in ("torch", "cpp"))
            row = {"H": hidden, "KVH": kvh, "S": seq, "B": batch, "pad": pad,
                   "torch_max_abs": torch["metrics"]["max_abs"],
                   "cpp_max_abs": cpp["metrics"]["max_abs"],
                   "cpp_budget_used": cpp["metrics"]["budget_used"],
                   "decode": "-" if not decode else ("pass" if cpp["decode"]["pass"]
                                                     and torch["decode"]["pass"] else "FAIL"),
                   "cpp_over_torch_time": cpp["timing"]["ratio_to_torch"],
                   "exit_code": proc.returncode}
            failed += proc.returncode != 0
            rows.append(row)
            table.add_row(*map(str, (hidden, kvh, seq, batch, pad)),
                          f"{row['torch_max_abs']:.2e}", f"{row['cpp_max_abs']:.2e}",
                          f"{row['cpp_budget_used']:.1%}", row["decode"],
                          f"{row['cpp_over_torch_time']:.2f}",
                          "PASS" if proc.returncode == 0 else f"exit {proc.returncode}")
    stdout_console.print(table)
    if args.csv:
        with open(args.csv, "w", newline="") as fp:
            writer = csv.DictWriter(fp, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    print(f"{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
