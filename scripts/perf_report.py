"""Measure the fast C++ kernel against PyTorch eager and the machine's roofs, in one process.

    .venv/bin/python scripts/perf_report.py [--threads 2] [--repeat 9] [--json perf.json]

Prints the table of docs/performance.md (markdown) and, with --json, every sample. Each case
times torch and the C++ kernel alternately in the same process at the same thread count and
reports medians, so machine noise hits both alike; the roofs (torch's 2048^3 sgemm for compute,
a 256 MiB tensor copy for memory bandwidth) are measured in the same run, by the code xvalid
bench uses (xvalid.bench.roofs), as are the flop and weight-byte counts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from xvalid.backends import CppBackend, TorchBackend
from xvalid.bench.machine import machine_info
from xvalid.bench.roofs import forward_flops, measure_roofs, weight_bytes_per_step
from xvalid.config import PRESETS
from xvalid.generate import generate_model
from xvalid.modelfile import write_model

REPO = Path(__file__).resolve().parents[1]


def alternate(fns: dict, repeat: int) -> dict[str, tuple[float, list[float]]]:
    """Median ms of each function, run in turn (a, b, a, b, ...) after one warmup each."""
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: (statistics.median(s), s) for name, s in samples.items()}


def roofs(repeat: int) -> dict:
    """The roofs at torch's current thread count, measured as xvalid bench measures them."""
    measured = measure_roofs(repeat=repeat)
    return {"sgemm_gflops": measured["sgemm_gflops"], "copy_gbs": measured["copy_gbs"]}


def make_model(tmp: Path, preset: str, B: int, S: int, name: str):
    cfg = PRESETS[preset]
    mf = generate_model(cfg, batch_size=B, seq_len=S, seed=1, pad=0)
    path = tmp / f"{name}.json"
    write_model(mf, path, progress=False)
    return mf, path


def prefill_case(tmp, preset, B, S, threads, repeat, profile=False) -> dict:
    mf, path = make_model(tmp, preset, B, S, f"{preset}-b{B}-s{S}")
    torch_b, cpp = TorchBackend(mf), CppBackend(path)
    torch_b.set_threads(threads)
    cpp.set_threads(threads)
    ids, mask = mf.input_ids, mf.attention_mask
    timed = alternate({"torch": lambda: torch_b.forward(ids, mask),
                       "cpp": lambda: cpp.forward(ids, mask)}, repeat)
    flops = forward_flops(mf.config, B, S)
    result = {"case": f"{preset} B{B} S{S} prefill", "torch_ms": timed["torch"][0],
              "cpp_ms": timed["cpp"][0], "ratio": timed["torch"][0] / timed["cpp"][0],
              "cpp_gflops": flops / timed["cpp"][0] * 1e-6,
              "torch_gflops": flops / timed["torch"][0] * 1e-6,
              "samples": {k: v[1] for k, v in timed.items()}}
    if profile:
        result["profile"] = cpp.profile(ids, mask, repeat=3)
    return result


def profile_markdown(rows: list[dict], title: str) -> str:
    total = sum(r["seconds"] for r in rows)
    lines = [f"Per-op profile of the fast kernel, {title} (3 forwards):", "",
             "| op | calls | ms per forward | share | GFLOP/s | GB/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['calls'] // 3} | {r['seconds'] / 3 * 1e3:.2f} | "
                     f"{100 * r['seconds'] / total:.1f}% | {r['flops'] / r['seconds'] * 1e-9:.1f} | "
                     f"{r['bytes'] / r['seconds'] * 1e-9:.1f} |")
    return "\n".join(lines)


