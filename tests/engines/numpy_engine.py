#!/usr/bin/env python3
"""numpy_engine.py: an external engine for xvalid's tests, written only with numpy.

An independent implementation of the MiniMind2 / Llama decoder forward pass of
/work/shared/model-spec.md (no KV cache: one full forward over the file's inputs). It reads a
model file in the seed's JSON layout and writes logits the way the seed's engines did:

    python numpy_engine.py MODEL OUT_DIR [--bug NAME] [--format raw|npy] [--output-name FILE]
                           [--no-intermediates] [--dtype float32|float64] [--fail MODE]

    OUT_DIR/logits.bin                raw little-endian float32 (B,S,V), no header (--format raw)
    OUT_DIR/logits.npy                a real .npy of the same                         (--format npy)
    OUT_DIR/intermediates/NAME.npy    float32, the names of docs/intermediates.md

--bug injects one classic engine bug (the intermediates show the buggy computation, as a real
buggy engine would dump them); --fail misbehaves at the protocol level instead. Both exist to
test that xvalid catches and localises them.

Dimensions: B = batch, S = sequence, H = hidden, NH / KVH = query / key-value heads,
hd = head_dim = H / NH, I = FFN inner size, V = vocab.
"""

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from seedfile import read_model

BUGS = {
    "gqa": "kv head g = h % KVH instead of h // n_rep",
    "rope-k-missing": "RoPE not applied to k",
    "rope-interleaved": "RoPE rotates interleaved pairs (2i, 2i+1) instead of halves, on q and k",
    "no-padding-mask": "attention_mask ignored",
    "attn-lost": "attention sublayer output dropped (x = x + 0)",
    "norm-weight-ignored": "rmsnorm weights not multiplied (all norms)",
    "causal-off-by-one": "each query also sees the next token (j > i+1 masked)",
    "nan": "a NaN in logit (b=0, last position, token 0)",
}
FAIL_MODES = {
    "exit3": "print a message to stderr, exit 3, write nothing",
    "sleep": "sleep 60 s, then run normally",
    "short": "write the logits as raw float32, one float short",
    "long": "write the logits as raw float32, one float too many",
    "none-written": "exit 0, write nothing",
    "two-files": "write the logits and a copy as extra.bin",
}


@dataclass
class Config:
    dim: int            # H, hidden size
    n_layers: int       # L, decoder layers
    n_heads: int        # NH, query heads
    n_kv_heads: int     # KVH, key/value heads (GQA: each serves n_rep query heads)
    vocab_size: int     # V
    hidden_dim: int     # I, SwiGLU inner size
    norm_eps: float     # rmsnorm epsilon

    @property
    def head_dim(self):     # hd
        return self.dim // self.n_heads

    @property
    def n_rep(self):        # query heads per kv head
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_json(cls, c):
        return cls(dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
                   n_heads=c["num_attention_heads"], n_kv_heads=c["num_key_value_heads"],
                   vocab_size=c["vocab_size"], hidden_dim=c["intermediate_size"],
                   norm_eps=c["rms_norm_eps"])


def rmsnorm(x, weight, eps, use_weight=True):
    """x (..., H) * rsqrt(mean(x^2) + eps), then * weight (H)."""
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y * weight if use_weight else y


def rope(x, cos, sin, interleaved=False):
    """Rotate x (B,S,heads,hd) by position; cos, sin (S,hd) rows for positions 0..S-1.

    Rotate-half (the spec): dimension j pairs with j + hd/2,
        out[j] = x[j] c[j] - x[j+hd/2] s[j],  out[j+hd/2] = x[j+hd/2] c[j] + x[j] s[j].
    interleaved=True is the bug: dimension 2i pairs with 2i+1 (at frequency i).
    """
    half = x.shape[-1] // 2
    c, s = cos[None, :, None, :], sin[None, :, None, :]      # (1,S,1,hd)
    if not interleaved:
        x1, x2 = x[..., :half], x[..., half:]
        return x * c + np.concatenate([-x2, x1], axis=-1) * s
    c, s = c[..., :half], s[..., :half]                      # frequency i for pair i
    xe, xo = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = xe * c - xo * s
    out[..., 1::2] = xo * c + xe * s
    return out


