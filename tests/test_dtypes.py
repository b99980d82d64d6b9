"""Reduced-precision weights (float16, bfloat16, int8): the conversions against torch's and
hand-written ones, quantize_q8's error bound, both containers' round trips, generate and
convert --weight-dtype, the quantisation cost in compare, the docs' readers, and every
implementation of the forward (torch reference, numpy engine, C++ kernels) on every dtype.
The files a reader must refuse are in test_hostile_files.py and test_safetensors.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ENGINES, REPO, compare_json
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from xvalid.dtypes import StoredTensor, quantize_q8, to_bfloat16, to_float16
from xvalid.errors import ConfigError
from xvalid.modelfile import named_tensors, read_model

sys.path.insert(0, str(ENGINES))
import seedfile  # noqa: E402  (the numpy engine's own reader)

ENGINE = f"{sys.executable} {ENGINES / 'numpy_engine.py'} {{model}} {{out}}"
# name -> generate flags; int8-row: one scale per output row
DTYPES = {"float16": ["--weight-dtype", "float16"], "bfloat16": ["--weight-dtype", "bfloat16"],
          "int8": ["--weight-dtype", "int8"],
          "int8-row": ["--weight-dtype", "int8", "--quant-block", "row"]}
SIZE = ["--hidden", "64", "--layers", "2", "--heads", "8", "--kv-heads", "2", "--vocab", "96",
        "--intermediate", "80", "--seq-len", "6", "--batch-size", "2", "--pad", "1"]  # I = 80: a partial block


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """'float32' and every DTYPES name -> a generated JSON model of SIZE (the same seed)."""
    from xvalid.cli import main

    root = tmp_path_factory.mktemp("dtypes")
    out = {}
    for name, flags in {"float32": [], **DTYPES}.items():
        out[name] = root / f"{name}.json"
        with pytest.raises(SystemExit) as done:
            main(["generate", *SIZE, *flags, "-o", str(out[name])])
        assert done.value.code == 0
    return out


# ---- the conversions ------------------------------------------------------------------------

def torch_bits(array: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """torch's float32 -> dtype conversion (round to nearest even), as uint16 bits."""
    return torch.from_numpy(array).to(dtype).view(torch.int16).numpy().view(np.uint16)


FLOAT32 = hnp.arrays(np.float32, st.integers(1, 200),
                     elements=st.floats(-6e4, 6e4, width=32, allow_subnormal=True))


@settings(max_examples=60, deadline=None)
@given(values=FLOAT32)
def test_half_conversions_round_as_torch_does(values):
    assert np.array_equal(to_float16(values).data.view(np.uint16), torch_bits(values, torch.float16))
    assert np.array_equal(to_bfloat16(values).data, torch_bits(values, torch.bfloat16))


@pytest.mark.parametrize("bits,bf16", [
    (0x3F808000, 0x3F80),  # exactly halfway between 0x3F80 and 0x3F81: to the even one
    (0x3F818000, 0x3F82),  # halfway between 0x3F81 and 0x3F82: up, to the even one
    (0x3F808001, 0x3F81),  # just above halfway: up
    (0xBF807FFF, 0xBF80),  # just below halfway, negative: down in magnitude
    (0x7F7F7FFF, 0x7F7F),  # the largest float32 that stays finite in bfloat16
])
def test_bfloat16_ties_go_to_even(bits, bf16):
    value = np.array([bits], np.uint32).view(np.float32)
    assert int(to_bfloat16(value).data[0]) == bf16


def test_float16_ties_go_to_even():
    one_ulp = 2.0 ** -10  # float16's spacing at 1
    values = np.array([1 + one_ulp / 2, 1 + 3 * one_ulp / 2, 2048 + 1, 2048 + 3], np.float32)
    assert to_float16(values).data.tolist() == [1.0, 1 + 2 * one_ulp, 2048, 2052]


@pytest.mark.parametrize("convert,value", [(to_float16, 65520.0), (to_float16, -1e5),
                                           (to_bfloat16, 3.4028235e38)])
def test_a_value_beyond_the_range_is_refused_not_stored_as_infinity(convert, value):
    with pytest.raises(ConfigError, match="does not fit in"):
        convert(np.array([0.5, value], np.float32), "weights.x")


