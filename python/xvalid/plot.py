"""Plots for people who would rather look: error over budget per layer and sublayer.

Colour is log10(error / budget) on a diverging scale centred at 1 (the budget): blue is within
budget, white at it, red over it, so "over budget" is what stands out. With a half-precision
--dtype a point has two budgets (max abs and RMSE) and shows the larger share. The scale
follows the data (no clipping) and always spans at least 0.1x .. 10x.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .files import atomic_write

ANNOTATE_MAX_CELLS = 400  # above this many cells the numbers would not be readable


def _log_share(error, budget: float) -> float:
    """log10(error / budget); +inf for a NaN/Inf error, -inf for an exact 0."""
    if isinstance(error, str) or not math.isfinite(error):
        return math.inf
    if error == 0:
        return -math.inf
    return math.log10(error / max(budget, 1e-300))


def _ratio(point: dict) -> float:
    """log10(error / budget), the larger of max abs / atol and, for a half dtype, RMSE / its
    bound (either one over 1 is a divergence)."""
    ratio = _log_share(point["error"], point["budget"])
    if "rmse_budget" in point:
        ratio = max(ratio, _log_share(point["rmse"], point["rmse_budget"]))
    return ratio


def _scale(values: list[float]) -> tuple[float, float]:
    """(vmin, vmax) of the finite log ratios, at least (-1, 1), so 1 (the budget) is the centre."""
    finite = [v for v in values if math.isfinite(v)]
    return min(finite + [-1.0]), max(finite + [1.0])


def _decade_ticks(vmin: float, vmax: float, most: int = 9) -> list[int]:
    """Integer powers of ten between vmin and vmax (always 0, the budget), thinned to `most`."""
    lo, hi = math.ceil(vmin), math.floor(vmax)
    step = max(1, math.ceil((hi - lo + 1) / most))
    return sorted({0, *range(0, lo - 1, -step), *range(0, hi + 1, step)})


def plot_divergence(report: dict, path: Path) -> None:
    """One row of panels per candidate with intermediates: a heatmap of error/budget per
    (layer, sublayer) with the embedding, final_norm and logits beneath it, the first
    divergence outlined; and error/budget along the forward order, with the budget line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands = [c for c in report["candidates"] if c.get("divergence", {}).get("points")]
    if not cands:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no candidate wrote intermediates (torch is the reference itself)",
                ha="center", va="center")
    else:
        n_layers = report["model"]["config"]["num_hidden_layers"]
        row_height = 3.4 + 0.3 * n_layers
        fig = plt.figure(figsize=(15, row_height * len(cands) + 0.5), layout="constrained")
        fig.suptitle(f"{report['model']['path']}: verdict {report['verdict'].upper()} "
                     f"(colour: error / budget, log scale; red = over budget)")
        subfigs = fig.subfigures(len(cands), 1, squeeze=False)[:, 0]
        for subfig, cand in zip(subfigs, cands):
            _candidate_panels(subfig, cand, plt, max(n_layers, 1))
    atomic_write(path, lambda fp: fig.savefig(fp, format=path.suffix.lstrip(".").lower(), dpi=110),
                 binary=True)
    plt.close(fig)


