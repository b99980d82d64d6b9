"""The bench plots (PNG), drawn from the same Rows as the tables:

  throughput.png     prompt tokens/s and generated tokens/s against prompt length, one line
                     per backend and batch size (INVALID points marked, never drawn as values)
  speedup.png        speedup over torch as a heatmap over (batch, prompt length), per backend
                     and thread count, for the prefill and the decode step
  latency.png        each row's total latency split into prefill, first decode step and the
                     steady decode steps

With several models each file gets the model's name (throughput-NAME.png, ...). Only the
first decode-step count of the grid is plotted.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..files import atomic_write
from .rows import TIMING_PROCESS, Row, format_ms, format_times

DPI = 100
MARKERS = "osD^v<>p*h"
LINESTYLES = ("-", "--", ":", "-.")


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda fp: fig.savefig(fp, format="png", dpi=DPI), binary=True)
    return path


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_plots(result, out: Path) -> list[Path]:
    models = list(dict.fromkeys(m["name"] for m in result.models))  # once per weight dtype there
    written = []
    for model in models:
        rows = [r for r in result.rows if r.model == model]
        gens = sorted({r.gen for r in rows})
        if not rows:
            continue
        rows = [r for r in rows if r.gen == gens[0]]
        suffix = "" if len(models) == 1 else f"-{model}"
        title = f"{model}, N = {gens[0]} decode steps" + (" (PARTIAL)" if result.partial else "")
        written.append(_save(throughput_figure(rows, title), out / f"throughput{suffix}.png"))
        written.append(_save(speedup_figure(rows, title), out / f"speedup{suffix}.png"))
        written.append(_save(latency_figure(rows, title), out / f"latency{suffix}.png"))
    _plt().close("all")
    return written


def _colours(backends: list[str]) -> dict[str, str]:
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink",
               "tab:olive", "tab:cyan", "tab:gray"]
    return {name: palette[i % len(palette)] for i, name in enumerate(backends)}


def throughput_figure(rows: list[Row], title: str):
    plt = _plt()
    threads = sorted({r.threads for r in rows})
    backends = list(dict.fromkeys(r.label for r in rows))
    batches = sorted({r.batch for r in rows})
    colour = _colours(backends)
    fig, axes = plt.subplots(len(threads), 2, figsize=(12, 4.2 * len(threads)), squeeze=False,
                             layout="constrained")
    fig.suptitle(f"throughput against prompt length: {title}")
    for ti, t in enumerate(threads):
        for ax, (label, value) in zip(axes[ti], (("prefill: prompt tokens/s", "prefill_tok_s"),
                                                 ("decode: generated tokens/s", "decode_tok_s"))):
            invalid_drawn = False
            for backend in backends:
                for bi, batch in enumerate(batches):
                    line = sorted((r for r in rows if (r.label, r.batch, r.threads)
                                   == (backend, batch, t)), key=lambda r: r.seq)
                    points = [(r.seq, getattr(r, value)) for r in line
                              if r.status == "ok" and getattr(r, value)]
                    if points:
                        xs, ys = zip(*points)
                        ax.plot(xs, ys, color=colour[backend], marker=MARKERS[bi % len(MARKERS)],
                                linestyle=LINESTYLES[bi % len(LINESTYLES)],
                                label=f"{backend} B={batch}")
                    bad = [r.seq for r in line if r.status in ("invalid", "error")]
                    if bad:
                        ax.scatter(bad, [0.02] * len(bad), marker="x", s=80, color="red",
                                   transform=ax.get_xaxis_transform(), zorder=5,
                                   label=None if invalid_drawn else "INVALID (not timed)")
                        invalid_drawn = True
            ax.set_xscale("log", base=2)
            seqs = sorted({r.seq for r in rows})
            ax.set_xticks(seqs, [str(s) for s in seqs])
            ax.set_xlabel("prompt length S (tokens)")
            ax.set_ylabel("tokens/s")
            ax.set_ylim(bottom=0)
            ax.set_title(f"{label}, {t} thread{'s' * (t > 1)}", fontsize=10, loc="left")
            ax.grid(alpha=0.3)
    legend: dict[str, object] = {}  # one legend for every panel, below them
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="outside lower center",
                   ncol=min(len(legend), 6), fontsize=8, frameon=False)
    return fig


def _speedups(rows: list[Row]) -> list[tuple[str, int]]:
    return list(dict.fromkeys((r.label, r.threads) for r in rows if r.backend != "torch"))


def speedup_figure(rows: list[Row], title: str):
    """Columns: (backend, threads) other than torch; rows: prefill, decode. Cell colour: the
    speedup on a log scale centred at 1 (green faster than torch, red slower)."""
    plt = _plt()
    from matplotlib.colors import TwoSlopeNorm

    panels = _speedups(rows)
    has_torch = any(r.backend == "torch" and r.status == "ok" for r in rows)
    if not panels or not has_torch:
        fig, ax = plt.subplots(figsize=(7, 1.6))
        ax.axis("off")
        ax.text(0.5, 0.5, "no speedup to show: it needs torch and another backend that pass "
                "validation", ha="center", va="center")
        return fig
    batches = sorted({r.batch for r in rows})
    seqs = sorted({r.seq for r in rows})
    logs = [math.log2(v) for r in rows if r.speedup for v in r.speedup.values() if v]
    span = max([1.0] + [abs(v) for v in logs])
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-span, vmax=span)
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#e0e0e0")
    width = max(7.0, 2.5 + (1.0 + 0.8 * len(seqs)) * len(panels))
    fig, axes = plt.subplots(2, len(panels), figsize=(width, 1.6 + 1.3 * (len(batches) + 1)),
                             squeeze=False, layout="constrained")
    fig.suptitle(f"speedup over torch (torch time / backend time)\n{title}", fontsize=11)
    image = None
    for pi, (backend, threads) in enumerate(panels):
        for mi, metric in enumerate(("prefill", "decode")):
            ax = axes[mi][pi]
            values = [[math.nan] * len(seqs) for _ in batches]
            for r in rows:
                if (r.label, r.threads) != (backend, threads):
                    continue
                i, j = batches.index(r.batch), seqs.index(r.seq)
                v = (r.speedup or {}).get(metric)
                text, colour = "-", "black"
                if r.status in ("invalid", "error"):
                    text, colour = r.status.upper(), "red"
                elif r.status in ("skipped", "unsupported"):
                    text = "skipped" if r.status == "skipped" else "n/a"
                elif v:
                    values[i][j] = math.log2(v)
                    text = format_times(v)
                    if abs(float(norm(values[i][j])) - 0.5) > 0.35:  # a dark cell
                        colour = "white"
                ax.text(j, i, text, ha="center", va="center", fontsize=9, color=colour,
                        fontweight="bold" if colour == "red" else "normal")
            image = ax.imshow(np.ma.masked_invalid(np.array(values)), cmap=cmap, norm=norm,
                              aspect="auto")
            ax.set_xticks(range(len(seqs)), [str(s) for s in seqs])
            ax.set_yticks(range(len(batches)), [str(b) for b in batches])
            ax.set_xlabel("prompt length S")
            ax.set_ylabel("batch B")
            ax.set_title(f"{backend}, {threads} thread{'s' * (threads > 1)}: {metric}",
                         fontsize=10, loc="left")
    step = max(1, math.ceil(2 * span / 8))  # at most about 9 ticks, powers of two
    ticks = [t for t in range(-8 * step, 8 * step + 1, step) if -span <= t <= span]
    bar = fig.colorbar(image, ax=axes, ticks=ticks, fraction=0.05)
    bar.ax.set_yticklabels([f"{2.0 ** t:g}x" for t in ticks])
    return fig


def latency_figure(rows: list[Row], title: str):
    """One bar per timed row: prefill, first decode step and the other N-1 steps as shares of
    the total (medians), the total in ms at the bar's end."""
    plt = _plt()
    timed = [r for r in rows if r.status == "ok" and r.timing != TIMING_PROCESS
             and r.median("prefill_ms")]
    if not timed:
        fig, ax = plt.subplots(figsize=(7, 1.6))
        ax.axis("off")
        ax.text(0.5, 0.5, "no row with a prefill time to show", ha="center", va="center")
        return fig
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.32 * len(timed)), layout="constrained")
    labels, parts = [], []
    for r in timed:
        prefill = r.median("prefill_ms")
        first = r.median("first_decode_ms") or 0.0
        rest = (r.median("decode_ms_per_token") or 0.0) * max(r.gen - 1, 0)
        parts.append((prefill, first, rest))
        labels.append(f"{r.label}  B{r.batch} S{r.seq} t{r.threads}")
    y = range(len(timed))
    left = [0.0] * len(timed)
    for k, (name, colour) in enumerate((("prefill", "tab:blue"), ("first decode step", "tab:orange"),
                                        ("decode steps 2..N", "tab:green"))):
        shares = [100 * p[k] / sum(p) for p in parts]
        ax.barh(y, shares, left=left, color=colour, label=name)
        left = [a + b for a, b in zip(left, shares)]
    for i, row in enumerate(timed):  # the table's total: the median of the runs' totals
        ax.text(101, i, f"{format_ms(row.median('total_ms'))} ms", va="center", fontsize=8)
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 118)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("share of total latency (%)")
    ax.set_title(f"prefill against decode share of total latency (medians): {title}",
                 fontsize=10, loc="left")
    fig.legend(loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    return fig