def softmax(s):
    """softmax over the last axis; every row has a finite entry (key 0 is never causally masked)."""
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention(q, k, v, kv_head, attention_mask=None, lookahead=0):
    """Causal multi-head attention with grouped kv heads.

    q (B,S,NH,hd); k, v (B,S,KVH,hd); kv_head (NH,) int: query head h reads kv head kv_head[h];
    attention_mask (B,S) 1 = keep, 0 = pad, or None. Key j is visible to query i if j <= i + lookahead.
    Returns o (B,S,NH,hd).
    """
    S, hd = q.shape[1], q.shape[3]
    qh = q.transpose(0, 2, 1, 3)                             # (B,NH,S,hd)
    kh = k[:, :, kv_head].transpose(0, 2, 3, 1)              # (B,NH,hd,S)
    vh = v[:, :, kv_head].transpose(0, 2, 1, 3)              # (B,NH,S,hd)
    scores = (qh @ kh) / math.sqrt(hd)                       # (B,NH,S,S), divide as written
    # causal: -inf where key j is after query i (+ lookahead)
    i, j = np.arange(S)[:, None], np.arange(S)[None, :]
    scores = np.where(j > i + lookahead, -np.inf, scores)
    # padding: -1e9 on padded keys, for every query row
    if attention_mask is not None:
        scores = scores + np.where(attention_mask[:, None, None, :] == 0, -1e9, 0.0).astype(scores.dtype)
    return (softmax(scores) @ vh).transpose(0, 2, 1, 3)      # (B,S,NH,hd)


def swiglu(m, w_gate, w_up, w_down):
    """m (B,S,H) -> gate, up (B,S,I) and out = (silu(gate) * up) Wdown^T (B,S,H).
    With the tied head, these three matmuls are most of forward's time at MiniMind sizes."""
    gate, up = m @ w_gate.T, m @ w_up.T
    silu = gate / (1.0 + np.exp(-gate))                      # z * sigmoid(z)
    return gate, up, (silu * up) @ w_down.T


def forward(cfg, w, cos, sin, ids, mask, bug=None, record=lambda name, a: None):
    """Logits (B,S,V) in the weights' dtype. w: the file's weights dict, already cast;
    cos, sin (max_pos,hd); ids, mask (B,S). record(name, array) sees every intermediate."""
    B, S = ids.shape
    NH, KVH, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    use_norm_weight = bug != "norm-weight-ignored"          # BUG norm-weight-ignored
    # GQA is one index array: query head h reads kv head h // n_rep
    kv_head = np.arange(NH) % KVH if bug == "gqa" else np.arange(NH) // cfg.n_rep   # BUG gqa
    cos, sin = cos[:S], sin[:S]                              # positions 0..S-1 (no cache)
    attn_mask = None if bug == "no-padding-mask" else mask   # BUG no-padding-mask
    lookahead = 1 if bug == "causal-off-by-one" else 0       # BUG causal-off-by-one
    interleaved = bug == "rope-interleaved"                  # BUG rope-interleaved

    # token embedding: plain lookup
    x = w["tok_embedding"][ids]                              # (B,S,H)
    record("embedding", x)

    for l, lw in enumerate(w["layers"]):
        p = f"layer{l}."
        # attention rmsnorm
        a = rmsnorm(x, lw["rms_attn"], cfg.norm_eps, use_norm_weight)
        record(p + "attn_norm", a)
        # qkv matmuls (nn.Linear: W is (out, in))
        q = (a @ lw["wq"].T).reshape(B, S, NH, hd)
        k = (a @ lw["wk"].T).reshape(B, S, KVH, hd)
        v = (a @ lw["wv"].T).reshape(B, S, KVH, hd)
        # RoPE on q and k
        q = rope(q, cos, sin, interleaved)
        if bug != "rope-k-missing":                          # BUG rope-k-missing
            k = rope(k, cos, sin, interleaved)
        record(p + "q", q)
        record(p + "k", k)
        record(p + "v", v)
        # attention, then the output projection over head-major concatenated heads
        o = attention(q, k, v, kv_head, attn_mask, lookahead)   # (B,S,NH,hd)
        record(p + "attn_heads", o)
        attn_out = o.reshape(B, S, NH * hd) @ lw["wo"].T        # (B,S,H)
        if bug == "attn-lost":                               # BUG attn-lost
            attn_out = np.zeros_like(attn_out)
        record(p + "attn_out", attn_out)
        # residual
        x = x + attn_out
        record(p + "attn_residual", x)
        # ffn rmsnorm and SwiGLU
        m = rmsnorm(x, lw["rms_ffn"], cfg.norm_eps, use_norm_weight)
        record(p + "ffn_norm", m)
        gate, up, ffn_out = swiglu(m, lw["w_gate"], lw["w_up"], lw["w_down"])
        record(p + "gate", gate)
        record(p + "up", up)
        record(p + "ffn_out", ffn_out)
        # residual
        x = x + ffn_out
        record(p + "residual", x)

    # final rmsnorm and the tied head
    x = rmsnorm(x, w["final_rms"], cfg.norm_eps, use_norm_weight)
    record("final_norm", x)
    logits = x @ w["lm_head"].T                              # (B,S,V)
    if bug == "nan":                                         # BUG nan
        logits[0, -1, 0] = np.nan
    record("logits", logits)
    return logits


