"""Human-readable output (rich tables on stdout)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from .modelfile import LayerWeights, ModelFile, tensor_checksum

console = Console(highlight=False, soft_wrap=True)


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


def reference_line(stats: dict) -> str:
    return (f"top-1 margin min {stats['top1_margin_min']:.3g} (median "
            f"{stats['top1_margin_median']:.3g}), entropy mean {stats['entropy_mean']:.3g} of "
            f"max {stats['max_entropy']:.3g} nats, |logits| max {stats['logits_absmax']:.3g} "
            f"over {stats['rows']} unpadded rows")


def print_generate_summary(mf: ModelFile, path: Path, seconds: float) -> None:
    console.print(f"wrote {path} ({_size(path.stat().st_size)}) in {seconds:.2f} s")
    console.print(f"  config   {config_line(mf)}")
    console.print(f"  inputs   B={mf.batch_size} S={mf.seq_len}, padding: "
                  f"{padding_summary(mf.attention_mask)}")
    if "reference" in mf.meta:
        console.print(f"  reference {reference_line(mf.meta['reference'])}")


def _tensor_rows(mf: ModelFile):
    w = mf.weights
    yield "inputs.input_ids", mf.input_ids
    yield "inputs.attention_mask", mf.attention_mask
    yield "rope.cos", mf.rope_cos
    yield "rope.sin", mf.rope_sin
    yield "weights.tok_embedding", w.tok_embedding
    yield "weights.final_rms", w.final_rms
    yield "weights.lm_head", w.lm_head
    for index, layer in enumerate(w.layers):
        for f in fields(LayerWeights):
            yield f"weights.layers[{index}].{f.name}", getattr(layer, f.name)


def _preview(array: np.ndarray, n: int = 4) -> str:
    flat = array.reshape(-1)[:n]
    text = ", ".join(f"{v:.4g}" if array.dtype.kind == "f" else str(v) for v in flat)
    return f"[{text}{', …' if array.size > n else ''}]"


def print_inspect(mf: ModelFile, path: Path, show_tensors: bool = True) -> None:
    c = mf.config
    console.print(f"[bold]{path}[/bold]: valid xvalid model file "
                  f"(format {mf.meta.get('format', 'seed layout')})")
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
    if not show_tensors:
        return
    table = Table(title="tensors", title_justify="left")
    for column in ("key", "shape", "dtype", "bytes", "preview", "sha256[:16]"):
        table.add_column(column, justify="right" if column == "bytes" else "left")
    total = 0
    for key, array in _tensor_rows(mf):
        total += array.nbytes
        table.add_row(key, str(list(array.shape)), str(array.dtype), f"{array.nbytes:,}",
                      _preview(array), tensor_checksum(array))
    console.print(table)
    console.print(f"{total:,} bytes of tensor data ({_size(total)})")
