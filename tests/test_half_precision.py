"""Half-precision compute: `xvalid compare --dtype bfloat16|float16`.

The budget is PyTorch's own error in the dtype against float64 (4 x its max error, and an RMSE
no worse than 1.5 x its RMSE), pinned here from numbers computed independently (the numpy
engine's float64 forward is the exact answer). PyTorch passes it by construction; the numpy
engine computing in the dtype (float32 accumulation, as PyTorch's CPU kernels) passes; the same
engine accumulating its dot products in the dtype (one rounding step worse) fails, first at
layer 0's q; every classic engine bug is still caught where it first shows. The engine is told
the dtype ({dtype}, XVALID_DTYPE) and says what it computed in (engine.json, or {dtype} in its
command); one that does not say is reported, never silently taken at its word.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ENGINES, compare_json, engine_row, run_xvalid
from test_compare import BUGS
from xvalid.metrics import POLICIES
from xvalid.modelfile import read_model
from xvalid.reference import Reference

sys.path.insert(0, str(ENGINES))
from numpy_engine import run_model  # noqa: E402  (independent numpy forward pass)

NUMPY = f"{sys.executable} {ENGINES / 'numpy_engine.py'}"
ENGINE = f"{NUMPY} {{model}} {{out}} --dtype {{dtype}}"
HALF = ["bfloat16", "float16"]
FACTOR, RMSE_FACTOR = 4.0, 1.5  # the rule docs/engines.md states
ULP = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -10}
SCHEMA = Path(__file__).parent.parent / "python" / "xvalid" / "schemas" / "compare-report.schema.json"


def errors(cand: np.ndarray, exact: np.ndarray, keep: np.ndarray) -> tuple[float, float]:
    """(max abs, RMS) of cand - exact over unpadded rows, in float64."""
    diff = np.abs(np.asarray(cand, np.float64) - exact)[keep]
    return float(diff.max()), float(np.sqrt(np.mean(diff ** 2)))


def row(report: dict, name: str) -> dict:
    return next(c for c in report["candidates"] if c["name"] == name)


# ---- the rule ------------------------------------------------------------------------------------


def test_half_policies_on_their_own_numbers():
    """atol = max(4 x noise, one ulp x max(1, max|logits|)); RMSE <= 1.5 x PyTorch's RMSE."""
    bf16, fp16 = POLICIES["bfloat16"], POLICIES["float16"]
    assert bf16.atol(0.01, 0.5) == pytest.approx(0.04)
    assert bf16.atol(1e-4, 0.5) == pytest.approx(2 ** -8)
    assert bf16.atol(1e-4, 3.0) == pytest.approx(3 * 2 ** -8)
    assert fp16.atol(1e-3, 2.0) == pytest.approx(4e-3)
    assert fp16.atol(1e-4, 2.0) == pytest.approx(2 * 2 ** -10)
    assert bf16.rmse_max(2e-3) == pytest.approx(3e-3) and fp16.rmse_max(1e-4) == pytest.approx(1.5e-4)
    assert POLICIES["float32"].rmse_max(1.0) is None
    assert bf16.rtol == fp16.rtol == 0.0


