"""`xvalid bench`: grid parsing and skipping, statistics, validation before timing (a wrong
backend is never timed, ranked or in a speedup), external engines, the output files against
their schema and against each other, Ctrl-C keeping a partial result, --profile, usage
errors. The roofs are faked (measuring them takes seconds); nothing asserts a time."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ENGINES
from xvalid.backends import REGISTRY, BackendSpec, TorchBackend, register
from xvalid.bench.grid import Cell, cell_memory_bytes, parse_axis, skip_reason
from xvalid.bench.rows import CSV_COLUMNS, Stats
from xvalid.config import PRESETS

SCHEMA = Path(__file__).parent.parent / "python" / "xvalid" / "schemas" / "bench.schema.json"
ENGINE = f"{sys.executable} {ENGINES / 'numpy_engine.py'} {{model}} {{out}}"
FAST = ["--preset", "tiny", "--repeat", 1, "--warmup", 0, "--min-time", 0, "--threads", 1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def fake_roofs(monkeypatch):
    """Roofs measured in microseconds instead of seconds (their code: test_roofs)."""
    import xvalid.bench.run as run
    monkeypatch.setattr(run, "measure_roofs", lambda threads=None, repeat=3: {
        "threads": threads, "sgemm_gflops": 100.0, "copy_gbs": 10.0, "sgemm_ms": [1.0],
        "copy_ms": [1.0]})


def validate(doc: dict) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(doc, json.loads(SCHEMA.read_text()))


def bench(cli, out: Path | None, *args):
    result = cli("bench", *FAST, *args, *(["--out", out] if out else []))
    doc = json.loads((out / "bench.json").read_text()) if out and (out / "bench.json").exists() \
        else None
    return result, doc


def rows_of(doc, backend=None):
    return [r for r in doc["rows"] if backend is None or r["backend"] == backend]


# ---------------------------------------------------------------------------------------------
# grid


@pytest.mark.parametrize("text,expected", [
    ("1,2,4", [1, 2, 4]),
    ("32-512*2", [32, 64, 128, 256, 512]),
    ("32-100*2", [32, 64]),
    ("16-64+16", [16, 32, 48, 64]),
    ("3-5", [3, 4, 5]),
    ("8, 1-2, 8", [8, 1, 2]),
])
def test_axes_from_lists_and_ranges(text, expected):
    assert parse_axis(text, "--seq") == expected


@pytest.mark.parametrize("text,needle", [
    ("32-x", "'32-x' is not a number or a range"),
    ("", "'' is not a number"),
    ("1,,2", "'' is not a number"),
    ("512-32*2", "runs backwards"),
    ("1-8*1", "a factor must be >= 2"),
    ("1-100000", "more than 64 values"),
    ("0,4", "0 is below the minimum 1"),
    ("-4", "is not a number"),
])
def test_bad_axes_name_the_flag_and_the_problem(text, needle):
    from xvalid.errors import InputError
    with pytest.raises(InputError) as info:
        parse_axis(text, "--seq")
    assert str(info.value).startswith(f"--seq {text!r}: ") and needle in str(info.value)


def test_gen_axis_allows_zero():
    assert parse_axis("0,8", "--gen", minimum=0) == [0, 8]


def test_cells_that_cannot_fit_are_skipped_with_the_reason(monkeypatch):
    from xvalid.memory import LIMIT_VARIABLE, forward_memory_bytes
    tiny = PRESETS["tiny"]  # max_position_embeddings 128
    assert skip_reason(tiny, Cell(1, 120, 8, 1), 2, 10 << 30) is None
    reason = skip_reason(tiny, Cell(1, 124, 8, 1), 2, 10 << 30)
    assert "positions S+N = 124+8 = 132 exceed the model's max_position_embeddings 128" == reason
    big = PRESETS["minimind2"]
    cell = Cell(8, 2048, 32, 1)
    need = cell_memory_bytes(big, cell, 2)
    assert need == 5 * forward_memory_bytes(big, 8, 2080, 2080, False)
    reason = skip_reason(big, cell, 2, int(need))  # more than 80% of what is available
    assert reason.startswith(f"needs about {need / 2**30:.1f} GiB") and "available" in reason
    assert skip_reason(big, cell, 2, int(2 * need)) is None
    monkeypatch.setenv(LIMIT_VARIABLE, "100")  # one forward above xvalid's memory limit
    reason = skip_reason(big, cell, 2, int(2 * need))
    assert reason.startswith("a forward over B=8 x 2080 positions needs about") and "100 MiB" in reason


def test_stats_of_known_samples():
    samples = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    s = Stats.of(samples)
    assert s.median == 3.5 and s.mean == pytest.approx(25 / 6) and s.n == 6
    assert s.std == pytest.approx(np.std(samples, ddof=1))
    assert s.p90 == pytest.approx(np.percentile(samples, 90))
    assert (s.min, s.max, s.samples) == (1.0, 10.0, samples)
    one = Stats.of([2.5])
    assert (one.std, one.p90, one.median) == (0.0, 2.5, 2.5)


def test_forward_flops_and_weight_bytes_count_every_matrix():
    """Counted here independently from the weight shapes of the model file."""
    from xvalid.bench.roofs import forward_flops, weight_bytes_per_step
    from xvalid.modelfile import layer_shapes
    cfg = PRESETS["tiny"]
    matrices = sum(int(np.prod(shape)) for shape in layer_shapes(cfg).values() if len(shape) == 2)
    params = cfg.num_hidden_layers * matrices + cfg.vocab_size * cfg.hidden_size  # + the head
    B, S = 3, 7
    pairs = sum(i + 1 for i in range(S))  # causal: query i sees i + 1 keys
    attention = cfg.num_hidden_layers * B * cfg.num_attention_heads * pairs * 2 * 2 * cfg.head_dim
    assert forward_flops(cfg, B, S) == 2 * B * S * params + attention
    assert weight_bytes_per_step(cfg) == 4 * params


def test_roofs_are_measured():
    import torch

    from xvalid.bench.roofs import measure_roofs
    before = torch.get_num_threads()
    try:
        measured = measure_roofs(1, 2, gemm_n=64, copy_floats=1 << 14)
    finally:
        torch.set_num_threads(before)
    assert measured["threads"] == 1 and measured["sgemm_gflops"] > 0 and measured["copy_gbs"] > 0
    assert len(measured["sgemm_ms"]) == 2 and len(measured["copy_ms"]) == 2
    assert measured["sgemm_gflops"] == pytest.approx(2 * 64 ** 3 / np.median(measured["sgemm_ms"])
                                                     * 1e-6)


# ---------------------------------------------------------------------------------------------
# a run, its files and its table


def test_run_writes_files_that_agree_with_the_table(cli, tmp_path):
    out = tmp_path / "out"
    result, doc = bench(cli, out, "--batch", "1,2", "--seq", "4,8,126", "--gen", 3)
    assert result.code == 0, result.out + result.err
    validate(doc)
    assert {p.name for p in out.iterdir()} == {"bench.json", "bench.csv", "bench.md",
                                               "throughput.png", "speedup.png", "latency.png"}
    for png in ("throughput.png", "speedup.png", "latency.png"):
        assert (out / png).read_bytes().startswith(PNG) and (out / png).stat().st_size > 5000
    assert doc["partial"] is False and doc["cells_total"] == 6
    ok = [r for r in doc["rows"] if r["status"] == "ok"]
    assert {(r["backend"], r["batch"], r["seq"]) for r in ok} == {
        (b, batch, seq) for b in ("torch", "cpp") for batch in (1, 2) for seq in (4, 8)}
    for row in ok:
        assert row["valid"] is True and row["timing"] == "in-process"
        assert row["validation"]["decode"] == "pass" and row["validation"]["budget_used"] <= 1
        assert row["prefill_ms"]["n"] == 1 and row["decode_ms_per_token"]["n"] == 1
        assert row["prefill_tok_s"] == pytest.approx(
            row["batch"] * row["seq"] / row["prefill_ms"]["median"] * 1e3)
        assert row["decode_tok_s"] == pytest.approx(row["batch"] / row["decode_ms_per_token"]["median"] * 1e3)
        assert row["prefill_roof"] == pytest.approx(row["prefill_gflops"] / 100.0)
        assert row["decode_roof"] == pytest.approx(row["decode_gbs"] / 10.0)
        assert row["peak_rss_mb"] > 0 and row["rank"]["prefill"] in (1, 2)
    cpp = [r for r in ok if r["backend"] == "cpp"]
    assert all(r["speedup"]["prefill"] > 0 for r in cpp)
    assert all(r["speedup"] is None for r in ok if r["backend"] == "torch")
    # S = 126 with N = 3 needs 129 positions; tiny has 128: skipped, with the reason, everywhere
    skipped = [r for r in doc["rows"] if r["status"] == "skipped"]
    assert len(skipped) == 4 and all(r["valid"] is None and "exceed the model's "
                                     "max_position_embeddings 128" in r["reason"] for r in skipped)
    assert "B1 S126 N3 t1: skipped: positions S+N = 126+3 = 129" in result.out

    # bench.csv: the contract's columns first, the JSON's medians in them
    with open(out / "bench.csv", newline="") as fp:
        records = list(csv.DictReader(fp))
    assert list(records[0])[:12] == ["backend", "batch", "seq", "gen", "threads", "valid",
                                     "prefill_ms", "decode_ms_per_token", "total_ms",
                                     "prefill_tok_s", "decode_tok_s", "peak_rss_mb"]
    assert tuple(records[0]) == CSV_COLUMNS and len(records) == len(doc["rows"])
    for record, row in zip(records, doc["rows"]):
        assert record["backend"] == row["backend"] and int(record["seq"]) == row["seq"]
        if row["status"] == "ok":
            assert record["valid"] == "true"
            for column in ("prefill_ms", "decode_ms_per_token", "total_ms"):
                assert float(record[column]) == pytest.approx(row[column]["median"], rel=1e-5)
            assert float(record["prefill_tok_s"]) == pytest.approx(row["prefill_tok_s"], rel=1e-5)
        else:
            assert record["valid"] == "" and record["prefill_ms"] == "" and record["reason"]

    # bench.md and the terminal print the same table text
    from xvalid.bench.rows import format_ms
    md = (out / "bench.md").read_text()
    for row in ok:
        text = format_ms(row["prefill_ms"]["median"])
        assert text in md and text in result.out
    assert md.count("\n| torch |") == 6 and md.count("\n| cpp |") == 6


def _matrix_shapes(cfg) -> list[tuple[int, int]]:
    """(rows, cols) of every matrix a decode step reads, from the model file's layout."""
    from xvalid.modelfile import layer_shapes
    layer = [shape for shape in layer_shapes(cfg).values() if len(shape) == 2]
    return layer * cfg.num_hidden_layers + [(cfg.vocab_size, cfg.hidden_size)]


