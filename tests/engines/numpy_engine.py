#!/usr/bin/env python3
"""numpy_engine.py: an external engine for xvalid's tests, written only with numpy.

An independent implementation of the MiniMind2 / Llama decoder forward pass of docs/model.md
(model files: docs/model-format.md; intermediates: docs/intermediates.md), with its own KV
cache. It reads a model file in the seed's JSON layout and follows the engine protocol of
docs/engines.md, version 2:

    python numpy_engine.py MODEL OUT_DIR [--bug NAME] [--format raw|npy] [--output-name FILE]
                           [--no-intermediates] [--dtype float64|float32|bfloat16|float16]
                           [--fail MODE] [--decode N] [--no-timing] [--seed-style]

    OUT_DIR/logits.bin                raw little-endian float32 (B,S,V), no header (--format raw)
    OUT_DIR/logits.npy                a real .npy of the same                         (--format npy)
    OUT_DIR/intermediates/NAME.npy    float32, the names of docs/intermediates.md
    OUT_DIR/decode_logits.bin|.npy    (B,N,V): prefill S-N tokens, then N one-token steps
                                      through the KV cache (--decode N, default
                                      $XVALID_DECODE_STEPS, else 0: nothing written)
    OUT_DIR/timing.json               load_ms, forward_ms ($XVALID_REPEAT forwards after
                                      $XVALID_WARMUP untimed ones), prefill_ms, decode_ms, threads
    OUT_DIR/engine.json               {"dtype": the compute dtype it ran in}

--dtype is the compute dtype (default float64, the exact answer). bfloat16 and float16 are
emulated the way PyTorch's CPU kernels compute them: every array is stored as float32 and
each operation's result is rounded to the dtype (round to nearest even); matmuls accumulate
in float32 and round once; RMSNorm's normalisation and the softmax stay in float32 (as HF's
Llama does). --bug half-accumulate accumulates dot products in the half dtype instead,
rounding after every addition: one rounding step worse than PyTorch, which compare must fail.

XVALID_INTERMEDIATES=0 in the environment skips the intermediates. --seed-style behaves like
the seed's engines (protocol version 1): raw float32 logits only, the environment ignored.
--bug injects one classic engine bug (the intermediates show the buggy computation, as a real
buggy engine would dump them); --fail misbehaves at the protocol level instead. Both exist to
test that xvalid catches and localises them.

Dimensions: B = batch, S = sequence, T = new tokens in one step, P = tokens already in the KV
cache, H = hidden, NH / KVH = query / key-value heads, hd = head_dim = H / NH, I = FFN inner
size, V = vocab, N = decode steps.
"""

import argparse
import json
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
    "kv-cache-position": "a one-token decode step does not advance the cache position: from "
                         "the second decode step on, the token reuses the previous position "
                         "and cache slot (the full forward is unaffected)",
    "half-accumulate": "matmuls accumulate in the compute dtype, rounded after every addition, "
                       "instead of in float32 (needs --dtype bfloat16 or float16)",
}
COMPUTE_DTYPES = ("float64", "float32", "bfloat16", "float16")
HALF_DTYPES = ("bfloat16", "float16")
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


def round_bfloat16(x):
    """float32 array -> the nearest bfloat16 values (ties to even), still as float32: add half
    a bfloat16 ulp minus one (0x7FFF) plus the lowest kept bit to the bits, keep the top 16."""
    x = np.asarray(x, np.float32)
    bits = x.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return np.where(np.isnan(x), x, rounded.view(np.float32))  # a NaN's payload must not carry


def round_float16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


class Arithmetic:
    """The compute dtype. float64 and float32: numpy's own arithmetic. bfloat16 and float16:
    arrays stored as float32, each op's result rounded to the dtype by round(); matmul
    accumulates in float32 and rounds once, like PyTorch's CPU kernels, or, with
    accumulate_in_dtype (the half-accumulate bug), rounds the running sum after every term."""

    def __init__(self, dtype="float64", accumulate_in_dtype=False):
        self.dtype = dtype
        self.storage = np.dtype(np.float64 if dtype == "float64" else np.float32)
        self.round = {"bfloat16": round_bfloat16, "float16": round_float16}.get(dtype, lambda x: x)
        self.accumulate_in_dtype = accumulate_in_dtype

    def matmul(self, a, b):
        """a (..., M, K) @ b (..., K, N) -> (..., M, N), rounded to the dtype."""
        if not self.accumulate_in_dtype:
            return self.round(a @ b)
        out = np.zeros(np.broadcast_shapes(a.shape[:-1], b.shape[:-2] + (1,)) + b.shape[-1:],
                       self.storage)
        for k in range(a.shape[-1]):  # products of half values are exact in float32
            out = self.round(out + a[..., :, k, None] * b[..., k, None, :])
        return out