@pytest.mark.parametrize("dtype", HALF)
def test_torch_in_half_passes_its_own_budget_by_construction(cli, tmp_path, bug_model, dtype):
    """The torch candidate is PyTorch in the dtype: its error vs float64 is the noise itself,
    so it uses exactly 1/4 of the atol and 1/1.5 of the RMSE bound, decode included."""
    result, report = compare_json(cli, tmp_path, bug_model, "--dtype", dtype, "--decode", 3)
    assert result.code == 0, result.out + result.err
    mf = read_model(bug_model)
    keep = mf.attention_mask.astype(bool)
    exact, _ = run_model(bug_model)  # numpy, float64
    half = Reference(mf, dtype).forward(mf.input_ids, mf.attention_mask).float().numpy()
    noise, noise_rmse = errors(half, exact, keep)
    assert noise > 10 * ULP[dtype] * 1e-3, "the half result must be coarser than float32's"
    tol = report["tolerance"]
    assert tol["dtype"] == dtype and tol["compared_with"] == "float64"
    assert tol["reference_noise"] == pytest.approx(noise, rel=1e-6)
    assert FACTOR * noise > ULP[dtype] * max(1.0, np.abs(exact[keep]).max()), "noise decides"
    assert tol["atol"] == pytest.approx(FACTOR * noise, rel=1e-6)
    assert tol["rmse_max"] == pytest.approx(RMSE_FACTOR * noise_rmse, rel=1e-6)
    assert tol["atol_source"] == f"4 x PyTorch {dtype} error vs float64 ({noise:.2g})"
    assert tol["rmse_source"] == f"1.5 x PyTorch {dtype} RMSE vs float64 ({noise_rmse:.2g})"
    torch_row = report["candidates"][0]
    assert torch_row["compute_dtype"] == {"asked": dtype, "actual": dtype, "source": "backend"}
    metrics = torch_row["metrics"]
    assert metrics["budget_used"] == pytest.approx(1 / FACTOR, rel=1e-6)
    assert metrics["rmse_budget_used"] == pytest.approx(1 / RMSE_FACTOR, rel=1e-6)
    assert torch_row["decode"]["status"] == "pass"
    assert (f"tolerance (compute dtype {dtype}): atol {tol['atol']:.2e} (4 x PyTorch {dtype} "
            f"error vs float64 ({noise:.2g}))") in result.out


# ---- a correct engine, and one a rounding step worse ----------------------------------------------


@pytest.mark.parametrize("dtype", HALF)
def test_a_correct_half_precision_engine_passes(cli, tmp_path, bug_model, dtype):
    """The numpy engine in the dtype: within budget on the logits, every intermediate and every
    decode step; its error is measured against float64, the exact answer."""
    result, report = compare_json(cli, tmp_path, bug_model, "--dtype", dtype, "--decode", 3,
                                  "--engine", ENGINE)
    assert result.code == 0, result.out + result.err
    eng = engine_row(report)
    assert eng["compute_dtype"] == {"asked": dtype, "actual": dtype, "source": "engine.json"}
    assert eng["divergence"]["first"] is None and eng["decode"]["status"] == "pass"
    assert all("rmse_budget" in p for p in eng["divergence"]["points"])
    mf = read_model(bug_model)
    keep = mf.attention_mask.astype(bool)
    exact, _ = run_model(bug_model)
    cand, _ = run_model(bug_model, dtype, intermediates=False)
    max_abs, rmse = errors(cand, exact, keep)
    assert eng["metrics"]["max_abs"] == pytest.approx(max_abs, rel=1e-9)
    assert eng["metrics"]["rmse"] == pytest.approx(rmse, rel=1e-9)
    assert eng["metrics"]["rmse_budget_used"] < 0.8  # PyTorch's own: 1 / 1.5


@pytest.mark.parametrize("dtype", HALF)
def test_an_engine_one_rounding_step_worse_than_pytorch_fails(cli, tmp_path, bug_model, dtype):
    """Dot products accumulated in the dtype: its max error stays near PyTorch's (within atol)
    but its RMSE is about twice PyTorch's; the RMSE bound fails it, first at layer 0's q (the
    first matmul), and in every decode step."""
    result, report = compare_json(cli, tmp_path, bug_model, "--dtype", dtype, "--decode", 3,
                                  "--engine", ENGINE + " --bug half-accumulate")
    assert result.code == 1, result.out + result.err
    eng = engine_row(report)
    assert eng["status"] == "fail" and eng["metrics"]["rmse_budget_used"] > 1.1
    first = eng["divergence"]["first"]
    assert (first["layer"], first["point"]) == (0, "q")
    assert eng["decode"]["status"] == "fail" and eng["decode"]["first_failing_step"] == 1
    assert f"logits RMSE {eng['metrics']['rmse']:.2e} > " in result.out
    assert f"(1.5 x PyTorch {dtype} RMSE vs float64" in result.out