def test_weight_bytes_per_step_per_storage_dtype():
    """4, 2, 2 bytes a weight; int8 1 byte plus a 4-byte scale per block of 32 of each row
    (rows of 64 and 192 inputs: 2 and 6 blocks), counted here from the shapes."""
    import math

    from xvalid.bench.roofs import weight_bytes_per_step
    cfg = PRESETS["tiny"]
    shapes = _matrix_shapes(cfg)
    weights = sum(r * c for r, c in shapes)
    assert weight_bytes_per_step(cfg, "float16") == weight_bytes_per_step(cfg, "bfloat16") == 2 * weights
    assert weight_bytes_per_step(cfg, "int8") == weights + sum(4 * r * math.ceil(c / 32) for r, c in shapes)
    assert weight_bytes_per_step(cfg, "int8", block_size=10**6) == weights + sum(4 * r for r, _ in shapes)


def test_dtype_axes_make_rows_per_storage_and_compute_dtype(cli, tmp_path):
    """--weight-dtype: each storage dtype is a model file of its own, every backend validated
    at the float32 budget on the values it stores; --dtype bfloat16: torch runs in bfloat16
    (judged by its own half-precision budget), the C++ kernels' rows say 'not supported'."""
    from xvalid.bench.roofs import weight_bytes_per_step
    out = tmp_path / "out"
    result, doc = bench(cli, out, "--batch", 1, "--seq", 6, "--gen", 2, "--backends", "torch,cpp,cpp-clear",
                        "--weight-dtype", "float32,int8,float16", "--dtype", "float32,bfloat16")
    assert result.code == 0, result.out + result.err
    validate(doc)
    assert doc["settings"]["weight_dtypes"] == ["float32", "int8", "float16"]
    assert doc["settings"]["dtypes"] == ["float32", "bfloat16"] and doc["cells_total"] == 6
    assert [m["weight_dtype"] for m in doc["models"]] == ["float32", "int8", "float16"]
    rows = {(r["backend"], r["weight_dtype"], r["dtype"]): r for r in doc["rows"]}
    assert len(rows) == len(doc["rows"]) == 3 * 3 * 2
    cfg = PRESETS["tiny"]
    for weight_dtype in ("float32", "int8", "float16"):
        for backend in ("cpp", "cpp-clear"):
            ok = rows[backend, weight_dtype, "float32"]
            assert ok["status"] == "ok" and ok["validation"]["budget_used"] <= 1
            assert ok["weight_bytes_per_token"] == weight_bytes_per_step(cfg, weight_dtype)
            assert (ok["vs_float32_weights"] is None) == (weight_dtype == "float32")
            refused = rows[backend, weight_dtype, "bfloat16"]
            assert refused["status"] == "unsupported" and refused["valid"] is None
            assert refused["reason"] == "computes in float32 only, not bfloat16"
            assert refused["prefill_ms"] is None and refused["decode_ms_per_token"] is None
        # torch holds the stored values in its compute dtype
        assert rows["torch", weight_dtype, "float32"]["weight_bytes_per_token"] == weight_bytes_per_step(cfg)
        half = rows["torch", weight_dtype, "bfloat16"]
        assert half["status"] == "ok" and half["weight_bytes_per_token"] == weight_bytes_per_step(cfg, "bfloat16")
        assert half["validation"]["atol"] > 10 * rows["torch", weight_dtype, "float32"]["validation"]["atol"]
    assert "cpp at --dtype bfloat16: not supported (computes in float32 only, not bfloat16)" in result.out
    assert "cpp int8: decode tokens/s with int8 weights" in result.out
    with open(out / "bench.csv", newline="") as fp:
        records = list(csv.DictReader(fp))
    assert [(r["backend"], r["weight_dtype"], r["dtype"], r["status"]) for r in records] == [
        (r["backend"], r["weight_dtype"], r["dtype"], r["status"]) for r in doc["rows"]]
    assert all(float(r["weight_bytes_per_token"]) > 0 for r in records)
    md = (out / "bench.md").read_text()
    assert md.count("not supported") >= 6 and "| weights | dtype |" in md