def decode_case(tmp, preset, context, steps, threads, repeat) -> dict:
    mf, path = make_model(tmp, preset, 1, context + steps, f"{preset}-decode")
    ids, mask = mf.input_ids, mf.attention_mask
    result = {"case": f"{preset} decode 1 token at context {context}, B1"}
    per_token = {}
    for name, backend in (("torch", TorchBackend(mf)), ("cpp", CppBackend(path))):
        backend.set_threads(threads)
        samples = []
        for _ in range(max(1, repeat // 3)):
            backend.reset_cache()
            backend.step(ids[:, :context], mask[:, :context])
            for t in range(context, context + steps):
                start = time.perf_counter()
                backend.step(ids[:, t:t + 1], mask[:, :t + 1])
                samples.append((time.perf_counter() - start) * 1e3)
        per_token[name] = statistics.median(samples[1:])  # the first step warms up
        result[f"{name}_samples"] = samples
    weight_gb = weight_bytes_per_step(mf.config) * 1e-9
    result.update(torch_ms=per_token["torch"], cpp_ms=per_token["cpp"],
                  ratio=per_token["torch"] / per_token["cpp"],
                  cpp_tok_s=1e3 / per_token["cpp"], torch_tok_s=1e3 / per_token["torch"],
                  cpp_weight_gbs=weight_gb / per_token["cpp"] * 1e3,
                  torch_weight_gbs=weight_gb / per_token["torch"] * 1e3)
    return result


def dev_loop_case(tmp, runs: int = 3) -> dict:
    """Seconds from touching a kernel file to `xvalid compare tiny.json -q` returning."""
    xvalid = str(Path(sys.executable).parent / "xvalid")
    model = tmp / "tiny.json"
    subprocess.run([xvalid, "generate", "-o", model], check=True, capture_output=True)
    subprocess.run([xvalid, "compare", model, "-q"], check=True, capture_output=True)
    out = {}
    for source in ("csrc/kernel/ops.cpp", "csrc/kernel/fast/simd_ops.cpp"):
        times = []
        for _ in range(runs):
            os.utime(REPO / source)
            start = time.perf_counter()
            subprocess.run([xvalid, "compare", model, "-q"], check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        out[source] = times
    return {"case": "edit one kernel file, then xvalid compare tiny.json -q",
            "seconds": out, "median_s": statistics.median(t for ts in out.values() for t in ts)}


def runner_memory_case(tmp, preset="minimind2-small", B=1, S=128) -> dict:
    """Peak resident memory of xvalid-run against the weight bytes and activations."""
    mf, path = make_model(tmp, preset, B, S, f"{preset}-mem")
    runner = shutil.which("xvalid-run", path=str(Path(sys.executable).parent))
    cfg = mf.config
    rows = B * S
    q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    activations = 4 * rows * (4 * cfg.hidden_size + 2 * q_dim + 2 * kv_dim
                              + 3 * cfg.intermediate_size + cfg.vocab_size)
    kv_cache = 4 * 2 * cfg.num_hidden_layers * B * S * kv_dim
    weights = 4 * (cfg.num_parameters + 2 * cfg.max_position_embeddings * cfg.head_dim)
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", runner, path, tmp / "out"],
                          capture_output=True, text=True, check=True)
    peak = int(proc.stderr.strip().splitlines()[-1]) * 1024
    budget = 1.5 * weights + activations + kv_cache
    return {"case": f"peak memory of xvalid-run, {preset} B{B} S{S}", "peak_mb": peak / 2**20,
            "weights_mb": weights / 2**20, "activations_mb": (activations + kv_cache) / 2**20,
            "limit_mb": budget / 2**20, "within": peak <= budget}


def markdown(results: dict) -> str:
    r, roof = results["cases"], results["roofs"]
    small1, small4, dec, tiny = r["prefill_small"], r["prefill_small_b4"], r["decode"], r["tiny"]
    lines = [
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
        f"{results['threads']} threads for torch and C++, fast kernel ISA "
        f"{results['machine']['isa']}, torch {torch.__version__}. Roofs in the same run: "
        f"sgemm 2048^3 {roof['sgemm_gflops']:.0f} GFLOP/s, copy {roof['copy_gbs']:.1f} GB/s "
        f"(read + write).",
        "",
        "| case | torch | cpp (fast) | measured | must reach | aim |",
        "|---|---|---|---|---|---|",
        f"| minimind2-small B1 S128 prefill | {small1['torch_ms']:.1f} ms | {small1['cpp_ms']:.1f} ms "
        f"| torch/cpp {small1['ratio']:.2f} | >= 1.0 | >= 1.2 |",
        f"| minimind2-small B4 S512 prefill | {small4['torch_ms']:.0f} ms | {small4['cpp_ms']:.0f} ms "
        f"| torch/cpp {small4['ratio']:.2f}; {small4['cpp_gflops']:.0f} GFLOP/s = "
        f"{100 * small4['cpp_gflops'] / roof['sgemm_gflops']:.0f}% of sgemm | >= 1.0 and 70% | >= 1.1 and 80% |",
        f"| minimind2-small decode 1 token at context 128, B1 | {dec['torch_ms']:.2f} ms "
        f"({dec['torch_tok_s']:.0f} tok/s) | {dec['cpp_ms']:.2f} ms ({dec['cpp_tok_s']:.0f} tok/s) "
        f"| {dec['ratio']:.2f}x torch; weights {dec['cpp_weight_gbs']:.1f} GB/s = "
        f"{100 * dec['cpp_weight_gbs'] / roof['copy_gbs']:.0f}% of copy | >= 2x, >= 60% | >= 3x |",
        f"| tiny B2 S5 forward | {tiny['torch_ms']:.3f} ms | {tiny['cpp_ms']:.3f} ms "
        f"| {tiny['ratio']:.1f}x torch | >= 10x | >= 20x |",
    ]
    if "dev_loop" in r:
        d = r["dev_loop"]
        per_file = "; ".join(f"{Path(k).name}: " + ", ".join(f"{t:.2f}" for t in v)
                             for k, v in d["seconds"].items())
        lines.append(f"| edit one kernel file, then compare tiny -q | | | median {d['median_s']:.2f} s "
                     f"({per_file}) | <= 3 s | <= 2 s |")
    if "memory" in r:
        m = r["memory"]
        lines.append(f"| peak memory of the runner, minimind2-small | | | {m['peak_mb']:.0f} MiB "
                     f"(weights {m['weights_mb']:.0f} MiB, activations + cache {m['activations_mb']:.0f} MiB) "
                     f"| <= {m['limit_mb']:.0f} MiB | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--json", type=Path, help="write every sample here")
    parser.add_argument("--skip", default="", help="comma list of: dev_loop, memory, b4")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    torch.set_num_threads(args.threads)
    from xvalid.backends import load_core
    core = load_core()
    results = {"threads": args.threads, "repeat": args.repeat,
               "machine": {"cpu": machine_info()["cpu"], "cores": os.cpu_count(),
                           "isa": core.build_info()["fast_kernel_isa"],
                           "python": platform.python_version(), "torch": torch.__version__},
               "cases": {}}
    cases = results["cases"]
    with tempfile.TemporaryDirectory(prefix="xvalid-perf-") as tmp_name:
        tmp = Path(tmp_name)
        steps = [("roofs", lambda: roofs(args.repeat)),
                 ("tiny", lambda: prefill_case(tmp, "tiny", 2, 5, args.threads, 10 * args.repeat)),
                 ("prefill_small", lambda: prefill_case(tmp, "minimind2-small", 1, 128, args.threads, args.repeat)),
                 ("decode", lambda: decode_case(tmp, "minimind2-small", 128, 32, args.threads, args.repeat))]
        if "b4" not in skip:
            steps.append(("prefill_small_b4",
                          lambda: prefill_case(tmp, "minimind2-small", 4, 512, args.threads,
                                               max(3, args.repeat // 2), profile=True)))
        if "memory" not in skip:
            steps.append(("memory", lambda: runner_memory_case(tmp)))
        if "dev_loop" not in skip:
            steps.append(("dev_loop", lambda: dev_loop_case(tmp)))
        for name, step in steps:
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            value = step()
            if name == "roofs":
                results["roofs"] = value
            else:
                cases[name] = value
    results["peak_rss_mb_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if "prefill_small_b4" not in cases:
        cases["prefill_small_b4"] = {"torch_ms": float("nan"), "cpp_ms": float("nan"),
                                     "ratio": float("nan"), "cpp_gflops": float("nan")}
    print(markdown(results))
    if "profile" in cases["prefill_small_b4"]:
        print()
        print(profile_markdown(cases["prefill_small_b4"]["profile"], "minimind2-small B4 S512"))


if __name__ == "__main__":
    main()