def test_every_classic_bug_is_still_caught_at_the_bfloat16_budget(cli, tmp_path, bug_model):
    """The bugs of test_compare.py, planted into the numpy engine computing in bfloat16 (the
    loosest budget): each fails where it first shows; the KV-cache bug in decode only."""
    engines = [arg for bug in [*BUGS, "kv-cache-position"]
               for arg in ("--engine", f"{bug}={ENGINE} --bug {bug}")]
    result, report = compare_json(cli, tmp_path, bug_model, "--dtype", "bfloat16", "--decode", 3,
                                  *engines)
    assert result.code == 1, result.out + result.err
    for bug, (layer, point) in BUGS.items():
        first = row(report, bug)["divergence"]["first"]
        assert row(report, bug)["status"] == "fail", bug
        assert (first["layer"], first["point"]) == (layer, point), bug
        assert row(report, bug)["metrics"]["pass"] is False, bug
    kv = row(report, "kv-cache-position")
    assert kv["metrics"]["pass"] and kv["divergence"]["first"] is None
    assert kv["status"] == "fail" and kv["decode"]["first_failing_step"] == 2


def test_acceptance_correct_engine_passes_and_broken_one_fails(tmp_path, bug_model):
    """`xvalid compare m.json --backends torch --engine '... {model} {out}' --dtype bfloat16`,
    as a user runs it; the report states the budget's source."""
    base = ["compare", bug_model, "--backends", "torch", "--repeat", 1, "--dtype", "bfloat16"]
    good = run_xvalid(*base, "--engine", f"{NUMPY} {{model}} {{out}} --dtype bfloat16")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "4 x PyTorch bfloat16 error vs float64" in good.stdout and "PASS" in good.stdout
    bad = run_xvalid(*base, "--engine",
                     f"{NUMPY} {{model}} {{out}} --dtype bfloat16 --bug half-accumulate")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "verdict: FAIL" in bad.stdout and "1.5 x PyTorch bfloat16 RMSE vs float64" in bad.stdout


# ---- what each candidate computes in -------------------------------------------------------------


def test_each_candidate_says_what_it_computes_in(cli, tmp_path, bug_model):
    """engine.json, {dtype} in the command, the environment, a backend's registry entry; an
    engine that says nothing is judged and named as unverified, never silently passed; a
    float32 candidate is held to the half budget with a line saying what that means."""
    jsonschema = pytest.importorskip("jsonschema")
    replay = tmp_path / "replay.py"  # copies bfloat16 logits it did not compute, says nothing
    cand, _ = run_model(bug_model, "bfloat16", intermediates=False)
    np.save(tmp_path / "logits.npy", cand.astype(np.float32))
    replay.write_text("import shutil, sys\nshutil.copy(sys.argv[1], sys.argv[2])\n")
    copy = f"{sys.executable} {replay} {tmp_path / 'logits.npy'} {{out}}"
    engines = {
        "told": ENGINE,                                                  # engine.json
        "env": f"{NUMPY} {{model}} {{out}} --dtype $XVALID_DTYPE",       # engine.json
        "placeholder": f"{copy} # {{dtype}}",                            # {dtype}, no file
        "silent": copy,                                                  # nothing: unknown
        "f32": f"{NUMPY} {{model}} {{out}} --dtype float32",             # engine.json: float32
    }
    args = [a for name, cmd in engines.items() for a in ("--engine", f"{name}={cmd}")]
    result, report = compare_json(cli, tmp_path, bug_model, "--dtype", "bfloat16",
                                  "--backends", "torch,cpp", *args)
    assert result.code == 0, result.out + result.err
    jsonschema.validate(report, json.loads(SCHEMA.read_text()))
    computes = {c["name"]: (c["compute_dtype"]["actual"], c["compute_dtype"]["source"])
                for c in report["candidates"]}
    assert computes == {"torch": ("bfloat16", "backend"), "cpp": ("float32", "backend"),
                        "told": ("bfloat16", "engine.json"), "env": ("bfloat16", "engine.json"),
                        "placeholder": ("bfloat16", "{dtype} in its command"),
                        "silent": (None, "unknown"), "f32": ("float32", "engine.json")}
    assert [(u["candidate"], u["check"]) for u in report["unchecked"]] == [("silent", "dtype")]
    assert "silent: compute dtype unknown (asked bfloat16 via XVALID_DTYPE" in result.out
    assert "cpp computes in float32, not bfloat16 (backend): held to the bfloat16 budget" in result.out
    assert "f32 computes in float32, not bfloat16 (engine.json)" in result.out
    f32_atol = report["tolerance"]["float32_atol"]
    assert 0 < f32_atol < report["tolerance"]["atol"] / 100
    assert f"its float32 budget would be {f32_atol:.2e}" in result.out
    assert "compute dtype not verified: silent" in result.out
    quiet = cli("compare", bug_model, "--backends", "", "--dtype", "bfloat16", "-q",
                "--engine", f"silent={copy}")
    assert quiet.code == 0
    assert quiet.out.splitlines() == [
        "NOTE compute dtype not verified: silent (asked to compute in bfloat16 (XVALID_DTYPE), "
        "but its command has no {dtype} and it wrote no engine.json: what it computed in is "
        "unknown)", f"PASS {bug_model}"]


