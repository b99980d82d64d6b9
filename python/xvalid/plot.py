"""Plots for people who would rather look: error per layer and sublayer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .files import atomic_write


def plot_divergence(report: dict, path: Path) -> None:
    """One panel per candidate with intermediates: log10 max abs error per (layer, sublayer)
    as a heatmap, the first divergence boxed; plus the error of each layer's output against
    its budget."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands = [c for c in report["candidates"] if c.get("divergence")]
    if not cands:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no candidate wrote intermediates (torch is the reference itself)",
                ha="center", va="center")
    else:
        fig, axes = plt.subplots(len(cands), 2, figsize=(14, 3.2 + 0.25 * report["model"]["config"]
                                 ["num_hidden_layers"] * len(cands)), squeeze=False,
                                 gridspec_kw={"width_ratios": [3, 2]})
        for (heat, line), cand in zip(axes, cands):
            points = [p for p in cand["divergence"]["points"] if p["layer"] is not None]
            layers = sorted({p["layer"] for p in points})
            kinds = list(dict.fromkeys(p["point"] for p in points))
            grid = np.full((len(layers), len(kinds)), np.nan)
            for p in points:
                err = p["error"]  # NaN/Inf: the top of the scale
                grid[layers.index(p["layer"]), kinds.index(p["point"])] = (
                    np.log10(max(err, 1e-12)) if np.isfinite(err) else 0.0)
            im = heat.imshow(grid, aspect="auto", cmap="magma", vmin=-9, vmax=0)
            heat.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
            heat.set_yticks(range(len(layers)), [f"layer {l}" for l in layers])
            heat.set_title(f"{cand['name']} ({cand['status'].upper()}): log10 max abs error vs reference")
            fig.colorbar(im, ax=heat)
            first = cand["divergence"]["first"]
            if first is not None and first["layer"] is not None:
                heat.add_patch(plt.Rectangle((kinds.index(first["point"]) - 0.5,
                                              layers.index(first["layer"]) - 0.5), 1, 1,
                                             fill=False, edgecolor="cyan", linewidth=2.5))
            residual = [p for p in points if p["point"] == "residual"]
            line.semilogy([p["layer"] for p in residual],
                          [max(p["error"], 1e-12) for p in residual], "o-", label="error")
            line.semilogy([p["layer"] for p in residual],
                          [max(p["budget"], 1e-12) for p in residual], "k--",
                          label="budget")
            line.set_xlabel("layer")
            line.set_xticks(layers)
            line.set_title("layer output (residual) error")
            line.legend()
        fig.suptitle(f"{report['model']['path']}: verdict {report['verdict'].upper()}")
    fig.tight_layout()
    atomic_write(path, lambda fp: fig.savefig(fp, format=path.suffix.lstrip(".").lower(), dpi=110),
                 binary=True)
    plt.close(fig)
