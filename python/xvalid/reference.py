"""The PyTorch reference forward pass: exactly docs/model.md, as short as the math.

Runs in float32 (the reference candidates are compared against), float64 (the exact answer,
which measures the float32 reference's own rounding noise), or a half-precision compute dtype
(bfloat16, float16) the way PyTorch and HF transformers' Llama compute in it: weights and RoPE
tables cast to the dtype, matmuls, RoPE, SiLU and residual adds in the dtype (PyTorch's CPU
matmul accumulates in float32 and rounds once), RMSNorm's normalisation and the softmax in
float32, each cast back (HF's LlamaRMSNorm and eager attention). Prefill and incremental decode share one forward:
with a KVCache, the new tokens take positions p0.. where p0 = tokens already cached, and the
attention mask covers cached + new keys. Named intermediates (docs/intermediates.md) are
recorded into a dict when one is passed as `capture`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import fields

import numpy as np
import torch
import torch.nn.functional as F

from .modelfile import LayerWeights, ModelFile, check_inputs

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
HALF_DTYPES = ("bfloat16", "float16")


def upcast(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the float32 islands (RMSNorm, softmax, outputs): at least float32."""
    return torch.promote_types(dtype, torch.float32)

# The op names of the per-op profile, shared with the C++ kernel's timers (csrc/kernel/
# profile.h), in forward order. forward() labels its ops with them for torch.profiler while
# label_ops is on (TorchBackend.profile); off, a label is a shared no-op context.
OPS = ("embedding", "rmsnorm", "q_proj", "k_proj", "v_proj", "rope", "attention", "o_proj",
       "gate_up_swiglu", "down_proj", "head")
label_ops = False
_NO_LABEL = contextlib.nullcontext()


def op(name: str):
    return torch.profiler.record_function(name) if label_ops else _NO_LABEL


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in (at least) fp32, cast back to the activation dtype, then scale."""
    xf = x.to(upcast(x.dtype))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x (B,S,heads,hd); cos, sin (S,hd) rows for this call's positions."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def attention(q, k, v, bias, n_rep: int) -> torch.Tensor:
    """q (B,S,NH,hd); k, v (B,T,KVH,hd); bias (B,1,S,T) additive, in upcast(q.dtype).
    Returns (B,S,NH,hd).

    Query head h reads kv head h // n_rep (GQA), hence repeat_interleave. The scores are
    computed in q's dtype and the softmax in (at least) float32, cast back before @ v, as HF's
    eager attention does; the masks are added in float32 too (-1e9 overflows float16).
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k.repeat_interleave(n_rep, dim=2),
                                          v.repeat_interleave(n_rep, dim=2)))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B,NH,S,T)
    weights = torch.softmax(scores.to(bias.dtype) + bias, dim=-1).to(q.dtype)
    return (weights @ v).transpose(1, 2)


def attention_bias(mask: torch.Tensor, p0: int, S: int, dtype: torch.dtype) -> torch.Tensor:
    """(B,1,S,p0+S): -inf where key j > p0 + i (causal), -1e9 added where mask[b, j] == 0."""
    T = p0 + S
    causal = torch.ones(S, T, dtype=torch.bool).triu(p0 + 1)
    bias = torch.zeros(S, T, dtype=dtype).masked_fill(causal, float("-inf"))
    padding = torch.where(mask == 0, -1e9, 0.0).to(dtype)  # (B,T)
    return bias[None, None] + padding[:, None, None, :]


class KVCache:
    """Post-RoPE keys and values per layer, each (B, T, KVH, hd), T = tokens so far."""

    def __init__(self, n_layers: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.k[layer] is not None:
            k, v = torch.cat((self.k[layer], k), dim=1), torch.cat((self.v[layer], v), dim=1)
        self.k[layer], self.v[layer] = k, v
        return k, v


class Reference:
    """The model of one file, as torch tensors in one dtype."""

    def __init__(self, mf: ModelFile, dtype: str = "float32"):
        self.cfg, self.dtype = mf.config, DTYPES[dtype]
        # Shares memory with writable float32 arrays (nothing here writes to them); read-only
        # arrays (decoded straight from a file's bytes) are copied, as torch needs writable ones.
        tensor = lambda a: torch.from_numpy(a if a.flags.writeable else np.array(a)).to(self.dtype)  # noqa: E731
        w = mf.weights
        self.embed, self.final_rms, self.lm_head = map(tensor, (w.tok_embedding, w.final_rms, w.lm_head))
        self.layers = [LayerWeights(**{f.name: tensor(getattr(layer, f.name)) for f in fields(LayerWeights)})
                       for layer in w.layers]
        self.cos, self.sin = tensor(mf.rope_cos), tensor(mf.rope_sin)

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.num_hidden_layers)

    @torch.inference_mode()
    def forward(self, ids, mask=None, cache: KVCache | None = None,
                capture: dict | None = None) -> torch.Tensor:
        """ids (B,S) ints; mask (B, p0+S) 0/1 or None for all ones. Returns logits (B,S,V)."""
        cfg = self.cfg
        NH, KVH, hd, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
        ids = np.asarray(ids)
        B, S = ids.shape
        p0 = cache.length if cache is not None else 0
        mask = np.ones((B, p0 + S), np.uint8) if mask is None else np.asarray(mask)
        check_inputs(ids, mask, cfg, past_len=p0)
        keep = capture.__setitem__ if capture is not None else (lambda name, t: None)
        ids, mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.uint8))
        cos, sin = self.cos[p0:p0 + S], self.sin[p0:p0 + S]
        bias = attention_bias(mask, p0, S, upcast(self.dtype))

        with op("embedding"):
            x = self.embed[ids]
        keep("embedding", x)
        for l, w in enumerate(self.layers):
            with op("rmsnorm"):
                a = rmsnorm(x, w.rms_attn, eps)
            with op("q_proj"):
                q = (a @ w.wq.T).view(B, S, NH, hd)
            with op("k_proj"):
                k = (a @ w.wk.T).view(B, S, KVH, hd)
            with op("v_proj"):
                v = (a @ w.wv.T).view(B, S, KVH, hd)
            with op("rope"):  # with the append to the KV cache, as in the C++ kernel
                q, k = rope(q, cos, sin), rope(k, cos, sin)
                for name, t in (("attn_norm", a), ("q", q), ("k", k), ("v", v)):
                    keep(f"layer{l}.{name}", t)
                if cache is not None:
                    k, v = cache.update(l, k, v)
            with op("attention"):
                o = attention(q, k, v, bias, cfg.n_rep)
            with op("o_proj"):
                attn_out = o.reshape(B, S, NH * hd) @ w.wo.T
            with op("rmsnorm"):  # with the residual add before it, as in the C++ kernel
                h = x + attn_out
                m = rmsnorm(h, w.rms_ffn, eps)
            with op("gate_up_swiglu"):
                gate, up = m @ w.w_gate.T, m @ w.w_up.T
                act = F.silu(gate) * up
            with op("down_proj"):
                ffn_out = act @ w.w_down.T
                x = h + ffn_out
            for name, t in (("attn_heads", o), ("attn_out", attn_out), ("attn_residual", h),
                            ("ffn_norm", m), ("gate", gate), ("up", up), ("ffn_out", ffn_out),
                            ("residual", x)):
                keep(f"layer{l}.{name}", t)
        with op("rmsnorm"):
            final = rmsnorm(x, self.final_rms, eps)
        with op("head"):
            logits = final @ self.lm_head.T
        keep("final_norm", final)
        keep("logits", logits)
        return logits