def test_an_int8_backend_that_ignores_the_scales_is_invalid(cli, tmp_path, registered):
    """The int8 cells are validated like every other: a backend computing with the stored
    integers as if they were the weights (scales ignored) fails there and is not timed."""
    import dataclasses

    from xvalid.backends import CppBackend
    from xvalid.dtypes import quantize_q8
    from xvalid.modelfile import named_tensors, write_model

    def no_scales(path, mf):
        if "int8" in Path(path).name:  # the file's integers, every scale 1
            forms = {}
            for key, array in named_tensors(mf):
                if key.startswith("weights.") and array.ndim == 2:
                    q = quantize_q8(array)  # the stored integers again (mf holds their values)
                    forms[key] = dataclasses.replace(q, scales=np.ones_like(q.scales))
            path = Path(str(path) + ".noscales.safetensors")
            write_model(dataclasses.replace(mf, storage=forms), path, progress=False,
                        container="safetensors")
        return CppBackend(path, "fast", "noscales")

    registered("noscales", no_scales)
    result, doc = bench(cli, tmp_path / "out", "--batch", 1, "--seq", 6, "--gen", 2,
                        "--backends", "torch,cpp,noscales", "--weight-dtype", "float32,int8")
    assert result.code == 1, result.out + result.err
    rows = {(r["backend"], r["weight_dtype"]): r for r in doc["rows"]}
    assert rows["noscales", "float32"]["status"] == "ok"
    assert rows["noscales", "int8"]["status"] == "invalid" and rows["noscales", "int8"]["prefill_ms"] is None
    assert rows["cpp", "int8"]["status"] == "ok"