EXACT = Arithmetic("float64")


def rmsnorm(x, weight, eps, use_weight=True, ar=EXACT):
    """x (..., H) * rsqrt(mean(x^2) + eps), then * weight (H). The normalisation is computed in
    the storage dtype (float32 for a half dtype) and rounded once, then the weight multiplies."""
    y = ar.round(x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))
    return ar.round(y * weight) if use_weight else y


def rope(x, cos, sin, interleaved=False, ar=EXACT):
    """Rotate x (B,T,heads,hd) by position; cos, sin (T,hd) rows for this call's positions.

    Rotate-half (the spec): dimension j pairs with j + hd/2,
        out[j] = x[j] c[j] - x[j+hd/2] s[j],  out[j+hd/2] = x[j+hd/2] c[j] + x[j] s[j].
    interleaved=True is the bug: dimension 2i pairs with 2i+1 (at frequency i).
    """
    half = x.shape[-1] // 2
    c, s = cos[None, :, None, :], sin[None, :, None, :]      # (1,S,1,hd)
    r = ar.round                                             # each product and sum rounded
    if not interleaved:
        x1, x2 = x[..., :half], x[..., half:]
        return r(r(x * c) + r(np.concatenate([-x2, x1], axis=-1) * s))
    c, s = c[..., :half], s[..., :half]                      # frequency i for pair i
    xe, xo = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = r(r(xe * c) - r(xo * s))
    out[..., 1::2] = r(r(xo * c) + r(xe * s))
    return out


def softmax(s):
    """softmax over the last axis; every row has a finite entry (key 0 is never causally masked)."""
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention(q, k, v, kv_head, attention_mask=None, lookahead=0, p0=0, ar=EXACT):
    """Causal multi-head attention with grouped kv heads, for T new queries after P cached keys.

    q (B,T,NH,hd) at positions p0..p0+T-1; k, v (B,P+T,KVH,hd) for positions 0..P+T-1 (cached,
    then new); kv_head (NH,) int: query head h reads kv head kv_head[h]; attention_mask
    (B,P+T) 1 = keep, 0 = pad, or None. Key j is visible to query i if j <= p0 + i + lookahead.
    Returns o (B,T,NH,hd). Scores and outputs in the compute dtype, the masks and the softmax
    in the storage dtype (float32 for a half dtype: -1e9 overflows float16).
    """
    T, n_keys, hd = q.shape[1], k.shape[1], q.shape[3]
    qh = q.transpose(0, 2, 1, 3)                             # (B,NH,T,hd)
    kh = k[:, :, kv_head].transpose(0, 2, 3, 1)              # (B,NH,hd,P+T)
    vh = v[:, :, kv_head].transpose(0, 2, 1, 3)              # (B,NH,P+T,hd)
    scores = ar.round(ar.matmul(qh, kh) / math.sqrt(hd))     # (B,NH,T,P+T), divide as written
    # causal: -inf where key j is after query i (+ lookahead)
    i, j = np.arange(T)[:, None], np.arange(n_keys)[None, :]
    scores = np.where(j > p0 + i + lookahead, -np.inf, scores)
    # padding: -1e9 on padded keys, for every query row
    if attention_mask is not None:
        scores = scores + np.where(attention_mask[:, None, None, :] == 0, -1e9, 0.0).astype(scores.dtype)
    return ar.matmul(ar.round(softmax(scores)), vh).transpose(0, 2, 1, 3)   # (B,T,NH,hd)


def swiglu(m, w_gate, w_up, w_down, ar=EXACT):
    """m (B,S,H) -> gate, up (B,S,I) and out = (silu(gate) * up) Wdown^T (B,S,H).
    With the tied head, these three matmuls are most of forward's time at MiniMind sizes."""
    gate, up = ar.matmul(m, w_gate.T), ar.matmul(m, w_up.T)
    silu = ar.round(gate / (1.0 + np.exp(-gate)))           # z * sigmoid(z)
    return gate, up, ar.matmul(ar.round(silu * up), w_down.T)


