#!/usr/bin/env python3
"""How far from the exact answer correct and one-step-worse half-precision engines land, in
units of PyTorch's own error: the measurements behind compare's bfloat16 and float16 budgets
(metrics.POLICIES, docs/engines.md "Half-precision compute").

For every model (seeded random weights, tiny shapes and a minimind2-small-shaped config) and
compute dtype, with float64 torch as the exact answer, each column is a pair of ratios,
max abs error / PyTorch's max abs error and RMSE / PyTorch's RMSE, over unpadded rows:

    torch     PyTorch's own error in the dtype (reference.py, as HF transformers computes):
              the unit of every other column (printed as values, not ratios)
    numpy     the numpy test engine in the dtype (float32 accumulation, its own op order):
              a correct engine, must stay under both factors
    hf        HF transformers' LlamaForCausalLM in the dtype (when installed): another correct one
    decode    torch's KV-cache decode (prefill S-4, then 4 one-token steps), each step against
              the full forward's error (max: over all positions, RMSE: at that position)
    inter     the numpy engine's intermediates, worst ratio over all of them
    bad       the numpy engine accumulating every dot product in the dtype (--bug
              half-accumulate): one rounding step worse, must land over a factor

    python scripts/half_budget_study.py                     # tiny shapes, 6 seeds, ~1 min
    python scripts/half_budget_study.py --seeds 10 --minimind 2
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


def rmse(a, exact, keep) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - exact)[keep] ** 2)))


def ratios(a, torch_result, exact, keep) -> tuple[float, float]:
    """(max error, RMSE) of a, each over PyTorch's (0/0 counts as 1: both exact)."""
    out = []
    for norm in (max_err, rmse):
        mine, theirs = norm(a, exact, keep), norm(torch_result, exact, keep)
        out.append(mine / theirs if theirs > 0 else (1.0 if mine == 0 else float("inf")))
    return out[0], out[1]


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
    S, N = mf.seq_len, 4
    rows = []
    for dtype in dtypes:
        torch_half = TorchBackend(mf, dtype)
        logits, inter = torch_half.forward(mf.input_ids, mf.attention_mask, capture=True)
        numpy_logits, numpy_inter = run_model(path, dtype)
        bad, _ = run_model(path, dtype, bug="half-accumulate", intermediates=False)
        decoded = torch_half.decode(mf.input_ids, mf.attention_mask, S - N)
        decode_max = (max_err(decoded, exact[:, S - N:], keep[:, S - N:])
                      / max_err(logits, exact, keep))
        decode_rmse = max(rmse(decoded[:, i], exact[:, p], keep[:, p]) /
                          rmse(logits[:, p], exact[:, p], keep[:, p])
                          for i, p in enumerate(range(S - N, S)) if keep[:, p].any())
        inter_ratios = [ratios(numpy_inter[k], inter[k], exact_inter[k], keep) for k in inter]
        hf = hf_logits(mf, dtype) if with_hf else None
        rows.append({"model": name, "dtype": dtype, "absmax": float(np.abs(exact[keep]).max()),
                     "torch": (max_err(logits, exact, keep), rmse(logits, exact, keep)),
                     "numpy": ratios(numpy_logits, logits, exact, keep),
                     "hf": None if hf is None else ratios(hf, logits, exact, keep),
                     "decode": (decode_max, decode_rmse),
                     "inter": tuple(max(r[i] for r in inter_ratios) for i in (0, 1)),
                     "bad": ratios(bad, logits, exact, keep)})
    return rows


def pair(value) -> str:
    return "      -    " if value is None else f"{value[0]:5.2f}/{value[1]:5.2f}"


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
    columns = ("numpy", "hf", "decode", "inter", "bad")
    print(f"{'model':24} {'dtype':9} {'|logits|':>8} {'torch max/RMSE':>17}  " +
          "  ".join(f"{c:>11}" for c in columns) + "   (max/RMSE ratios to torch's)")
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg, b, s, pad, seed in models:
            mf = generate_model(cfg, batch_size=b, seq_len=s, seed=seed, pad=pad)
            path = Path(tmp) / "m.json"
            write_model(mf, path, progress=False)
            for r in study(name, mf, path, dtypes, not args.no_hf):
                rows.append(r)
                print(f"{r['model']:24} {r['dtype']:9} {r['absmax']:8.3f} "
                      f"{r['torch'][0]:8.2e}/{r['torch'][1]:8.2e}  " +
                      "  ".join(pair(r[c]) for c in columns), flush=True)
    print("\nper dtype (max / RMSE ratios): worst correct (numpy, hf, decode, inter); "
          "smallest one step worse (bad)")
    for dtype in dtypes:
        sel = [r for r in rows if r["dtype"] == dtype]
        worst = [max(r[c][i] for r in sel for c in columns[:-1] if r[c] is not None)
                 for i in (0, 1)]
        best_bad = [min(r["bad"][i] for r in sel) for i in (0, 1)]
        print(f"{dtype:9} torch max error {min(r['torch'][0] for r in sel):.2e} .. "
              f"{max(r['torch'][0] for r in sel):.2e}; worst correct {worst[0]:.2f} / "
              f"{worst[1]:.2f}; smallest bad {best_bad[0]:.2f} / {best_bad[1]:.2f}")


if __name__ == "__main__":
    main()