@pytest.mark.parametrize("flag,text,needle", [
    ("--weight-dtype", "int4", "--weight-dtype 'int4': 'int4' is not one of float32, float16, bfloat16, int8"),
    ("--dtype", "float32,float64", "--dtype 'float32,float64': 'float64' is not one of float32, bfloat16, float16"),
    ("--dtype", ",", "--dtype ',': no value"),
])
def test_bad_dtype_axes_are_one_line(cli, flag, text, needle):
    result = cli("bench", *FAST, flag, text)
    result.assert_one_line_error(2, needle)


def test_a_model_file_and_two_thread_counts(cli, tmp_path, tiny_model):
    result = cli("bench", tiny_model, "--repeat", 1, "--warmup", 0, "--min-time", 0,
                 "--threads", "1,2", "--batch", 1, "--seq", 4, "--gen", 0, "--backends", "cpp",
                 "--out", tmp_path)
    assert result.code == 0, result.out + result.err
    doc = json.loads((tmp_path / "bench.json").read_text())
    validate(doc)
    assert doc["models"][0]["name"] == "tiny.json" and doc["models"][0]["source"] == "file"
    assert [r["threads"] for r in doc["rows"]] == [1, 2] and [t["threads"] for t in doc["roofs"]] == [1, 2]
    row = doc["rows"][0]  # gen 0: a prefill only
    assert row["decode_ms_per_token"] is None and row["validation"]["decode"] is None
    assert row["total_ms"]["median"] == row["prefill_ms"]["median"]


