"""Agreement metrics between a candidate's tensors and the reference's.

All metrics are taken over unpadded rows only (docs/model.md: a fully padded query row is
not meaningful) and computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TolerancePolicy:
    """How a compute dtype's default tolerance is derived from PyTorch's own error in it.

    atol = max(noise_factor * noise, atol_floor * max(1, max|reference logits|)), where noise is
    the max abs difference between PyTorch's result in the dtype and the float64 one. Two
    correct float32 implementations differ by a small multiple of that noise (summation
    order); real bugs are orders of magnitude larger.

    Half dtypes add an RMS bound: RMSE <= rmse_factor * PyTorch's RMSE against float64. In
    bfloat16 and float16 the max error of a correct engine scatters around PyTorch's (0.8x to
    1.7x measured) as much as that of an engine one rounding step worse (1.7x up), so the max
    alone cannot tell them apart on small models; the RMSE can (correct <= 1.05x, one step
    worse >= 2.0x). docs/engines.md has the measurements (scripts/half_budget_study.py).
    """

    dtype: str
    noise_factor: float
    atol_floor: float
    rtol: float = 0.0
    rmse_factor: float | None = None  # None: no RMS bound (float32)

    def atol(self, noise: float, ref_absmax: float) -> float:
        return max(self.noise_factor * noise, self.atol_floor * max(1.0, ref_absmax))

    def rmse_max(self, noise_rmse: float) -> float | None:
        return None if self.rmse_factor is None else self.rmse_factor * noise_rmse


# The half floors are one unit in the last place at max(1, |value|): 2^-8 for bfloat16,
# 2^-10 for float16.
POLICIES = {"float32": TolerancePolicy("float32", noise_factor=100.0, atol_floor=1e-6),
            "bfloat16": TolerancePolicy("bfloat16", noise_factor=4.0, atol_floor=2.0 ** -8,
                                        rmse_factor=1.5),
            "float16": TolerancePolicy("float16", noise_factor=4.0, atol_floor=2.0 ** -10,
                                       rmse_factor=1.5)}
COMPUTE_DTYPES = tuple(POLICIES)


def within(diff: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> np.ndarray:
    return diff <= atol + rtol * np.abs(ref)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def nonfinite(cand: np.ndarray, keep: np.ndarray) -> dict | None:
    """Count and first location (b, s, index) of NaN/Inf on unpadded rows."""
    bad = ~np.isfinite(cand) & keep.reshape(keep.shape + (1,) * (cand.ndim - 2))
    if not bad.any():
        return None
    first = [int(i) for i in np.argwhere(bad)[0]]
    return {"count": int(bad.sum()), "first": first, "value": str(cand[tuple(first)])}


def logit_metrics(cand: np.ndarray, ref: np.ndarray, keep: np.ndarray, atol: float,
                  rtol: float, top1_margin: float, rmse_max: float | None = None) -> dict:
    """cand, ref (B,S,V); keep (B,S) bool. Everything a verdict or a person needs; rmse_max
    (half dtypes) bounds the RMSE as well."""
    bad = nonfinite(cand, keep)
    c, r = cand[keep].astype(np.float64), ref[keep].astype(np.float64)  # (rows, V)
    rows = np.argwhere(keep)
    finite = np.isfinite(c)
    diff = np.where(finite, np.abs(c - r), np.inf)
    flat = int(np.argmax(diff))
    row, token = divmod(flat, r.shape[1])
    scale = max(np.abs(r).max(), 1e-30)
    out = {
        "max_abs": float(diff.max()),
        "max_abs_at": {"batch": int(rows[row][0]), "position": int(rows[row][1]), "token": int(token)},
        "mean_abs": float(diff.mean()),
        "rmse": float(np.sqrt(np.mean(diff ** 2))),
        "max_rel": float((diff / np.maximum(np.abs(r), 1e-6 * scale)).max()),
        "nonfinite": bad,
    }
    if bad is None:
        dot = float((c * r).sum())
        out["cosine"] = dot / max(float(np.linalg.norm(c) * np.linalg.norm(r)), 1e-300)
        out["nmse"] = float(((c - r) ** 2).sum() / max(float((r ** 2).sum()), 1e-300))
        logp_r, logp_c = _log_softmax(r), _log_softmax(c)
        kl = (np.exp(logp_r) * (logp_r - logp_c)).sum(-1)
        out["kl_mean"], out["kl_max"] = float(kl.mean()), float(kl.max())
    else:
        out["cosine"] = out["nmse"] = out["kl_mean"] = out["kl_max"] = None
    # Top-1 agreement where the reference's top-1 is decisive: a candidate within tolerance
    # cannot flip a row whose margin exceeds twice the tolerance.
    top2 = np.sort(r, axis=-1)[:, -2:] if r.shape[1] > 1 else np.zeros((len(r), 2))
    decisive = (top2[:, 1] - top2[:, 0]) > top1_margin
    agree = (np.argmax(np.where(finite, c, -np.inf), -1) == np.argmax(r, -1)) & decisive
    out["top1"] = {"agree": int(agree.sum()), "decisive_rows": int(decisive.sum()),
                   "rows": int(len(r)), "margin_threshold": float(top1_margin)}
    out["budget_used"] = float((diff / (atol + rtol * np.abs(r))).max())
    out["min_passing_atol"] = float(np.maximum(diff - rtol * np.abs(r), 0).max())
    out["rmse_budget_used"] = None if rmse_max is None else share(out["rmse"], rmse_max)
    out["pass"] = bool(bad is None and within(diff, r, atol, rtol).all()
                       and out["top1"]["agree"] == out["top1"]["decisive_rows"]
                       and (rmse_max is None or out["rmse"] <= rmse_max))
    return out


def share(value: float, budget: float) -> float:
    """value / budget; a zero budget is met only by zero (0 -> 0.0, anything else -> inf)."""
    return value / budget if budget > 0 else (0.0 if value == 0 else float("inf"))


def tensor_rmse(cand: np.ndarray, ref: np.ndarray, keep: np.ndarray) -> float:
    """RMS of cand - ref over unpadded rows, in float64; inf for NaN/Inf."""
    c, r = cand[keep].astype(np.float64), ref[keep].astype(np.float64)
    if c.size == 0:
        return 0.0
    if not np.isfinite(c).all():
        return float("inf")
    return float(np.sqrt(np.mean((c - r) ** 2)))


def tensor_error(cand: np.ndarray, ref: np.ndarray, keep: np.ndarray) -> tuple[float, float]:
    """(max abs error, max |ref|) of one intermediate (B,S,...) over unpadded rows; inf for NaN."""
    c, r = cand[keep].astype(np.float64), ref[keep].astype(np.float64)
    if c.size == 0:
        return 0.0, 0.0
    diff = np.abs(c - r)
    err = float(np.inf) if not np.isfinite(c).all() else float(diff.max())
    return err, float(np.abs(r).max())
