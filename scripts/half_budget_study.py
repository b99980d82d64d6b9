#!/usr/bin/env python3
"""How far from the exact answer correct and one-step-worse half-precision engines land, in
units of PyTorch's own error: the measurements behind compare's bfloat16 and float16 budgets
(metrics.POLICIES, docs/engines.md "Half-precision compute").

For every model (seeded random weights, a tiny and a minimind2-small-shaped config) and
compute dtype, with float64 torch as the exact answer and "error" = max |x - float64| over
unpadded rows:

    torch     PyTorch's own error in the dtype (reference.py, as HF transformers computes):
              the unit every other column is measured in, i.e. the budget's noise
    numpy     the numpy test engine in the dtype (float32 accumulation, its own op order):
              a correct engine, must stay under the factor
    hf        HF transformers' LlamaForCausalLM in the dtype (when installed): another correct one
    decode    torch's KV-cache decode (prefill S-4, 4 one-token steps) vs the full forward
    bad       the numpy engine accumulating every dot product in the dtype (--bug
              half-accumulate): one rounding step worse, must land over the factor
    inter     the largest ratio over all intermediates of numpy's error to torch's there
              (the per-intermediate budgets use the same factor)

    python scripts/half_budget_study.py                   # tiny shapes, 6 seeds, ~1 min
    python scripts/half_budget_study.py --minimind 2      # + 2 minimind2-small-shaped models
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "engines"))

from numpy_engine import run_model  # noqa: E402

from xvalid.backends import TorchBackend  # noqa: E402
from xvalid.config import PRESETS, ModelConfig  # noqa: E402
from xvalid.generate import generate_model  # noqa: E402
from xvalid.modelfile import write_model  # noqa: E402

TINY_SHAPES = {  # name -> (config, batch, seq, padded rows)
    "tiny": (ModelConfig(), 3, 8, 2),
    "tiny-L4-S16": (ModelConfig(num_hidden_layers=4), 2, 16, 1),
    "H128-mha": (ModelConfig(hidden_size=128, num_attention_heads=8, num_key_value_heads=8,
                             vocab_size=256), 2, 12, 1),
}


def max_err(a, exact, keep) -> float:
    return float(np.abs(np.asarray(a, np.float64) - exact)[keep].max())


def hf_logits(mf, dtype: str):
    """LlamaForCausalLM in `dtype` on the file's inputs, or None without transformers."""
    try:
        import torch
        sys.path.insert(0, str(REPO / "tests"))
        import transformers
        from test_reference import hf_model
    except ImportError:
        return None
    model = hf_model(transformers, mf).to(getattr(torch, dtype))
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(mf.input_ids.astype(np.int64)),
                    attention_mask=torch.from_numpy(mf.attention_mask.astype(np.int64)))
    return out.logits.float().numpy()


def study(name: str, mf, path: Path, dtypes: list[str], with_hf: bool) -> list[dict]:
    keep = mf.attention_mask.astype(bool)
    exact, exact_inter = TorchBackend(mf, "float64").forward(mf.input_ids, mf.attention_mask,
                                                             capture=True)
    rows = []
    for dtype in dtypes:
        torch_half = TorchBackend(mf, dtype)
        logits, inter = torch_half.forward(mf.input_ids, mf.attention_mask, capture=True)
        noise = max_err(logits, exact, keep)
        numpy_logits, numpy_inter = run_model(path, dtype)
        bad, _ = run_model(path, dtype, bug="half-accumulate", intermediates=False)
        S = mf.seq_len
        decoded = torch_half.decode(mf.input_ids, mf.attention_mask, S - 4)
        decode_err = max_err(decoded, exact[:, S - 4:], keep[:, S - 4:])
        inter_ratio = max(max_err(numpy_inter[k], exact_inter[k], keep) /
                          max(max_err(inter[k], exact_inter[k], keep), 1e-30) for k in inter)
        hf = hf_logits(mf, dtype) if with_hf else None
        rows.append({"model": name, "dtype": dtype, "absmax": float(np.abs(exact[keep]).max()),
                     "torch": noise, "numpy": max_err(numpy_logits, exact, keep) / noise,
                     "hf": None if hf is None else max_err(hf, exact, keep) / noise,
                     "decode": decode_err / noise, "bad": max_err(bad, exact, keep) / noise,
                     "inter": inter_ratio})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=6, help="seeds per tiny shape")
    p.add_argument("--minimind", type=int, default=0, help="minimind2-small-shaped models")
    p.add_argument("--dtypes", default="bfloat16,float16")
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    args = p.parse_args()
    dtypes = args.dtypes.split(",")
    models = [(f"{shape}/s{seed}", cfg, b, s, pad, seed)
              for shape, (cfg, b, s, pad) in TINY_SHAPES.items() for seed in range(args.seeds)]
    models += [(f"minimind2-small/s{seed}", PRESETS["minimind2-small"], 2, 12, 1, seed)
               for seed in range(args.minimind)]
    rows = []
    header = f"{'model':24} {'dtype':9} {'|logits|':>8} {'torch err':>9} {'numpy':>6} " \
             f"{'hf':>6} {'decode':>6} {'bad':>6} {'inter':>6}   (ratios to torch err)"
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg, b, s, pad, seed in models:
            mf = generate_model(cfg, batch_size=b, seq_len=s, seed=seed, pad=pad)
            path = Path(tmp) / "m.json"
            write_model(mf, path, progress=False)
            for r in study(name, mf, path, dtypes, not args.no_hf):
                rows.append(r)
                hf = "-" if r["hf"] is None else f"{r['hf']:.2f}"
                print(f"{r['model']:24} {r['dtype']:9} {r['absmax']:8.3f} {r['torch']:9.2e} "
                      f"{r['numpy']:6.2f} {hf:>6} {r['decode']:6.2f} {r['bad']:6.2f} "
                      f"{r['inter']:6.2f}", flush=True)
    print("\nper dtype: torch error range; worst correct ratio (numpy, hf, decode, inter); "
          "smallest bad ratio")
    for dtype in dtypes:
        sel = [r for r in rows if r["dtype"] == dtype]
        good = max(max(r[k] for k in ("numpy", "decode", "inter") if r[k] is not None)
                   for r in sel)
        hf = [r["hf"] for r in sel if r["hf"] is not None]
        print(f"{dtype:9} torch err {min(r['torch'] for r in sel):.2e} .. "
              f"{max(r['torch'] for r in sel):.2e}; worst correct {max([good, *hf]):.2f} "
              f"(hf {max(hf) if hf else float('nan'):.2f}); smallest bad "
              f"{min(r['bad'] for r in sel):.2f}")


if __name__ == "__main__":
    main()