def test_two_presets_with_a_size_flag(cli, tmp_path):
    result = cli("bench", "--preset", "tiny,small", "--layers", 1, "--repeat", 1, "--warmup", 0,
                 "--min-time", 0, "--threads", 1, "--batch", 1, "--seq", 4, "--gen", 1,
                 "--backends", "torch", "--out", tmp_path)
    assert result.code == 0, result.out + result.err
    doc = json.loads((tmp_path / "bench.json").read_text())
    validate(doc)
    models = {m["name"]: m for m in doc["models"]}
    assert set(models) == {"tiny-layers1", "small-layers1"}
    assert models["small-layers1"]["config"]["hidden_size"] == PRESETS["small"].hidden_size
    assert all(m["config"]["num_hidden_layers"] == 1 for m in models.values())
    assert sorted(r["model"] for r in doc["rows"]) == ["small-layers1", "tiny-layers1"]
    for name in models:  # one set of plots per model
        assert (tmp_path / f"throughput-{name}.png").read_bytes().startswith(PNG)


# ---------------------------------------------------------------------------------------------
# validated before timed


class WrongBackend(TorchBackend):
    """The reference with a bug: 'zeros' returns zeros at once (it would be the fastest);
    'decode' is right on the prefill and off by 0.5 on every decode step; 'refuses' raises
    an input error for a batch of more than one row."""

    def __init__(self, mf, mode: str):
        super().__init__(mf)
        self.name, self.mode, self.steps = f"wrong-{mode}", mode, 0

    def step(self, ids, mask):
        if self.mode == "refuses" and ids.shape[0] > 1:
            from xvalid.errors import InputError
            raise InputError("batch > 1 is not supported")
        if self.mode == "zeros":
            return np.zeros((*ids.shape, self.model.cfg.vocab_size), np.float32)
        out = super().step(ids, mask)
        return out + 0.5 if self.mode == "decode" and ids.shape[1] == 1 else out