def test_upcasts_are_exact_for_every_bit_pattern():
    """All 65536 patterns of each half type against torch's own upcast."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    as_half = torch.from_numpy(bits.view(np.int16)).view(torch.float16).float().numpy()
    as_bf16 = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    got_half = StoredTensor("float16", bits.view("<f2")).to_float32()
    got_bf16 = StoredTensor("bfloat16", bits).to_float32()
    assert got_half.dtype == got_bf16.dtype == np.float32
    assert np.array_equal(got_half, as_half, equal_nan=True)
    assert np.array_equal(got_bf16, as_bf16, equal_nan=True)
    assert np.array_equal(got_bf16.view(np.uint32), bits.astype(np.uint32) << 16)


# ---- quantize_q8 ----------------------------------------------------------------------------

NORMAL = st.one_of(st.just(0.0), st.floats(2.0 ** -100, 2.0 ** 100, width=32),
                   st.floats(-(2.0 ** 100), -(2.0 ** -100), width=32))


@st.composite
def matrices(draw):
    rows, columns = draw(st.integers(1, 5)), draw(st.integers(1, 100))
    block = draw(st.one_of(st.none(), st.sampled_from([1, 2, 7, 32, 33, 64]).filter(lambda b: b <= columns)))
    scale = draw(st.sampled_from([1e-3, 0.02, 1.0, 1e3]))
    array = draw(hnp.arrays(np.float32, (rows, columns), elements=NORMAL))
    mixed = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal((rows, columns))
    use_random = draw(st.booleans())  # hypothesis's arrays are mostly equal values; mix in normal ones
    return (mixed * scale).astype(np.float32) if use_random else array, block


@settings(max_examples=120, deadline=None)
@given(case=matrices())
def test_quantize_q8_error_is_at_most_half_a_scale(case):
    array, block = case
    rows, columns = array.shape
    q = quantize_q8(array, block)
    size = columns if block is None else block
    blocks = math.ceil(columns / size)
    assert (q.dtype, q.block_size, q.data.dtype, q.scales.dtype) == ("int8", size, np.int8, np.float32)
    assert q.data.shape == (rows, columns) and q.scales.shape == (rows, blocks)
    assert q.data.min(initial=0) >= -127
    for r in range(rows):
        for b in range(blocks):
            chunk = array[r, b * size:(b + 1) * size].astype(np.float64)
            scale = q.scales[r, b]
            assert scale == np.float32(np.abs(chunk).max() / 127) or (
                scale == np.float32(np.float32(np.abs(chunk).max()) / np.float32(127)))
            exact = q.data[r, b * size:(b + 1) * size].astype(np.float64) * np.float64(scale)
            assert np.all(np.abs(chunk - exact) <= np.float64(scale) / 2 * (1 + 1e-9)), (r, b)
            if not chunk.any():
                assert scale == 0 and not q.data[r, b * size:(b + 1) * size].any()
    # the float32 values the file means: q * scale in one float32 multiply
    per_column = np.repeat(q.scales, size, axis=1)[:, :columns]
    assert np.array_equal(q.to_float32(), q.data.astype(np.float32) * per_column)


def test_quantize_q8_rounds_half_to_even():
    """absmax 127 gives scale 1: x / scale is x itself, and the halves go to even."""
    row = np.array([[127, 0.5, 1.5, 2.5, -0.5, -1.5, 126.5, -3.5]], np.float32)
    q = quantize_q8(row, 8)
    assert q.scales.tolist() == [[1.0]]
    assert q.data.tolist() == [[127, 0, 2, 2, 0, -2, 126, -4]]


def test_quantize_q8_partial_last_block_and_per_row():
    array = np.arange(1, 11, dtype=np.float32).reshape(1, 10)  # blocks [1..4] [5..8] [9, 10]
    q = quantize_q8(array, 4)
    assert np.allclose(q.scales, [[4 / 127, 8 / 127, 10 / 127]])
    row = quantize_q8(array, None)
    assert row.block_size == 10 and np.allclose(row.scales, [[10 / 127]])


@pytest.mark.parametrize("block", [0, 11])
def test_quantize_q8_refuses_a_block_outside_the_row(block):
    with pytest.raises(ConfigError, match=r"must be in \[1, 10\]"):
        quantize_q8(np.ones((2, 10), np.float32), block)


# ---- both containers ------------------------------------------------------------------------

@pytest.mark.parametrize("name", DTYPES)
def test_round_trip_through_both_containers_is_byte_identical(cli, files, tmp_path, name):
    st_path, back = tmp_path / "m.safetensors", tmp_path / "back.json"
    assert cli("convert", files[name], st_path).code == 0
    assert cli("convert", st_path, back).code == 0
    again = tmp_path / "again.safetensors"
    assert cli("convert", back, again).code == 0
    assert again.read_bytes() == st_path.read_bytes()
    models = [read_model(p) for p in (files[name], st_path, back)]
    assert models[0].storage and all(m.storage.keys() == models[0].storage.keys() for m in models)
    for key, stored in models[0].storage.items():
        for other in models[1:]:
            assert other.storage[key].dtype == stored.dtype and other.storage[key].block_size == stored.block_size
            assert other.storage[key].data.tobytes() == stored.data.tobytes(), key
            if stored.scales is not None:
                assert other.storage[key].scales.tobytes() == stored.scales.tobytes(), key
    for tensors in zip(*(named_tensors(m) for m in models)):
        assert all(t[1].tobytes() == tensors[0][1].tobytes() for t in tensors), tensors[0][0]
    assert all(m.source_logits.tobytes() == models[0].source_logits.tobytes() for m in models)
    assert all(m.meta == models[0].meta and m.source_weight_dtype == "float32" for m in models)


def test_format_version_is_1_for_float32_files_and_2_otherwise(cli, files, tmp_path):
    from safetensors import safe_open

    for name, version in (("float32", 1), ("int8", 2), ("bfloat16", 2)):
        assert json.loads(files[name].read_text())["format_version"] == version
        st_path = tmp_path / f"{name}.safetensors"
        assert cli("convert", files[name], st_path).code == 0
        with safe_open(str(st_path), "np") as f:
            assert f.metadata()["format_version"] == str(version)


def test_stored_bytes_are_what_the_safetensors_library_reads(cli, files, tmp_path):
    """The library reads our F16 and I8 tensors (numpy) and BF16 (torch) as we stored them,
    and the scales and block sizes sit where the docs say."""
    from safetensors import safe_open

    for name in DTYPES:
        st_path = tmp_path / f"{name}.safetensors"
        assert cli("convert", files[name], st_path).code == 0
        mf = read_model(files[name])
        framework = "pt" if name == "bfloat16" else "np"
        with safe_open(str(st_path), framework) as f:
            blocks = json.loads(f.metadata().get("quantization", "{}"))
            assert json.loads(f.metadata()["source"]) == {"weight_dtype": "float32"}
            assert np.array_equal(np.asarray(f.get_tensor("source.logits")), mf.source_logits)
            for key, stored in mf.storage.items():
                got = f.get_tensor(key)
                got = got.view(torch.int16).numpy().view(np.uint16) if framework == "pt" else got
                assert got.dtype == stored.data.dtype and got.tobytes() == stored.data.tobytes(), key
                if stored.dtype == "int8":
                    assert np.array_equal(f.get_tensor(key + ".scales"), stored.scales)
                    assert blocks[key] == {"block_size": stored.block_size}


def test_dtypes_mix_in_one_file(tmp_path):
    """Each tensor states its own dtype: a file with float16 norms, bfloat16 attention and int8
    FFN weights reads back as written, and the model is the one its stored values define."""
    from xvalid.config import PRESETS
    from xvalid.generate import generate_model
    from xvalid.modelfile import write_model

    mf = generate_model(PRESETS["tiny"])
    for i, layer in enumerate(mf.weights.layers):
        for name, convert in (("rms_attn", to_float16), ("wq", to_bfloat16), ("w_up", quantize_q8)):
            stored = convert(getattr(layer, name))
            mf.storage[f"weights.layers[{i}].{name}"] = stored
            setattr(layer, name, stored.to_float32())
    for container in ("json", "safetensors"):
        path = tmp_path / f"mixed.{container}"
        write_model(mf, path, progress=False, container=container)
        back = read_model(path)
        assert back.weight_dtype == "mixed"
        assert {k: s.dtype for k, s in back.storage.items()} == {k: s.dtype for k, s in mf.storage.items()}
        for (key, a), (_, b) in zip(named_tensors(mf), named_tensors(back)):
            assert a.tobytes() == b.tobytes(), key


# ---- generate and convert -------------------------------------------------------------------

def test_generate_records_the_float32_model_and_its_logits(files):
    plain, q = read_model(files["float32"]), read_model(files["int8"])
    from xvalid.reference import Reference
    source = Reference(plain, "float64").forward(plain.input_ids, plain.attention_mask).numpy()
    assert q.source_logits.dtype == np.float32 and np.array_equal(q.source_logits, source.astype(np.float32))
    assert q.meta["quantization"] == {"weight_dtype": "int8", "scheme": "q8_0", "block_size": 32,
                                      "from": "float32"}
    assert read_model(files["int8-row"]).meta["quantization"]["block_size"] == "row"
    # every int8 matrix is the float32 one quantised; the norms stay float32
    for (key, a), (_, b) in zip(named_tensors(plain), named_tensors(q)):
        if not key.startswith("weights."):
            assert a.tobytes() == b.tobytes()
        elif a.ndim == 1:
            assert key not in q.storage and a.tobytes() == b.tobytes(), key
        else:
            assert np.array_equal(quantize_q8(a, 32).data, q.storage[key].data), key
    assert "--weight-dtype int8 --quant-block 32" in q.meta["generator"]["command"]


def test_convert_quantises_like_generate(cli, files, tmp_path):
    """generate + convert --weight-dtype gives generate --weight-dtype's file, whose generator
    command makes it again."""
    out = tmp_path / "q.json"
    result = cli("convert", files["float32"], out, "--weight-dtype", "int8")
    assert result.code == 0 and "weights float32 -> int8" in result.out
    assert out.read_bytes()[:1] == b"{"  # with --weight-dtype: MODEL's container
    assert out.read_bytes() == files["int8"].read_bytes()


def test_converting_back_to_float32_keeps_the_stored_values(cli, files, tmp_path):
    out = tmp_path / "f32.json"
    assert cli("convert", files["int8"], out, "--weight-dtype", "float32").code == 0
    q, back = read_model(files["int8"]), read_model(out)
    assert back.storage == {} and json.loads(out.read_text())["format_version"] == 1
    for (key, a), (_, b) in zip(named_tensors(q), named_tensors(back)):
        assert a.tobytes() == b.tobytes(), key
    assert np.array_equal(back.source_logits, q.source_logits)  # the record stays
    assert "command" not in back.meta["generator"]  # no generate command makes this file


def test_converting_to_what_a_file_stores_changes_nothing(cli, files, tmp_path):
    out = tmp_path / "same.json"
    assert cli("convert", files["bfloat16"], out, "--weight-dtype", "bfloat16").code == 0
    assert out.read_bytes() == files["bfloat16"].read_bytes()


def test_converting_a_converted_file_keeps_the_first_source(cli, files, tmp_path):
    out = tmp_path / "twice.json"
    assert cli("convert", files["bfloat16"], out, "--weight-dtype", "int8").code == 0
    twice, once = read_model(out), read_model(files["bfloat16"])
    assert twice.source_weight_dtype == "float32"
    assert np.array_equal(twice.source_logits, once.source_logits)
    assert twice.meta["quantization"]["from"] == "bfloat16"
    for key, stored in twice.storage.items():  # quantised from the bfloat16 values
        array = dict(named_tensors(once))[key]
        assert np.array_equal(stored.data, quantize_q8(array, 32).data), key


@pytest.mark.parametrize("flags,needle", [
    (["--quant-block", "0"], "'0' is not a positive whole number or 'row'"),
    (["--quant-block", "x"], "'x' is not a positive whole number or 'row'"),
    (["--quant-block", "65"], "int8 block size 65 must be in [1, 64]"),
    (["--weight-dtype", "int4"], "'int4' is not one of"),
    (["--weight-dtype", "bfloat16", "--quant-block", "32"], "--quant-block applies to --weight-dtype int8 only"),
])
def test_bad_weight_dtype_flags_are_one_line(cli, tmp_path, flags, needle):
    out = tmp_path / "m.json"
    result = cli("generate", "--weight-dtype", "int8", *flags, "-o", out)
    result.assert_one_line_error(2, needle)
    assert not out.exists()


def test_a_weight_beyond_float16_is_refused_in_one_line(cli, tmp_path):
    out = tmp_path / "m.json"
    cli("generate", "--init-std", "1e5", "--weight-dtype", "float16", "-o", out).assert_one_line_error(
        2, "does not fit in float16")
    assert not out.exists()


def test_inspect_shows_storage_dtypes_and_weight_bytes(cli, files):
    result = cli("inspect", files["int8"])
    assert result.code == 0, result.err
    mf = read_model(files["int8"])
    matrices = [(k, s) for k, s in mf.storage.items()]
    int8_bytes = sum(s.data.size for _, s in matrices)  # one byte a weight
    scale_bytes = sum(4 * s.scales.size for _, s in matrices)
    norm_bytes = sum(4 * a.size for k, a in named_tensors(mf) if k.startswith("weights.") and a.ndim == 1)
    assert f"{int8_bytes:,} B int8, {scale_bytes:,} B int8 scales, {norm_bytes:,} B float32" in result.out
    assert "int8 (block 32)" in result.out and "source.logits" in result.out
    wq = mf.storage["weights.layers[0].wq"]
    row = next(line for line in result.out.splitlines() if "weights.layers[0].wq " in line)
    assert f"{wq.data.size + 4 * wq.scales.size:,}" in row
    half = cli("inspect", files["bfloat16"], "--no-tensors")
    assert "weights: bfloat16:" in half.out and "50% of float32" in half.out


# ---- compare: the quantisation cost ---------------------------------------------------------

@pytest.fixture(scope="module")
def reports(files, tmp_path_factory) -> dict[str, tuple[int, str, dict]]:
    """name -> (exit code, stdout, JSON report) of `compare --backends torch --engine <numpy
    engine>` on each file, one timing run: every test below reads these."""
    import contextlib
    import io

    from xvalid.cli import main

    root = tmp_path_factory.mktemp("reports")
    out = {}
    for name, path in files.items():
        report, text = root / f"{name}.json", io.StringIO()
        with contextlib.redirect_stdout(text), pytest.raises(SystemExit) as done:
            main(["compare", str(path), "--backends", "torch", "--engine", ENGINE, "--repeat", "1",
                  "--warmup", "0", "--json", str(report)])
        out[name] = (done.value.code, text.getvalue(), json.loads(report.read_text()))
    return out

def independent_cost(quantized: np.ndarray, source: np.ndarray, keep: np.ndarray) -> dict:
    """The same numbers through torch, written apart from metrics.py."""
    q = torch.from_numpy(quantized[keep]).double()
    s = torch.from_numpy(source[keep]).double()
    kl = torch.nn.functional.kl_div(q.log_softmax(-1), s.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    top = s.argmax(-1)
    dp = q.softmax(-1).gather(1, top[:, None]) - s.softmax(-1).gather(1, top[:, None])
    return {"kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
            "kl_p99": torch.quantile(kl, 0.99).item(),
            "top1_agree": int((q.argmax(-1) == top).sum()), "dp_rms": dp.pow(2).mean().sqrt().item()}


@pytest.mark.parametrize("name", DTYPES)
def test_compare_reports_the_quantisation_cost_beside_the_verdict(cli, files, reports, tmp_path, name):
    code, out, report = reports[name]
    assert code == 0, out
    assert "quantisation cost" in out and "not part of the verdict" in out
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(report, json.loads((REPO / "python/xvalid/schemas/compare-report.schema.json").read_text()))
    cost = report["quantization"]
    mf = read_model(files[name])
    assert cost["weight_dtype"] == report["model"]["weight_dtype"] == name.split("-")[0]
    assert cost["source_weight_dtype"] == "float32"
    logits = tmp_path / "ref.npy"  # the stored model in float64, as the source was computed
    assert cli("run", files[name], "--dtype", "float64", "-o", logits).code == 0
    keep = mf.attention_mask.astype(bool)
    expected = independent_cost(np.load(logits), mf.source_logits, keep)
    for key in ("kl_mean", "kl_max", "kl_p99", "dp_rms"):
        assert cost[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-15), key
    assert cost["top1_agree"] == expected["top1_agree"] and cost["rows"] == int(keep.sum())
    assert 0 < cost["kl_mean"] <= cost["kl_max"] and cost["kl_median"] <= cost["kl_p99"] <= cost["kl_max"]
    assert report["verdict"] == "pass"  # the cost is beside the verdict


def test_quantisation_cost_grows_with_coarser_storage(reports):
    """bfloat16 keeps 8 bits of mantissa, float16 11: its cost is the larger; per-row int8
    scales are coarser than per-32 ones."""
    kl = {name: reports[name][2]["quantization"]["kl_mean"] for name in DTYPES}
    assert kl["float16"] < kl["bfloat16"]
    assert kl["int8"] < kl["int8-row"]


def test_a_float32_file_has_no_quantisation_cost(reports):
    code, out, report = reports["float32"]
    assert code == 0 and report["quantization"] is None and report["model"]["weight_dtype"] == "float32"
    assert "quantisation cost" not in out


# ---- every implementation on every dtype ----------------------------------------------------

@pytest.mark.parametrize("name", DTYPES)
def test_numpy_engine_reads_the_dtypes_as_xvalid_does(files, name):
    """The engine's own reader (seedfile.py) and xvalid's give the same float32 weights."""
    doc = seedfile.read_model(files[name])
    mf = read_model(files[name])
    w = doc["weights"]
    ours = {"weights.tok_embedding": w["tok_embedding"], "weights.final_rms": w["final_rms"],
            "weights.lm_head": w["lm_head"]}
    for i, layer in enumerate(w["layers"]):
        ours.update({f"weights.layers[{i}].{k}": v for k, v in layer.items()})
    for key, array in named_tensors(mf):
        if key.startswith("weights."):
            assert ours[key].dtype == np.float32 and ours[key].tobytes() == array.tobytes(), key


@pytest.mark.parametrize("name", DTYPES)
def test_numpy_engine_passes_at_the_float32_budget(reports, name):
    plain = reports["float32"][2]["tolerance"]
    code, out, report = reports[name]
    assert code == 0, out
    tol = report["tolerance"]
    assert tol["dtype"] == "float32" and tol["atol_source"] == plain["atol_source"]
    assert [c["status"] for c in report["candidates"]] == ["pass", "pass"]


@pytest.mark.parametrize("name", ["bfloat16", "int8"])
def test_an_engine_that_ignores_the_stored_weights_fails(cli, files, tmp_path, name):
    """A candidate that runs the unquantised float32 model is caught at the float32 budget:
    the conversion moves the logits far beyond float32 noise."""
    ignores = f"{sys.executable} {ENGINES / 'numpy_engine.py'} {files['float32']} {{out}}"
    result, report = compare_json(cli, tmp_path, files[name], "--engine", ignores)
    assert result.code == 1, result.out
    assert report["candidates"][1]["status"] == "fail"
    assert report["candidates"][1]["metrics"]["budget_used"] > 10




@pytest.mark.parametrize("backend", ["cpp", "cpp-clear"])
@pytest.mark.parametrize("name", DTYPES)
def test_cpp_kernels_pass_at_the_float32_budget(cli, files, tmp_path, name, backend):
    result, report = compare_json(cli, tmp_path, files[name], "--backends", f"torch,{backend}")
    assert result.code == 0, result.out + result.err
    assert report["tolerance"]["dtype"] == "float32"
    assert [c["status"] for c in report["candidates"]] == ["pass", "pass"]


@pytest.mark.parametrize("name", DTYPES)
def test_cpp_reads_both_containers_alike(cli, files, tmp_path, name):
    st_path = tmp_path / "m.safetensors"
    assert cli("convert", files[name], st_path).code == 0
    outs = []
    for path in (files[name], st_path):
        out = tmp_path / f"{path.suffix}.npy"
        assert cli("run", path, "--backend", "cpp", "-o", out).code == 0
        outs.append(np.load(out))
    assert outs[0].tobytes() == outs[1].tobytes()


# ---- the docs' readers ----------------------------------------------------------------------

def doc_snippet(language: str, needle: str) -> str:
    doc = (REPO / "docs" / "model-format.md").read_text()
    snippets = [part.split("```", 1)[0] for part in doc.split(f"```{language}\n")[1:]]
    return next(text for text in snippets if needle in text)


@pytest.mark.parametrize("name", DTYPES)
def test_numpy_doc_reader_reads_every_dtype(files, name):
    scope = {"__name__": "doc"}
    snippet = doc_snippet("python", "model.json").replace("model.json", str(files[name]))
    exec(compile(snippet, "model-format.md", "exec"), scope)
    mf = read_model(files[name])
    assert scope["wq"].dtype == np.float32 and np.array_equal(scope["wq"], mf.weights.layers[0].wq)
    layer = scope["model"]["weights"]["layers"][1]
    assert np.array_equal(scope["tensor"](layer["w_down"]), mf.weights.layers[1].w_down)
    assert np.array_equal(scope["tensor"](layer["rms_ffn"]), mf.weights.layers[1].rms_ffn)


@pytest.mark.parametrize("name", ["float16", "int8"])
def test_safetensors_doc_reader_reads_the_dtypes(cli, files, tmp_path, name):
    st_path = tmp_path / "m.safetensors"
    assert cli("convert", files[name], st_path).code == 0
    scope = {"__name__": "doc"}
    exec(compile(doc_snippet("python", "m.safetensors").replace("m.safetensors", str(st_path)),
                 "model-format.md", "exec"), scope)
    assert np.array_equal(scope["wq"], read_model(st_path).weights.layers[0].wq)


HARNESS = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
// argv: dtype rows columns block < stored bytes (then the float32 scales for int8) > floats
int main(int argc, char** argv) {
    std::string dtype = argv[1];
    long R = std::atol(argv[2]), C = std::atol(argv[3]), block = std::atol(argv[4]);
    std::vector<float> out(R * C);
    if (dtype == "int8") {
        long blocks = (C + block - 1) / block;
        std::vector<int8_t> q(R * C);
        std::vector<float> scales(R * blocks);
        if (std::fread(q.data(), 1, q.size(), stdin) != q.size()) return 1;
        if (std::fread(scales.data(), 4, scales.size(), stdin) != scales.size()) return 1;
        dequantize_q8(q.data(), scales.data(), R, C, block, out.data());
    } else {
        std::vector<uint16_t> bits(R * C);
        if (std::fread(bits.data(), 2, bits.size(), stdin) != bits.size()) return 1;
        for (long i = 0; i < R * C; ++i) out[i] = dtype == "float16" ? f16_to_float(bits[i]) : bf16_to_float(bits[i]);
    }
    std::fwrite(out.data(), 4, out.size(), stdout);
}
"""