class KVCache:
    """Post-RoPE keys and values per layer, each (B,P,KVH,hd); `length` = P, the position the
    next token takes."""

    def __init__(self, n_layers):
        self.k, self.v, self.length = [None] * n_layers, [None] * n_layers, 0


def step(cfg, w, cos, sin, ids, mask, cache, bug=None, record=lambda name, a: None, ar=EXACT):
    """Append ids (B,T) to the cache at positions p0..p0+T-1 (p0 = cache.length) and return
    their logits (B,T,V) in the weights' dtype. w: the file's weights dict, already cast (and
    rounded to ar's dtype); cos, sin (max_pos,hd); mask (B, >= p0+T): columns 0..p0+T-1
    (cached keys, then new) are used. record(name, array) sees every intermediate of this call."""
    B, T = ids.shape
    p0 = cache.length
    NH, KVH, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    use_norm_weight = bug != "norm-weight-ignored"          # BUG norm-weight-ignored
    # GQA is one index array: query head h reads kv head h // n_rep
    kv_head = np.arange(NH) % KVH if bug == "gqa" else np.arange(NH) // cfg.n_rep   # BUG gqa
    cos, sin = cos[p0:p0 + T], sin[p0:p0 + T]                # this call's positions
    attn_mask = None if bug == "no-padding-mask" else mask[:, :p0 + T]   # BUG no-padding-mask
    lookahead = 1 if bug == "causal-off-by-one" else 0       # BUG causal-off-by-one
    interleaved = bug == "rope-interleaved"                  # BUG rope-interleaved

    # token embedding: plain lookup
    x = w["tok_embedding"][ids]                              # (B,T,H)
    record("embedding", x)

    for l, lw in enumerate(w["layers"]):
        p = f"layer{l}."
        # attention rmsnorm
        a = rmsnorm(x, lw["rms_attn"], cfg.norm_eps, use_norm_weight, ar)
        record(p + "attn_norm", a)
        # qkv matmuls (nn.Linear: W is (out, in))
        q = ar.matmul(a, lw["wq"].T).reshape(B, T, NH, hd)
        k = ar.matmul(a, lw["wk"].T).reshape(B, T, KVH, hd)
        v = ar.matmul(a, lw["wv"].T).reshape(B, T, KVH, hd)
        # RoPE on q and k
        q = rope(q, cos, sin, interleaved, ar)
        if bug != "rope-k-missing":                          # BUG rope-k-missing
            k = rope(k, cos, sin, interleaved, ar)
        record(p + "q", q)
        record(p + "k", k)
        record(p + "v", v)
        # the KV cache: keys and values of positions 0..p0-1, then this call's
        if p0:
            k = np.concatenate([cache.k[l][:, :p0], k], axis=1)   # (B,P+T,KVH,hd)
            v = np.concatenate([cache.v[l][:, :p0], v], axis=1)
        cache.k[l], cache.v[l] = k, v
        # attention, then the output projection over head-major concatenated heads
        o = attention(q, k, v, kv_head, attn_mask, lookahead, p0, ar)   # (B,T,NH,hd)
        record(p + "attn_heads", o)
        attn_out = ar.matmul(o.reshape(B, T, NH * hd), lw["wo"].T)      # (B,T,H)
        if bug == "attn-lost":                               # BUG attn-lost
            attn_out = np.zeros_like(attn_out)
        record(p + "attn_out", attn_out)
        # residual
        x = ar.round(x + attn_out)
        record(p + "attn_residual", x)
        # ffn rmsnorm and SwiGLU
        m = rmsnorm(x, lw["rms_ffn"], cfg.norm_eps, use_norm_weight, ar)
        record(p + "ffn_norm", m)
        gate, up, ffn_out = swiglu(m, lw["w_gate"], lw["w_up"], lw["w_down"], ar)
        record(p + "gate", gate)
        record(p + "up", up)
        record(p + "ffn_out", ffn_out)
        # residual
        x = ar.round(x + ffn_out)
        record(p + "residual", x)

    stuck = bug == "kv-cache-position" and T == 1 and p0 > 0   # BUG kv-cache-position
    cache.length = p0 + T - (1 if stuck else 0)
    # final rmsnorm and the tied head
    x = rmsnorm(x, w["final_rms"], cfg.norm_eps, use_norm_weight, ar)
    record("final_norm", x)
    logits = ar.matmul(x, w["lm_head"].T)                    # (B,T,V)
    if bug == "nan":                                         # BUG nan
        logits[0, -1, 0] = np.nan
    record("logits", logits)
    return logits