@pytest.fixture
def registered():
    names = []

    def add(name, create):
        register(BackendSpec(name, "test only", create))
        names.append(name)

    yield add
    for name in names:
        REGISTRY.pop(name)


def test_a_wrong_backend_is_invalid_never_timed_ranked_or_in_speedups(cli, tmp_path, registered):
    registered("wrong-zeros", lambda path, mf: WrongBackend(mf, "zeros"))
    registered("wrong-decode", lambda path, mf: WrongBackend(mf, "decode"))
    out = tmp_path / "out"
    result, doc = bench(cli, out, "--backends", "torch,wrong-zeros,cpp,wrong-decode",
                        "--batch", 2, "--seq", "4,8", "--gen", 3)
    assert result.code == 1, result.out + result.err  # a backend INVALID: exit 1
    validate(doc)
    for name, reason in (("wrong-zeros", "logits max abs"),
                         ("wrong-decode", "decode drifts from step 1")):
        for row in rows_of(doc, name):
            assert row["status"] == "invalid" and row["valid"] is False and reason in row["reason"]
            assert row["prefill_ms"] is row["decode_ms_per_token"] is row["total_ms"] is None
            assert row["speedup"] is None and row["rank"] is None
    assert rows_of(doc, "wrong-decode")[0]["validation"]["first_failing_step"] == 1
    for row in rows_of(doc, "torch") + rows_of(doc, "cpp"):
        assert row["status"] == "ok" and sorted([row["rank"]["prefill"]]) in ([1], [2])
    for cell in ((2, 4), (2, 8)):  # ranks over the two valid backends only
        ranks = sorted(r["rank"]["prefill"] for r in doc["rows"] if r["status"] == "ok"
                       and (r["batch"], r["seq"]) == cell)
        assert ranks == [1, 2]
    assert "wrong-zeros B2 S4 N3 t1: INVALID: logits max abs" in result.out
    with open(out / "bench.csv", newline="") as fp:
        wrong = [r for r in csv.DictReader(fp) if r["backend"].startswith("wrong")]
    assert wrong and all(r["valid"] == "false" and r["prefill_ms"] == "" and
                         r["speedup_prefill"] == "" for r in wrong)
    md = [line for line in (out / "bench.md").read_text().splitlines() if line.startswith("|")]
    assert "| wrong-zeros | 2 | 4 | INVALID | - |" in "\n".join(md)
    assert len({line.count(" | ") for line in md if "---" not in line}) == 1  # same columns


def test_a_backend_that_refuses_a_cell_is_an_error_there_only(cli, tmp_path, registered):
    registered("wrong-refuses", lambda path, mf: WrongBackend(mf, "refuses"))
    result, doc = bench(cli, tmp_path, "--backends", "torch,wrong-refuses", "--batch", "1,2",
                        "--seq", 4, "--gen", 1)
    assert result.code == 3, result.out + result.err
    validate(doc)
    one, two = rows_of(doc, "wrong-refuses")
    assert one["status"] == "ok" and one["prefill_ms"]["n"] == 1
    assert two["status"] == "error" and two["valid"] is False
    assert two["reason"] == "wrong-refuses: batch > 1 is not supported"