def test_at_float32_an_engine_that_says_nothing_is_taken_as_float32(cli, tmp_path, bug_model):
    result, report = compare_json(cli, tmp_path, bug_model, "--engine",
                                  f"{NUMPY} {{model}} {{out}} --seed-style")
    assert result.code == 0, result.out + result.err
    assert engine_row(report)["compute_dtype"]["actual"] == "float32"
    assert report["unchecked"] == [] and "computes in" not in result.out


@pytest.mark.parametrize("text,needle", [
    ('{"dtype": "bf16"}', "engine.json: dtype must be one of float64, float32, bfloat16, float16, "
                          "got 'bf16'"),
    ("[1]", "engine.json: expected a JSON object, got list"),
    ("{dtype", "engine.json: not valid JSON"),
])
def test_a_malformed_engine_json_is_an_engine_error(cli, tmp_path, bug_model, text, needle):
    info = tmp_path / "info.json"
    info.write_text(text)
    command = f"{NUMPY} {{model}} {{out}} && cp {info} {{out}}/engine.json"
    result, report = compare_json(cli, tmp_path, bug_model, "--dtype", "bfloat16",
                                  "--engine", f"eng={command}")
    assert result.code == 3, result.out + result.err
    assert engine_row(report)["error"].startswith("eng: " + needle)


def test_a_given_atol_replaces_the_whole_half_budget(cli, tmp_path, bug_model):
    """--atol is the user's budget: no RMSE bound on top, so the one-step-worse engine passes."""
    result, report = compare_json(cli, tmp_path, bug_model, "--dtype", "bfloat16", "--atol", 0.1,
                                  "--engine", ENGINE + " --bug half-accumulate")
    assert result.code == 0, result.out + result.err
    tol = report["tolerance"]
    assert tol["atol"] == 0.1 and tol["atol_source"] == "--atol" and tol["rmse_max"] is None
    assert engine_row(report)["metrics"]["rmse_budget_used"] is None


def test_an_unknown_dtype_is_a_usage_error(cli, bug_model):
    cli("compare", bug_model, "--dtype", "int8").assert_one_line_error(2, "--dtype", "int8")


def test_run_writes_half_precision_logits_as_float32(cli, tmp_path, bug_model):
    out = tmp_path / "l.npy"
    result = cli("run", bug_model, "--dtype", "bfloat16", "-o", out)
    assert result.code == 0, result.err
    logits = np.load(out)
    mf = read_model(bug_model)
    expected = Reference(mf, "bfloat16").forward(mf.input_ids, mf.attention_mask).float().numpy()
    assert logits.dtype == np.float32 and np.array_equal(logits, expected)
    cli("run", bug_model, "--backend", "cpp", "--dtype", "bfloat16").assert_one_line_error(
        2, "--dtype bfloat16 is for the torch backend only")