def forward(cfg, w, cos, sin, ids, mask, bug=None, record=lambda name, a: None, ar=EXACT):
    """The whole sequence from an empty cache: logits (B,S,V)."""
    return step(cfg, w, cos, sin, ids, mask, KVCache(cfg.n_layers), bug, record, ar)


def decode(cfg, w, cos, sin, ids, mask, n_prefill, bug=None, ar=EXACT):
    """Prefill n_prefill tokens, then one token a step through the KV cache, as the protocol
    asks: logits (B, S - n_prefill, V), prefill ms, [ms per step]."""
    cache = KVCache(cfg.n_layers)
    start = time.perf_counter()
    step(cfg, w, cos, sin, ids[:, :n_prefill], mask, cache, bug, ar=ar)
    prefill_ms = (time.perf_counter() - start) * 1e3
    steps, step_ms = [], []
    for t in range(n_prefill, ids.shape[1]):
        start = time.perf_counter()
        steps.append(step(cfg, w, cos, sin, ids[:, t:t + 1], mask, cache, bug, ar=ar))
        step_ms.append((time.perf_counter() - start) * 1e3)
    return np.concatenate(steps, axis=1), prefill_ms, step_ms


def map_tree(node, fn):
    """fn applied to every array in a (nested) weights dict/list."""
    if isinstance(node, dict):
        return {k: map_tree(v, fn) for k, v in node.items()}
    if isinstance(node, list):
        return [map_tree(v, fn) for v in node]
    return fn(node)


def cast_tree(node, dtype):
    """Every array in a (nested) weights dict/list, cast to dtype."""
    return map_tree(node, lambda a: np.asarray(a, dtype=dtype))


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


def env_int(name, default):
    """A non-negative integer from the environment (the protocol's XVALID_* variables)."""
    value = os.environ.get(name, "")
    return int(value) if value.strip().isdigit() else default


def load_model(path, dtype):
    """(cfg, weights, cos, sin, ids, mask) of the file at path, weights in `dtype`."""
    model = read_model(path)
    cfg = Config.from_json(model["config"])
    dtype = np.dtype(dtype)
    weights = cast_tree(model["weights"], dtype)
    weights.setdefault("lm_head", weights["tok_embedding"])      # tied
    cos, sin = (np.asarray(model["rope"][t], dtype=dtype) for t in ("cos", "sin"))
    ids = np.asarray(model["inputs"]["input_ids"], dtype=np.int64)
    mask = np.asarray(model["inputs"]["attention_mask"])
    return cfg, weights, cos, sin, ids, mask


def arithmetic(dtype, bug=None):
    """The Arithmetic of a compute dtype; ValueError for half-accumulate without a half dtype."""
    if bug == "half-accumulate" and dtype not in HALF_DTYPES:
        raise ValueError(f"--bug half-accumulate needs --dtype bfloat16 or float16, not {dtype}")
    return Arithmetic(dtype, accumulate_in_dtype=bug == "half-accumulate")


def load_in(path, ar):
    """load_model in ar's storage dtype, the weights and RoPE tables rounded to its compute
    dtype (as PyTorch casts a model to bfloat16 or float16)."""
    cfg, weights, cos, sin, ids, mask = load_model(path, ar.storage)
    return cfg, map_tree(weights, ar.round), ar.round(cos), ar.round(sin), ids, mask