def test_external_engines_through_their_own_timing(cli, tmp_path):
    out = tmp_path / "out"
    result, doc = bench(cli, out, "--backends", "torch", "--batch", 2, "--seq", 5, "--gen", 3,
                        "--engine", "good=" + ENGINE, "--engine", "quiet=" + ENGINE + " --no-timing",
                        "--engine", "gqa=" + ENGINE + " --bug gqa",
                        "--engine", "kv=" + ENGINE + " --bug kv-cache-position",
                        "--engine", "nodecode=" + ENGINE + " --decode 0")
    assert result.code == 1, result.out + result.err
    validate(doc)
    good, quiet, gqa, kv, nodecode = (rows_of(doc, n)[0]
                                      for n in ("good", "quiet", "gqa", "kv", "nodecode"))
    assert good["kind"] == "engine" and good["status"] == "ok" and good["timing"] == "engine"
    assert good["prefill_ms"]["n"] == 1 and good["decode_ms_per_token"]["n"] == 1
    assert good["validation"]["decode"] == "pass" and good["speedup"]["prefill"] > 0
    # no timing.json: whole processes, labelled so, never compared with a forward's time
    assert quiet["status"] == "ok" and quiet["timing"] == "process"
    assert quiet["prefill_ms"] is None and quiet["total_ms"]["n"] == 1
    assert quiet["speedup"] is None and quiet["rank"] is None
    assert gqa["status"] == "invalid" and "first divergence" not in gqa["reason"]
    assert kv["status"] == "invalid" and "decode drifts from step 2" in kv["reason"]
    assert "(process)" in result.out
    # no decode logits: judged on its full forward, decode neither checked nor timed (said)
    assert nodecode["status"] == "ok" and nodecode["validation"]["decode"] == "not supported"
    assert nodecode["timing"] == "process" and nodecode["decode_ms_per_token"] is None
    assert "nodecode B2 S5 N3 t1: decode not checked or timed" in result.out


def test_an_engine_that_fails_is_an_error_exit_3(cli, tmp_path):
    result, doc = bench(cli, tmp_path, "--backends", "torch", "--batch", 1, "--seq", 4,
                        "--gen", 1, "--engine", "bad=" + ENGINE + " --fail exit3")
    assert result.code == 3, result.out + result.err
    row = rows_of(doc, "bad")[0]
    assert row["status"] == "error" and "exited with code 3" in row["reason"]
    validate(doc)


# ---------------------------------------------------------------------------------------------
# Ctrl-C, profile, usage


class InterruptingBackend(TorchBackend):
    """Ctrl-C on the third run from an empty cache: during the second cell's validation."""

    def __init__(self, mf):
        super().__init__(mf)
        self.name, self.runs = "interrupting", 0

    def reset_cache(self):
        self.runs += 1
        if self.runs == 3:
            raise KeyboardInterrupt
        super().reset_cache()


def test_ctrl_c_keeps_what_was_measured_marked_partial(cli, tmp_path, registered):
    registered("interrupting", lambda path, mf: InterruptingBackend(mf))
    out = tmp_path / "out"
    result, doc = bench(cli, out, "--backends", "torch,interrupting", "--batch", 1,
                        "--seq", "4,8,16", "--gen", 2)
    assert result.code == 130, result.out + result.err
    assert "interrupted during tiny B1 S8 N2 t1" in result.err and "marked partial" in result.err
    validate(doc)
    assert doc["partial"] is True and doc["exit_code"] == 130 and doc["cells_total"] == 3
    assert {(r["backend"], r["seq"]) for r in doc["rows"]} == {("torch", 4), ("interrupting", 4)}
    assert all(r["status"] == "ok" and r["prefill_ms"]["n"] == 1 for r in doc["rows"])
    assert "PARTIAL: interrupted during tiny B1 S8 N2 t1; 1 of 3 cells measured" in result.out
    assert "(PARTIAL)" in (out / "bench.md").read_text()
    assert len((out / "bench.csv").read_text().splitlines()) == 3
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_profile_puts_torch_and_cpp_side_by_side_under_shared_op_names(cli, tmp_path):
    from xvalid.reference import OPS
    result, doc = bench(cli, tmp_path, "--profile", "--batch", "2,4", "--seq", 6, "--gen", 2)
    assert result.code == 0, result.out + result.err
    validate(doc)
    assert len(doc["rows"]) == 2  # one cell: the first of each axis
    profile = doc["profile"]
    assert (profile["batch"], profile["seq"]) == (2, 6)
    torch_ops = [op["op"] for op in profile["backends"]["torch"]["ops"]]
    cpp_ops = [op["op"] for op in profile["backends"]["cpp"]["ops"]]
    assert torch_ops == cpp_ops == list(OPS)
    for name in ("torch", "cpp"):
        ops = profile["backends"][name]["ops"]
        assert sum(op["share"] for op in ops) == pytest.approx(1.0)
        assert {op["op"]: op["calls"] for op in ops}["rmsnorm"] == 2 * 2 + 1  # 2 layers + final
    assert all(op["gflops"] is None for op in profile["backends"]["torch"]["ops"])
    assert any(op["gflops"] for op in profile["backends"]["cpp"]["ops"])
    assert "per-op profile: tiny prefill B2 S6" in result.out and "torch/cpp" in result.out
    for op in OPS:
        assert op in result.out