@pytest.fixture(scope="module")
def cpp_reader(tmp_path_factory) -> Path:
    """The docs' C++ reader snippet, compiled with a small main around it."""
    import shutil
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    root = tmp_path_factory.mktemp("cpp-reader")
    source = root / "reader.cpp"
    source.write_text("#include <string>\n" + doc_snippet("cpp", "bf16_to_float") + HARNESS)
    binary = root / "reader"
    proc = subprocess.run([compiler, "-std=c++17", "-O1", "-Wall", "-Werror", str(source), "-o", str(binary)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return binary


@pytest.mark.parametrize("name", ["float16", "bfloat16", "int8", "int8-row"])
def test_cpp_doc_reader_gives_the_values_xvalid_reads(files, cpp_reader, name):
    mf = read_model(files[name])
    for key in ("weights.layers[0].w_down", "weights.tok_embedding"):
        stored = mf.storage[key]
        R, C = stored.shape
        payload = stored.data.tobytes() + (stored.scales.tobytes() if stored.scales is not None else b"")
        proc = subprocess.run([str(cpp_reader), stored.dtype, str(R), str(C), str(stored.block_size or 1)],
                              input=payload, capture_output=True, timeout=60)
        assert proc.returncode == 0
        got = np.frombuffer(proc.stdout, np.float32).reshape(R, C)
        assert got.tobytes() == dict(named_tensors(mf))[key].tobytes(), key


def test_cpp_doc_reader_converts_every_half_bit_pattern(cpp_reader):
    """Subnormals, zeros, infinities, NaNs: the snippet's float16 and bfloat16 upcasts against
    torch's for all 65536 patterns."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    for dtype, torch_dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        proc = subprocess.run([str(cpp_reader), dtype, "1", str(bits.size), "1"], input=bits.tobytes(),
                              capture_output=True, timeout=60)
        assert proc.returncode == 0
        expected = torch.from_numpy(bits.view(np.int16)).view(torch_dtype).float().numpy()
        got = np.frombuffer(proc.stdout, np.float32)
        assert np.array_equal(got, expected, equal_nan=True), dtype
