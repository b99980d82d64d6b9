"""How compare decides a verdict, pinned by values computed here, independently of xvalid.

The fixture is a model made for the purpose: B=3, S=8, a left- and a right-padded row (random
ids at the padded positions), and an untied lm_head whose rows A and B are built so that one
unpadded row (TIE_ROW) has a near tie between tokens A and B: a margin of 1.5 x atol, which a
correct candidate may flip. The expected float64 values come from tests/engines/numpy_engine.py
(numpy only, checked against an independent torch forward in test_numpy_engine.py); the float32
side is the reference under test, since the documented rule is about its rounding noise.

Candidates are "replay" engines: a tiny script copies prepared logits (and intermediates) into
the engine's output directory, so each test plants exactly the defect it is about.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ENGINES, compare_json, engine_row
from xvalid.config import ModelConfig
from xvalid.generate import generate_model
from xvalid.modelfile import write_model
from xvalid.reference import Reference

sys.path.insert(0, str(ENGINES))
from numpy_engine import run_model  # noqa: E402  (independent numpy forward pass)

NOISE_FACTOR, ATOL_FLOOR = 100.0, 1e-6  # the rule docs/engines.md states
TIE_ROW, TOKEN_A, TOKEN_B = (0, 3), 5, 6
TIE_MARGIN = 1.5  # the near tie's margin, in units of atol: under the 2 x atol threshold

REPLAY = """\
import shutil, sys
shutil.copytree(sys.argv[1], sys.argv[2], dirs_exist_ok=True)
"""


def documented_atol(noise: float, absmax: float) -> float:
    return max(NOISE_FACTOR * noise, ATOL_FLOOR * max(1.0, absmax))


@dataclass
class Fixture:
    path: Path
    keep: np.ndarray  # (B,S) bool, unpadded positions
    ref32: np.ndarray  # (B,S,V) the float32 reference's logits
    exact: np.ndarray  # (B,S,V) float64, numpy engine
    exact_inter: dict  # name -> float64 intermediate, numpy engine
    ref32_inter: dict  # name -> float32 intermediate, the reference
    noise: float  # max |float32 reference - float64| on unpadded rows
    atol: float  # the documented rule applied to that noise
    replay: Path  # the replay engine script

    @property
    def rows(self) -> int:
        """Unpadded positions: the rows every logit metric is over."""
        return int(self.keep.sum())

    def margins(self) -> np.ndarray:
        """(B,S) top-1 minus top-2 of the float32 reference (what top-1 agreement is about)."""
        top2 = np.sort(self.ref32.astype(np.float64), axis=-1)[..., -2:]
        return top2[..., 1] - top2[..., 0]


def _with_tie(mf, final_norm: np.ndarray, margin: float):
    """Untie lm_head and set rows A and B along the tie row's final hidden state, so that row's
    logits for A and B are its two largest, B above A by `margin`."""
    f = final_norm[TIE_ROW].astype(np.float64)  # (H,)
    top = float((mf.weights.tok_embedding.astype(np.float64) @ f).max())  # the row's top-1 logit
    level = max(top, 0.0) + 0.1
    head = mf.weights.tok_embedding.copy()
    head[TOKEN_A] = (level / (f @ f)) * f
    head[TOKEN_B] = ((level + margin) / (f @ f)) * f
    mf.weights.lm_head = head.astype(np.float32)
    return mf


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Fixture:
    root = tmp_path_factory.mktemp("verdicts")
    path = root / "tie.json"
    mf = generate_model(ModelConfig(), batch_size=3, seq_len=8, seed=11, pad=2)
    write_model(mf, path, progress=False)
    _, inter = run_model(path)
    # The tie's margin is set in units of the atol of the model that holds it, and the atol
    # (through the noise) moves a little with the margin: a few passes settle it.
    margin = 0.0
    for _ in range(4):
        write_model(_with_tie(mf, inter["final_norm"], margin), path, progress=False)
        keep = mf.attention_mask.astype(bool)
        ref32_inter = {}
        ref32 = Reference(mf, "float32").forward(mf.input_ids, mf.attention_mask,
                                                 capture=ref32_inter).numpy()
        exact, exact_inter = run_model(path)
        noise = float(np.abs(ref32.astype(np.float64) - exact)[keep].max())
        atol = documented_atol(noise, float(np.abs(ref32[keep]).max()))
        top2 = np.sort(ref32[TIE_ROW].astype(np.float64))[-2:]
        if abs((top2[1] - top2[0]) / atol - TIE_MARGIN) < 0.1:
            break
        margin = TIE_MARGIN * atol
    replay = root / "replay.py"
    replay.write_text(REPLAY)
    out = Fixture(path, keep, ref32, exact, exact_inter,
                  {k: v.numpy() for k, v in ref32_inter.items()}, noise, atol, replay)
    # The fixture is what it claims to be, or every test below is meaningless.
    margins = out.margins()
    assert (~keep).sum() >= 2 and not keep[:, -1].all(), "padding, at the end of a row too"
    assert 1.2 < margins[TIE_ROW] / atol < 1.8, margins[TIE_ROW] / atol
    assert ref32[TIE_ROW].argmax() == TOKEN_B and np.argsort(ref32[TIE_ROW])[-2] == TOKEN_A
    others = keep.copy()
    others[TIE_ROW] = False
    assert (margins[others] > 4 * atol).all(), "only the tie row may be near a tie"
    assert NOISE_FACTOR * noise > 5 * ATOL_FLOOR * max(1.0, np.abs(ref32[keep]).max()), \
        "the noise term must decide the tolerance here"
    return out


_counter = iter(range(10**6))


def engine(fx: Fixture, tmp_path: Path, logits: np.ndarray, intermediates: dict | None = None) -> str:
    """An engine command that writes `logits` (and `intermediates`), plus a log file that is
    not a logits file."""
    src = tmp_path / f"candidate{next(_counter)}"
    src.mkdir()
    np.save(src / "logits.npy", np.asarray(logits, np.float32))
    (src / "engine.log").write_text("a log file is not a logits file\n")
    if intermediates:
        (src / "intermediates").mkdir()
        for name, array in intermediates.items():
            np.save(src / "intermediates" / f"{name}.npy", np.asarray(array, np.float32))
    return f"{sys.executable} {fx.replay} {src} {{out}}"


def run(cli, fx, tmp_path, *args):
    return compare_json(cli, tmp_path, fx.path, *args)


# ---- the tolerance -----------------------------------------------------------------------------


def test_tolerance_rule_on_its_own_numbers():
    """atol = max(100 x noise, 1e-6 x max(1, max|logits|)), from numbers worked by hand."""
    from xvalid.metrics import POLICIES
    policy = POLICIES["float32"]
    assert policy.atol(0.0, 0.5) == pytest.approx(1e-6)
    assert policy.atol(0.0, 3.0) == pytest.approx(3e-6)
    assert policy.atol(2e-8, 3.0) == pytest.approx(3e-6)
    assert policy.atol(1e-7, 3.0) == pytest.approx(1e-5)
    assert policy.rtol == 0.0


def test_default_tolerance_is_100x_the_float32_vs_float64_noise(cli, fx, tmp_path):
    result, report = run(cli, fx, tmp_path, "--engine", engine(fx, tmp_path, fx.exact))
    assert result.code == 0, result.out + result.err
    tol = report["tolerance"]
    assert tol["reference_noise"] == pytest.approx(fx.noise, rel=1e-6)
    assert tol["atol"] == pytest.approx(fx.atol, rel=1e-6)
    assert tol["atol"] == pytest.approx(100 * fx.noise, rel=1e-6)
    assert tol["reference_absmax"] == pytest.approx(np.abs(fx.exact[fx.keep]).max(), rel=1e-6)
    # A correct float64 candidate uses a small share of the budget: about 1 x noise of 100.
    assert engine_row(report)["metrics"]["budget_used"] < 0.05


@pytest.mark.parametrize("size,passes", [(0.8, True), (1.25, False)])
def test_an_error_just_inside_the_tolerance_passes_and_just_outside_fails(cli, fx, tmp_path,
                                                                           size, passes):
    """One logit off by 0.8 or 1.25 x the documented atol (80 or 125 x the noise): the verdict
    brackets the tolerance, so a 10x looser (or tighter) default cannot go unnoticed."""
    b, s, t = 1, 7, 17  # unpadded (row 1 is padded on the left); far from its top-1
    cand = fx.exact.copy()
    cand[b, s, t] += size * fx.atol
    result, report = run(cli, fx, tmp_path, "--engine", engine(fx, tmp_path, cand))
    assert result.code == (0 if passes else 1), result.out + result.err
    metrics = engine_row(report)["metrics"]
    assert metrics["pass"] is passes
    assert metrics["max_abs_at"] == {"batch": b, "position": s, "token": t}
    assert metrics["min_passing_atol"] == pytest.approx(size * fx.atol, rel=0.03)


# ---- padding ------------------------------------------------------------------------------------


def test_padded_rows_are_never_judged(cli, fx, tmp_path):
    """An engine that writes garbage (huge values, NaN) into every padded row, logits and
    intermediates alike, is correct: padded rows are not meaningful."""
    rng = np.random.default_rng(0)
    pad = ~fx.keep
    logits = fx.exact.copy()
    logits[pad] = rng.normal(0, 1e3, size=logits[pad].shape)
    logits[np.argwhere(pad)[0][0], np.argwhere(pad)[0][1], 0] = np.nan
    inter = {}
    for name, array in fx.exact_inter.items():
        array = array.copy()
        array[pad] = rng.normal(0, 1e3, size=array[pad].shape)
        array[tuple(np.argwhere(pad)[-1])] = np.nan
        inter[name] = array
    result, report = run(cli, fx, tmp_path, "--engine", engine(fx, tmp_path, logits, inter))
    assert result.code == 0, result.out + result.err
    row = engine_row(report)
    assert row["status"] == "pass" and row["metrics"]["nonfinite"] is None
    assert row["metrics"]["top1"]["rows"] == fx.rows
    assert row["divergence"]["first"] is None and len(row["divergence"]["points"]) == len(inter)
    assert (report["model"]["unpadded_rows"], report["model"]["padded_rows"]) == \
        (fx.rows, fx.keep.size - fx.rows)


# ---- top-1 agreement ----------------------------------------------------------------------------


@pytest.mark.parametrize("flip", [False, True])
def test_a_near_tie_counts_for_nothing(cli, fx, tmp_path, flip):
    """The tie row's margin is 1.5 x atol: a correct candidate may flip it (here both logits
    move 0.8 x atol, within tolerance), and top-1 agreement counts only the other rows."""
    cand = fx.exact.copy()
    if flip:
        a, b = fx.exact[TIE_ROW][[TOKEN_A, TOKEN_B]]
        middle = (a + b) / 2
        cand[TIE_ROW + (TOKEN_A,)] = middle + 0.05 * fx.atol
        cand[TIE_ROW + (TOKEN_B,)] = middle - 0.05 * fx.atol
        assert cand[TIE_ROW].argmax() == TOKEN_A
    result, report = run(cli, fx, tmp_path, "--engine", engine(fx, tmp_path, cand))
    assert result.code == 0, result.out + result.err
    top1 = engine_row(report)["metrics"]["top1"]
    assert top1 == {"agree": fx.rows - 1, "decisive_rows": fx.rows - 1, "rows": fx.rows,
                    "margin_threshold": pytest.approx(2 * fx.atol, rel=1e-6)}


@pytest.mark.parametrize("swap", [False, True])
def test_with_rtol_a_flipped_decisive_row_fails(cli, fx, tmp_path, swap):
    """--rtol 1 lets each logit move by |logit|: swapping a decisive row's top two is then
    within tolerance, and the top-1 check is what fails it. Unswapped, the same run passes:
    rtol scales with |reference|, negative logits included."""
    row = (0, 1)
    top = np.argsort(fx.ref32[row])[-2:]  # second, first
    assert fx.margins()[row] > 4 * fx.atol and fx.margins()[row] < 0.9 * fx.ref32[row][top[0]]
    assert (fx.ref32[fx.keep] < -0.1).any()
    cand = fx.exact.copy()
    if swap:
        cand[row + (top[0],)], cand[row + (top[1],)] = fx.exact[row][top[1]], fx.exact[row][top[0]]
    result, report = run(cli, fx, tmp_path, "--rtol", 1, "--engine", engine(fx, tmp_path, cand))
    assert result.code == (1 if swap else 0), result.out + result.err
    metrics = engine_row(report)["metrics"]
    assert metrics["budget_used"] < 1
    assert metrics["top1"]["agree"] == fx.rows - (2 if swap else 1)
    if not swap:  # every error is far below its |reference|: no atol needed on top of rtol
        assert metrics["min_passing_atol"] == 0.0


# ---- metric values -------------------------------------------------------------------------------


def test_metrics_match_values_computed_from_the_saved_logits(cli, fx, tmp_path):
    """Every logit metric, recomputed here from the files --save-logits writes. The candidate
    is far off (sharper, and noisy), so KL(reference || candidate) and KL(candidate ||
    reference) differ clearly and the direction is tested."""
    rng = np.random.default_rng(1)
    cand = 3 * fx.exact + rng.normal(0, 0.1, size=fx.exact.shape)  # sharper, and noisy
    saved = tmp_path / "saved"
    result, report = run(cli, fx, tmp_path, "--save-logits", saved,
                         "--engine", engine(fx, tmp_path, cand))
    assert result.code == 1
    ref = np.load(saved / "reference.npy")
    got = np.load(saved / "replay.py.npy")
    assert ref.dtype == np.float32 and np.abs(ref - fx.exact)[fx.keep].max() < 10 * fx.noise
    r = torch.from_numpy(ref[fx.keep].astype(np.float64))  # (rows, V)
    c = torch.from_numpy(got[fx.keep].astype(np.float64))
    diff = (c - r).abs()
    log_r, log_c = torch.log_softmax(r, -1), torch.log_softmax(c, -1)
    kl = torch.nn.functional.kl_div(log_c, log_r, log_target=True, reduction="none").sum(-1)
    kl_reverse = torch.nn.functional.kl_div(log_r, log_c, log_target=True, reduction="none").sum(-1)
    assert abs(kl.mean() / kl_reverse.mean() - 1) > 0.02, "the fixture cannot tell KL's direction"
    flat = int(diff.argmax())
    b, s = np.argwhere(fx.keep)[flat // r.shape[1]]
    expected = {
        "max_abs": diff.max(), "mean_abs": diff.mean(), "rmse": diff.pow(2).mean().sqrt(),
        "cosine": torch.nn.functional.cosine_similarity(c.flatten(), r.flatten(), dim=0),
        "nmse": (c - r).pow(2).sum() / r.pow(2).sum(),
        "kl_mean": kl.mean(), "kl_max": kl.max(),
    }
    metrics = engine_row(report)["metrics"]
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(float(value), rel=1e-9), key
    assert metrics["max_abs_at"] == {"batch": int(b), "position": int(s),
                                     "token": flat % r.shape[1]}


# ---- intermediates ------------------------------------------------------------------------------


def test_each_intermediate_budget_is_100x_its_float32_vs_float64_noise(cli, fx, tmp_path):
    """Per intermediate: noise = max |float32 reference - float64| on unpadded rows, budget =
    the same rule as the logits' atol. Pinned against the numpy engine's float64 values, so a
    float32-vs-float32 "noise" (always 0) or one taken over padded rows shows."""
    result, report = run(cli, fx, tmp_path,
                         "--engine", engine(fx, tmp_path, fx.exact, fx.exact_inter))
    assert result.code == 0, result.out + result.err
    points = {p["name"]: p for p in engine_row(report)["divergence"]["points"]}
    assert set(points) == set(fx.exact_inter)
    noise_decides = 0
    for name, exact in fx.exact_inter.items():
        ref = fx.ref32_inter[name].astype(np.float64)
        noise = float(np.abs(ref - exact)[fx.keep].max())
        scale = float(np.abs(ref[fx.keep]).max())
        p = points[name]
        assert p["noise"] == pytest.approx(noise, rel=1e-6, abs=1e-15), name
        assert p["scale"] == pytest.approx(scale, rel=1e-6), name
        assert p["budget"] == pytest.approx(documented_atol(noise, scale), rel=1e-6), name
        assert not p["diverged"], name
        noise_decides += NOISE_FACTOR * noise > ATOL_FLOOR * max(1.0, scale)
    assert noise_decides >= 10, "the fixture must exercise the noise term, not only the floor"


# ---- decode drift ---------------------------------------------------------------------------------


def _planted_decode(monkeypatch, plant):
    """Make the torch backend's KV-cache decode return plant(logits (B,steps,V), mask, first
    decoded position) instead of its own logits."""
    from xvalid.backends import TorchBackend
    real = TorchBackend.decode

    def decode(self, ids, mask, n_prefill):
        return plant(real(self, ids, mask, n_prefill).copy(), np.asarray(mask), n_prefill)

    monkeypatch.setattr(TorchBackend, "decode", decode)


def test_a_decode_step_off_fails_the_candidate(cli, fx, tmp_path, monkeypatch):
    def last_step_off(logits, mask, first):
        logits[:, -1] += 1.0
        return logits

    _planted_decode(monkeypatch, last_step_off)
    result, report = run(cli, fx, tmp_path, "--decode", 3)
    assert result.code == 1, result.out + result.err
    torch_row = report["candidates"][0]
    assert torch_row["metrics"]["pass"] and torch_row["status"] == "fail"
    assert report["verdict"] == "fail"
    assert [s["pass"] for s in torch_row["decode"]["steps"]] == [True, True, False]
    assert torch_row["decode"]["pass"] is False
    assert "decode drift" in result.out and "-> FAIL" in result.out


def test_decode_ignores_padded_positions(cli, fx, tmp_path, monkeypatch):
    """Row 2 is right-padded: its last decoded positions are padding, and garbage there is fine."""
    def garbage_on_padding(logits, mask, first):
        padded = mask[:, first:] == 0  # (B, steps)
        assert padded.any()
        logits[padded] = np.nan
        return logits

    _planted_decode(monkeypatch, garbage_on_padding)
    result, report = run(cli, fx, tmp_path, "--decode", 3)
    assert result.code == 0, result.out + result.err
    assert all(s["pass"] for s in report["candidates"][0]["decode"]["steps"])


# ---- several candidates, bad inputs ----------------------------------------------------------------


@pytest.mark.parametrize("error_first", [True, False])
def test_an_engine_that_cannot_run_outranks_a_mismatch(cli, fx, tmp_path, error_first):
    failing = engine(fx, tmp_path, fx.exact + 1.0)
    erroring = "false {out}"
    engines = [erroring, failing] if error_first else [failing, erroring]
    result, report = run(cli, fx, tmp_path, "--engine", engines[0], "--engine", engines[1])
    assert result.code == 3, result.out + result.err
    assert report["verdict"] == "error" and report["exit_code"] == 3
    statuses = [engine_row(report, i)["status"] for i in (1, 2)]
    assert statuses == (["error", "fail"] if error_first else ["fail", "error"])
    names = [engine_row(report, i)["name"] for i in (1, 2)]
    assert f"verdict: ERROR ({', '.join(names)})" in result.out


def test_inputs_that_are_all_padding_are_refused(cli, fx, tmp_path):
    mf = generate_model(ModelConfig(), batch_size=2, seq_len=4, pad=0)
    mf.attention_mask[:] = 0
    path = tmp_path / "all-padding.json"
    write_model(mf, path, progress=False)
    cli("compare", path, "--backends", "torch").assert_one_line_error(
        2, "every input position is padding")