def cast_tree(node, dtype):
    """Every array in a (nested) weights dict/list, cast to dtype."""
    if isinstance(node, dict):
        return {k: cast_tree(v, dtype) for k, v in node.items()}
    if isinstance(node, list):
        return [cast_tree(v, dtype) for v in node]
    return np.asarray(node, dtype=dtype)


def write_logits(path, logits, fmt, fail=None):
    """float32 (B,S,V): raw little-endian bytes (no header) or a .npy; fail "short" drops the
    last float, "long" appends one."""
    out = np.ascontiguousarray(logits, dtype="<f4")
    with open(path, "wb") as f:
        if fail == "short":
            f.write(out.tobytes()[:-4])
        elif fail == "long":
            f.write(out.tobytes() + out.tobytes()[:4])
        elif fmt == "npy":
            np.save(f, out)          # a file object: np.save would append .npy to a path
        else:
            f.write(out.tobytes())


def run_model(path, dtype="float64", bug=None, intermediates=True):
    """The file's inputs through forward: logits (B,S,V) and {name: intermediate} (empty
    unless asked for), in `dtype`. Tests call this in-process as an independent reference."""
    model = read_model(path)
    cfg = Config.from_json(model["config"])
    dtype = np.dtype(dtype)
    weights = cast_tree(model["weights"], dtype)
    weights.setdefault("lm_head", weights["tok_embedding"])      # tied
    cos, sin = (np.asarray(model["rope"][t], dtype=dtype) for t in ("cos", "sin"))
    ids = np.asarray(model["inputs"]["input_ids"], dtype=np.int64)
    mask = np.asarray(model["inputs"]["attention_mask"])
    captured = {}
    record = captured.__setitem__ if intermediates else (lambda name, a: None)
    return forward(cfg, weights, cos, sin, ids, mask, bug, record), captured


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="numpy reference engine for xvalid tests (seed JSON model -> logits)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="bugs:\n" + "".join(f"  {k:20} {v}\n" for k, v in BUGS.items())
               + "fail modes:\n" + "".join(f"  {k:20} {v}\n" for k, v in FAIL_MODES.items()))
    p.add_argument("model", help="model file, seed JSON layout")
    p.add_argument("out_dir", help="output directory (created)")
    p.add_argument("--bug", choices=sorted(BUGS), metavar="NAME", help="inject one engine bug (below)")
    p.add_argument("--format", choices=("raw", "npy"), default="raw",
                   help="logits file format (default raw)")
    p.add_argument("--output-name", metavar="FILE", help="logits file name (default logits.bin / logits.npy)")
    p.add_argument("--no-intermediates", action="store_true",
                   help="do not write OUT_DIR/intermediates/")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float64",
                   help="internal precision (default float64); outputs are float32")
    p.add_argument("--fail", choices=sorted(FAIL_MODES), metavar="MODE",
                   help="simulate a protocol failure (below)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.fail == "exit3":
        print(f"numpy_engine: simulated failure (--fail exit3) for {args.model}", file=sys.stderr)
        return 3
    if args.fail == "none-written":
        return 0
    if args.fail == "sleep":
        time.sleep(60)

    logits, captured = run_model(args.model, args.dtype, args.bug, not args.no_intermediates)
    os.makedirs(args.out_dir, exist_ok=True)
    name = args.output_name or ("logits.npy" if args.format == "npy" else "logits.bin")
    write_logits(os.path.join(args.out_dir, name), logits, args.format, args.fail)
    if args.fail == "two-files":
        write_logits(os.path.join(args.out_dir, "extra.bin"), logits, "raw")
    if captured:
        idir = os.path.join(args.out_dir, "intermediates")
        os.makedirs(idir, exist_ok=True)
        for n, a in captured.items():
            np.save(os.path.join(idir, n + ".npy"), np.asarray(a, dtype=np.float32))
    return 0


if __name__ == "__main__":
    sys.exit(main())