def test_torch_profile_costs_nothing_to_the_results():
    """The op labels change no number: profiling on and off give the same logits."""
    from xvalid.generate import generate_model
    mf = generate_model(PRESETS["tiny"], batch_size=2, seq_len=5, seed=3)
    backend = TorchBackend(mf)
    before, _ = backend.forward(mf.input_ids, mf.attention_mask)
    ops = backend.profile(mf.input_ids, mf.attention_mask, 2)
    after, _ = backend.forward(mf.input_ids, mf.attention_mask)
    assert np.array_equal(before, after)
    assert {op["op"]: op["calls"] for op in ops}["q_proj"] == 2 * 2  # 2 forwards x 2 layers


@pytest.mark.parametrize("args,needle", [
    (["--seq", "32-x"], "--seq '32-x': '32-x' is not a number or a range"),
    (["--batch", "0"], "--batch '0': 0 is below the minimum 1"),
    (["--gen", "-1"], "--gen '-1'"),
    (["--backends", "bogus"], "unknown backend 'bogus'"),
    (["--backends", ""], "nothing to benchmark"),
    (["--preset", "bogus"], "unknown preset 'bogus'"),
    (["--grid", "huge"], "'huge' is not one of"),
    (["--repeat", 0], "--repeat"),
    (["--engine", "echo {model}"], "must contain {out}"),
    (["--hidden", 63], "does not divide hidden_size 63"),
])
def test_usage_errors_are_one_line_exit_2(cli, args, needle):
    cli("bench", "--preset", "tiny", *args).assert_one_line_error(2, needle)


def test_model_file_errors(cli, tmp_path, tiny_model):
    cli("bench", tiny_model, "--preset", "tiny").assert_one_line_error(2, "not both")
    cli("bench", tmp_path / "none.json").assert_one_line_error(2, "no such file")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    cli("bench", bad).assert_one_line_error(2, "not valid JSON")


def test_a_machine_whose_speed_changed_during_the_run_is_said():
    from xvalid.bench.output import note_lines
    from xvalid.bench.run import BenchOptions, BenchResult
    result = BenchResult(BenchOptions([], [1], [4], [0], [2]), {}, "")
    result.roofs[2] = {"sgemm_gflops": 50.0, "copy_gbs": 10.0}
    result.roofs_end[2] = {"sgemm_gflops": 100.0, "copy_gbs": 10.5}
    assert note_lines(result) == [
        "the machine's speed changed during the run at 2 threads (sgemm GFLOP/s 50.0 at the "
        "start, 100.0 at the end): other work on it? Roof shares use the start's"]
    result.roofs_end[2]["sgemm_gflops"] = 55.0
    assert note_lines(result) == []