def _candidate_panels(fig, cand: dict, plt, n_layers: int) -> None:
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Patch, Rectangle

    div = cand["divergence"]
    points = div["points"]
    first = div["first"]
    layered = [p for p in points if p["layer"] is not None]
    edges = {p["name"]: p for p in points if p["layer"] is None}
    layers = sorted({p["layer"] for p in layered} | set(div["layers_without_points"]))
    kinds = list(dict.fromkeys(p["point"] for p in layered)) or ["(none)"]
    vmin, vmax = _scale([_ratio(p) for p in points])
    norm = TwoSlopeNorm(vcenter=0.0, vmin=vmin, vmax=vmax)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#d9d9d9")  # bad: not compared
    axes = fig.subplot_mosaic([["heat", "line"], ["strip", "line"]], width_ratios=[3, 2],
                              height_ratios=[n_layers, 1])
    heat, strip, line = axes["heat"], axes["strip"], axes["line"]

    def draw(ax, cells, rows, labels_x, labels_y):
        """cells: {(row, col): point}; missing cells grey, NaN/Inf cells hatched."""
        values = np.full((rows, len(labels_x)), np.nan)
        for (r, c), p in cells.items():
            v = _ratio(p)
            values[r, c] = vmax if v == math.inf else vmin if v == -math.inf else v
        image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=cmap, norm=norm)
        ax.set_xticks(range(len(labels_x)), labels_x, rotation=30 if len(labels_x) > 3 else 0,
                      ha="right" if len(labels_x) > 3 else "center")
        ax.set_yticks(range(rows), labels_y)
        annotate = values.size <= ANNOTATE_MAX_CELLS
        for (r, c), p in cells.items():
            v = _ratio(p)
            if v == math.inf:
                ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, hatch="xx",
                                       edgecolor="black", linewidth=0))
            if annotate:
                text = ("NaN" if v == math.inf else "0" if v == -math.inf
                        else f"{10 ** v:.0e}" if abs(v) >= 2 else f"{10 ** v:.2g}")
                dark = abs(float(norm(values[r, c])) - 0.5) > 0.33
                ax.text(c, r, text, ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
            if first is not None and p["name"] == first["name"]:
                ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="lime",
                                       linewidth=3))
        return image

    cells = {(layers.index(p["layer"]), kinds.index(p["point"])): p for p in layered}
    image = draw(heat, cells, len(layers), kinds, [f"layer {layer}" for layer in layers])
    heat.set_title(f"{cand['name']} ({cand['status'].upper()}): error / budget per layer and "
                   f"sublayer, {div['compared']} of {div['expected']} points compared",
                   fontsize=10, loc="left")
    edge_names = ["embedding", "final_norm", "logits"]
    draw(strip, {(0, i): edges[n] for i, n in enumerate(edge_names) if n in edges}, 1,
         edge_names, [""])

    ticks = _decade_ticks(vmin, vmax)
    bar = fig.colorbar(image, ax=[heat, strip], location="right", ticks=ticks, fraction=0.04)
    bar.ax.set_yticklabels(["1 = budget" if t == 0 else f"$10^{{{t}}}$" for t in ticks])

    handles = [Patch(facecolor="#d9d9d9", label="not compared (no file)"),
               Patch(facecolor="white", edgecolor="black", hatch="xx", label="NaN / Inf")]
    if first is not None:
        handles.insert(0, Patch(facecolor="none", edgecolor="lime", linewidth=3,
                                label=f"first divergence: {first['name']}"))
    strip.legend(handles=handles, loc="upper left", bbox_to_anchor=(0, -0.45), ncol=3,
                 fontsize=8, frameon=False)

    # error / budget in forward order: where it crosses 1 is the first divergence
    ratios = [_ratio(p) for p in points]
    finite = [v for v in ratios if math.isfinite(v)] + [0.0]
    floor, top = min(finite) - 1, max(finite) + 1
    ys = [10.0 ** (top if v == math.inf else floor if v == -math.inf else v) for v in ratios]
    xs = list(range(len(points)))
    line.semilogy(xs, ys, "-", color="0.6", linewidth=1)
    for over, colour, label in ((False, "tab:blue", "within budget"),
                                (True, "tab:red", "over budget")):
        chosen = [i for i, p in enumerate(points) if p["diverged"] == over]
        line.scatter([xs[i] for i in chosen], [ys[i] for i in chosen], s=14, color=colour,
                     label=label, zorder=3)
    line.axhline(1.0, color="black", linestyle="--", linewidth=1, label="budget (1)")
    for x, v in zip(xs, ratios):
        if v == math.inf:
            line.annotate("NaN/Inf", (x, ys[x]), textcoords="offset points", xytext=(-6, 6),
                          ha="right", fontsize=8, color="tab:red")
    if first is not None:
        line.axvline(points.index(first), color="lime", linewidth=2,
                     label=f"first divergence: {first['name']}")
    # x labels: the edge points by name, each layer once, at the middle of its span
    spans: dict[int, list[int]] = {}
    for i, p in enumerate(points):
        if p["layer"] is not None:
            spans.setdefault(p["layer"], []).append(i)
    every = max(1, math.ceil(len(spans) / 12))
    ticks = {i: p["name"] for i, p in enumerate(points) if p["layer"] is None}
    for n, (layer, span) in enumerate(sorted(spans.items())):
        if n > 0:
            line.axvline(span[0] - 0.5, color="0.85", linewidth=0.8, zorder=0)
        if n % every == 0:
            ticks[(span[0] + span[-1]) / 2] = f"layer {layer}"
    names = {p["name"]: i for i, p in enumerate(points)}
    if names.get("logits", -1) - names.get("final_norm", -9) == 1:  # adjacent: one label
        del ticks[names["final_norm"]], ticks[names["logits"]]
        ticks[names["logits"] - 0.5] = "final_norm, logits"
    line.set_xticks(list(ticks), list(ticks.values()), rotation=60, ha="right", fontsize=8)
    line.set_ylabel("error / budget")
    line.set_title("in forward order", fontsize=10)
    line.legend(fontsize=8, loc="best")