def run_model(path, dtype="float64", bug=None, intermediates=True):
    """The file's inputs through forward: logits (B,S,V) and {name: intermediate} (empty
    unless asked for), computed in `dtype` (COMPUTE_DTYPES). Tests call this in-process as an
    independent reference."""
    ar = arithmetic(dtype, bug)
    cfg, weights, cos, sin, ids, mask = load_in(path, ar)
    captured = {}
    record = captured.__setitem__ if intermediates else (lambda name, a: None)
    return forward(cfg, weights, cos, sin, ids, mask, bug, record, ar), captured


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
                   help="logits file format (default raw), also of decode_logits")
    p.add_argument("--output-name", metavar="FILE", help="logits file name (default logits.bin / logits.npy)")
    p.add_argument("--no-intermediates", action="store_true",
                   help="do not write OUT_DIR/intermediates/ (also: XVALID_INTERMEDIATES=0)")
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default="float64",
                   help="compute dtype (default float64; bfloat16, float16 emulated, see above); "
                        "outputs are float32")
    p.add_argument("--fail", choices=sorted(FAIL_MODES), metavar="MODE",
                   help="simulate a protocol failure (below)")
    p.add_argument("--decode", type=int, default=None, metavar="N",
                   help="decode steps (default $XVALID_DECODE_STEPS, else 0)")
    p.add_argument("--no-timing", action="store_true", help="do not write OUT_DIR/timing.json")
    p.add_argument("--seed-style", action="store_true",
                   help="protocol version 1: raw float32 logits only, the environment ignored")
    args = p.parse_args(argv)
    if args.seed_style:
        args.format, args.no_intermediates, args.no_timing, args.decode = "raw", True, True, 0
    if args.decode is None:
        args.decode = env_int("XVALID_DECODE_STEPS", 0)
    if os.environ.get("XVALID_INTERMEDIATES") == "0" and not args.seed_style:
        args.no_intermediates = True
    return args


def write_timing(path, **fields):
    """timing.json (docs/engines.md); None fields are left out."""
    with open(path, "w") as f:
        json.dump({k: v for k, v in fields.items() if v is not None}, f)


def main(argv=None):
    args = parse_args(argv)
    if args.fail == "exit3":
        print(f"numpy_engine: simulated failure (--fail exit3) for {args.model}", file=sys.stderr)
        return 3
    if args.fail == "none-written":
        return 0
    if args.fail == "sleep":
        time.sleep(60)

    try:
        ar = arithmetic(args.dtype, args.bug)
    except ValueError as exc:
        print(f"numpy_engine: error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    cfg, weights, cos, sin, ids, mask = load_in(args.model, ar)
    load_ms = (time.perf_counter() - start) * 1e3
    S = ids.shape[1]
    if not 0 <= args.decode < S:
        print(f"numpy_engine: error: --decode {args.decode} must be in [0, S-1 = {S - 1}]",
              file=sys.stderr)
        return 2

    captured = {}
    record = (lambda name, a: None) if args.no_intermediates else captured.__setitem__
    logits = forward(cfg, weights, cos, sin, ids, mask, args.bug, record, ar)

    os.makedirs(args.out_dir, exist_ok=True)
    ext = "npy" if args.format == "npy" else "bin"
    name = args.output_name or f"logits.{ext}"
    write_logits(os.path.join(args.out_dir, name), logits, args.format, args.fail)
    if args.fail == "two-files":
        write_logits(os.path.join(args.out_dir, "extra.bin"), logits, "raw")
    if captured:
        idir = os.path.join(args.out_dir, "intermediates")
        os.makedirs(idir, exist_ok=True)
        for n, a in captured.items():
            np.save(os.path.join(idir, n + ".npy"), np.asarray(a, dtype=np.float32))
    prefill_ms = decode_ms = None
    if args.decode:
        decoded, prefill_ms, decode_ms = decode(cfg, weights, cos, sin, ids, mask, S - args.decode,
                                                args.bug, ar)
        write_logits(os.path.join(args.out_dir, f"decode_logits.{ext}"), decoded, args.format)
    if not args.no_timing:
        for _ in range(env_int("XVALID_WARMUP", 0)):
            forward(cfg, weights, cos, sin, ids, mask, args.bug, ar=ar)
        forward_ms = []
        for _ in range(max(env_int("XVALID_REPEAT", 1), 1)):
            start = time.perf_counter()
            forward(cfg, weights, cos, sin, ids, mask, args.bug, ar=ar)
            forward_ms.append((time.perf_counter() - start) * 1e3)
        write_timing(os.path.join(args.out_dir, "timing.json"), load_ms=load_ms,
                     forward_ms=forward_ms, warmup=env_int("XVALID_WARMUP", 0),
                     prefill_ms=prefill_ms, decode_ms=decode_ms,
                     threads=env_int("OMP_NUM_THREADS", None))
    if not args.seed_style:  # what it computed in, for compare's report (docs/engines.md)
        with open(os.path.join(args.out_dir, "engine.json"), "w") as f:
            json.dump({"dtype": args.dtype}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
