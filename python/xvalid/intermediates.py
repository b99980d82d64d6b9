"""The names of the intermediates every backend captures (docs/intermediates.md), apart from
the reference so that reading them does not import torch."""

from __future__ import annotations

PER_LAYER = ("attn_norm", "q", "k", "v", "attn_heads", "attn_out", "attn_residual", "ffn_norm",
             "gate", "up", "ffn_out", "residual")


def intermediate_names(n_layers: int) -> list[str]:
    """Every captured name in forward order (docs/intermediates.md)."""
    return (["embedding"] + [f"layer{l}.{n}" for l in range(n_layers) for n in PER_LAYER]
            + ["final_norm", "logits"])
