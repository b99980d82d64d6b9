#!/usr/bin/env python3
"""Write a random model file in the seed's JSON layout (stdlib + numpy only, no xvalid).

Used to check that xvalid reads files written by other tools. Writes only the seed's keys
(meta, config, inputs, rope, weights), unlike the seed's generator it can randomise the norm
weights and pad rows, so norm-weight and padding bugs are not hidden.

    python write_seed_model.py model.json --hidden 64 --layers 2 --heads 8 --kvh 2 \
        --vocab 128 --max-pos 128 --seq-len 8 --batch-size 2 --seed 123 --pad-left 1
"""

import argparse
import json
import os
import sys

import numpy as np

# the sibling module, also when this file is imported by path rather than run as a script
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from seedfile import encode_tensor  # noqa: E402

RMS_NORM_EPS = 1e-5
ROPE_THETA = 1e6


def minimind_intermediate_size(hidden):
    """MiniMind's FFN size rule: 512 -> 1408, 768 -> 2048."""
    return 64 * ((int(hidden * 8 / 3) + 63) // 64)


def rope_tables(max_pos, head_dim, theta=ROPE_THETA):
    """cos, sin: (max_pos, head_dim) float32, rotate-half layout (the halves repeat)."""
    f32 = np.float32
    inv_freq = (f32(1.0) / f32(theta) ** (np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim))).astype(f32)
    angles = np.outer(np.arange(max_pos, dtype=f32), inv_freq).astype(f32)   # (max_pos, hd/2)
    angles = np.concatenate([angles, angles], axis=-1)                      # (max_pos, hd)
    return np.cos(angles).astype(f32), np.sin(angles).astype(f32)


def padded_inputs(rng, batch, seq, vocab, pad_left_rows=(), pad_right_rows=()):
    """input_ids int32 (B,S) in [1, V), attention_mask uint8 (B,S). A padded row has
    max(1, S // 2) pad positions (id 0, mask 0) on its left or right end."""
    both = set(pad_left_rows) & set(pad_right_rows)
    if both:
        raise ValueError(f"rows {sorted(both)} are both left- and right-padded")
    ids = rng.integers(1, vocab, size=(batch, seq)).astype(np.int32)
    mask = np.ones((batch, seq), dtype=np.uint8)
    n_pad = max(1, seq // 2)
    for b in pad_left_rows:
        mask[b, :n_pad] = 0
    for b in pad_right_rows:
        mask[b, seq - n_pad:] = 0
    ids[mask == 0] = 0
    return ids, mask


def make_seed_model(*, hidden, layers, heads, kv_heads, vocab, intermediate=None, max_pos,
                    batch, seq, seed, pad_left_rows=(), pad_right_rows=(),
                    random_norm_weights=True):
    """The model as a dict in the file's layout, tensors as numpy arrays (not yet encoded)."""
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"need hidden % heads == 0 and heads % kv_heads == 0 "
                         f"(got {hidden}, {heads}, {kv_heads})")
    if seq > max_pos:
        raise ValueError(f"seq {seq} > max_pos {max_pos}")
    H, NH, KVH, V = hidden, heads, kv_heads, vocab
    I = intermediate or minimind_intermediate_size(H)
    hd = H // NH
    rng = np.random.default_rng(seed)

    def linear(rows, cols):
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)

    def norm_weight():
        if random_norm_weights:
            return rng.uniform(0.5, 1.5, size=H).astype(np.float32)
        return np.ones(H, dtype=np.float32)

    tok_embedding = linear(V, H)
    layer_list = [{
        "rms_attn": norm_weight(),
        "rms_ffn": norm_weight(),
        "wq": linear(NH * hd, H),
        "wk": linear(KVH * hd, H),
        "wv": linear(KVH * hd, H),
        "wo": linear(H, NH * hd),
        "w_gate": linear(I, H),
        "w_up": linear(I, H),
        "w_down": linear(H, I),
    } for _ in range(layers)]
    final_rms = norm_weight()
    ids, mask = padded_inputs(rng, batch, seq, V, pad_left_rows, pad_right_rows)
    cos, sin = rope_tables(max_pos, hd)
    return {
        "meta": {"seed": seed, "B": batch, "S": seq, "head_dim": hd},
        "config": {
            "hidden_size": H,
            "num_hidden_layers": layers,
            "num_attention_heads": NH,
            "num_key_value_heads": KVH,
            "vocab_size": V,
            "intermediate_size": I,
            "max_position_embeddings": max_pos,
            "rms_norm_eps": RMS_NORM_EPS,
            "rope_theta": ROPE_THETA,
            "hidden_act": "silu",
            "tie_word_embeddings": True,
        },
        "inputs": {"input_ids": ids, "attention_mask": mask},
        "rope": {"cos": cos, "sin": sin},
        "weights": {
            "tok_embedding": tok_embedding,
            "final_rms": final_rms,
            "lm_head": tok_embedding.copy(),   # tied
            "layers": layer_list,
        },
    }


def encode_model(model):
    """Array dict from make_seed_model -> JSON-ready dict (tensor names as the seed wrote them)."""
    def enc(group):
        return {name: encode_tensor(name, a) for name, a in group.items()}

    weights = model["weights"]
    return {
        "meta": model["meta"],
        "config": model["config"],
        "inputs": enc(model["inputs"]),
        "rope": enc(model["rope"]),
        "weights": {
            **enc({k: v for k, v in weights.items() if k != "layers"}),
            "layers": [{k: encode_tensor(f"layer{l}_{k}", a) for k, a in layer.items()}
                       for l, layer in enumerate(weights["layers"])],
        },
    }


def write_seed_model(path, **kwargs):
    """Write a model file (keyword arguments as make_seed_model); returns the array dict."""
    model = make_seed_model(**kwargs)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(encode_model(model), f)
    return model


def _rows(text):
    return tuple(int(r) for r in text.split(",") if r.strip())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", help="output JSON model file")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kvh", type=int, default=2, help="key/value heads")
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=None, help="default: MiniMind rule")
    p.add_argument("--max-pos", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--pad-left", type=_rows, default=(), metavar="ROWS",
                   help="comma-separated batch rows to left-pad")
    p.add_argument("--pad-right", type=_rows, default=(), metavar="ROWS",
                   help="comma-separated batch rows to right-pad")
    p.add_argument("--ones-norm", action="store_true",
                   help="norm weights all ones, as the seed's generator (hides norm bugs)")
    a = p.parse_args(argv)
    write_seed_model(a.path, hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=a.kvh,
                     vocab=a.vocab, intermediate=a.intermediate, max_pos=a.max_pos,
                     batch=a.batch_size, seq=a.seq_len, seed=a.seed, pad_left_rows=a.pad_left,
                     pad_right_rows=a.pad_right, random_norm_weights=not a.ones_norm)


if __name__ == "__main__":
    main()
