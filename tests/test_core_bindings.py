"""xvalid._core, binding by binding (csrc/bindings/module.cpp), and the xvalid-run runner.

Bad model files are made from a good one by editing its JSON; each must raise
ModelFileError (a ValueError) naming the key. Bad step inputs must raise ValueError and
leave the KV cache as it was.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import find_runner
from xvalid import _core

REPO = Path(__file__).resolve().parents[1]


# ---- helpers -----------------------------------------------------------------------

def load_doc(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_doc(doc: dict, path: Path) -> Path:
    Path(path).write_text(json.dumps(doc))
    return path


def tensor_array(entry: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(entry["data"]), dtype=entry["dtype"]).reshape(entry["shape"])


def set_tensor(entry: dict, array: np.ndarray) -> None:
    entry["data"] = base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()
    entry["shape"] = list(array.shape)


def intermediate_specs(cfg: dict, B: int, S: int) -> dict[str, tuple[int, ...]]:
    """Every name and shape of docs/intermediates.md, in the table's (forward) order."""
    dims = {"B": B, "S": S, "H": cfg["hidden_size"], "NH": cfg["num_attention_heads"],
            "KVH": cfg["num_key_value_heads"], "hd": cfg["head_dim"], "I": cfg["intermediate_size"],
            "V": cfg["vocab_size"]}
    rows = re.findall(r"^\| `([^`]+)` \| \(([^)]*)\) \|", (REPO / "docs/intermediates.md").read_text(), re.M)
    assert rows, "docs/intermediates.md has no table rows"
    shape_of = lambda text: tuple(dims[d.strip()] for d in text.split(","))  # noqa: E731
    per_layer = [(name, shape) for name, shape in rows if "{l}" in name]
    specs = {}
    for name, shape in rows:
        if "{l}" not in name:
            specs[name] = shape_of(shape)
        elif (name, shape) == per_layer[0]:  # the per-layer block, once for every layer
            for l in range(cfg["num_hidden_layers"]):
                specs.update({n.replace("{l}", str(l)): shape_of(s) for n, s in per_layer})
    return specs


@pytest.fixture(scope="module")
def model_path(tiny_model) -> Path:
    """The default generated model: H=64 L=2 NH=8 KVH=2 V=128, inputs B=2 S=5 with padding."""
    return tiny_model


@pytest.fixture(params=_core.kernels())
def model(model_path, request):
    """The tiny model on each kernel: every forward and capture test runs on fast and clear."""
    return _core.Model(model_path, request.param)


# ---- loading: every bad file is a ModelFileError naming the key ----------------------

def _set_wq_shape(doc):
    doc["weights"]["layers"][0]["wq"]["shape"] = [32, 64]


def _bad_base64(doc):
    entry = doc["weights"]["layers"][1]["w_up"]
    entry["data"] = entry["data"][:8] + "!" + entry["data"][9:]


def _nan_weight(doc):
    entry = doc["weights"]["layers"][1]["wo"]
    array = tensor_array(entry).copy()
    array.flat[17] = np.nan
    set_tensor(entry, array)


LOAD_ERRORS = {
    "missing key": (lambda d: d["weights"]["layers"][1].pop("wk"), ["weights.layers[1].wk", "missing"]),
    "missing config key": (lambda d: d["config"].pop("vocab_size"), ["config.vocab_size", "missing"]),
    "wrong shape": (_set_wq_shape, ["weights.layers[0].wq", "[32, 64]", "[64, 64]"]),
    "bad base64": (_bad_base64, ["weights.layers[1].w_up", "base64", "'!'", "offset 8"]),
    "bad base64 length": (lambda d: d["rope"]["sin"].update(data=d["rope"]["sin"]["data"][:-1]),
                          ["rope.sin", "base64 characters"]),
    "short data": (lambda d: d["weights"]["final_rms"].update(data=d["weights"]["final_rms"]["data"][:-8]),
                   ["weights.final_rms", "base64 characters"]),
    "wrong dtype": (lambda d: d["weights"]["tok_embedding"].update(dtype="int32"),
                    ["weights.tok_embedding", "int32", "float32"]),
    "float8": (lambda d: d["weights"]["layers"][0]["w_down"].update(dtype="float8_e4m3"),
               ["weights.layers[0].w_down", "float8_e4m3 is not supported yet"]),
    "unknown dtype": (lambda d: d["rope"]["cos"].update(dtype="complex7"), ["rope.cos", "dtype expected float32, found 'complex7'"]),
    "wrong encoding": (lambda d: d["weights"]["final_rms"].update(encoding="hex"), ["weights.final_rms", "hex"]),
    "nan weight": (_nan_weight, ["weights.layers[1].wo", "non-finite value nan at index [0, 17]"]),
    "absurd size": (lambda d: d["config"].update(hidden_size=10**9), ["config.hidden_size", "1000000000"]),
    "huge int": (lambda d: d["config"].update(vocab_size=2**70), ["config.vocab_size"]),
    "negative size": (lambda d: d["config"].update(num_hidden_layers=-2), ["config.num_hidden_layers", "-2"]),
    "float size": (lambda d: d["config"].update(intermediate_size=192.5), ["config.intermediate_size"]),
    "bad gqa": (lambda d: d["config"].update(num_key_value_heads=3), ["config.num_key_value_heads", "3"]),
    "layer count": (lambda d: d["weights"]["layers"].pop(), ["weights.layers", "2 layers, found 1"]),
    "format_version 3": (lambda d: d.update(format_version=3), ["format_version", "3", "newer"]),
    "inputs mask shape": (lambda d: d["inputs"]["attention_mask"].update(shape=[5, 2]),
                          ["inputs.attention_mask", "[5, 2]"]),
    "not an object": (lambda d: d.update(weights=[]), ["weights", "object"]),
}


@pytest.mark.parametrize("case", LOAD_ERRORS)
def test_load_error_names_the_key(model_path, tmp_path, case):
    edit, expected = LOAD_ERRORS[case]
    doc = load_doc(model_path)
    edit(doc)
    path = write_doc(doc, tmp_path / "bad.json")
    with pytest.raises(_core.ModelFileError) as err:
        _core.Model(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"


def test_model_file_error_is_a_value_error():
    assert issubclass(_core.ModelFileError, ValueError)
    assert issubclass(_core.InputError, ValueError)


def test_missing_file(tmp_path):
    with pytest.raises(_core.ModelFileError, match="cannot open"):
        _core.Model(tmp_path / "nope.json")
    with pytest.raises(_core.ModelFileError, match="directory"):
        _core.Model(tmp_path)


@pytest.mark.parametrize("cut", [0, 1, 1000, -3])
def test_truncated_json(model_path, tmp_path, cut):
    text = model_path.read_text()
    path = tmp_path / "cut.json"
    path.write_text(text[:cut])
    with pytest.raises(_core.ModelFileError, match=r"not valid JSON: .*parse error at line \d+, column \d+"):
        _core.Model(path)


@pytest.mark.parametrize("where", ["end", "middle"])
def test_nul_byte_is_not_the_end_of_the_file(model_path, tmp_path, where):
    """nlohmann's parser stops at NUL: the loader refuses it rather than ignore what follows."""
    text = model_path.read_text()
    at = len(text) - 3 if where == "end" else len(text) // 2
    path = tmp_path / "nul.json"
    path.write_text(text[:at] + "\x00" + text[at:])
    with pytest.raises(_core.ModelFileError, match=rf"not valid JSON: NUL byte at offset {at}"):
        _core.Model(path)


def test_optional_keys_and_extra_keys(model_path, model, tmp_path):
    """lm_head, max_position_embeddings, rms_norm_eps, rope_theta and a tensor's encoding may be
    left out; unknown keys are ignored."""
    doc = load_doc(model_path)
    del doc["weights"]["lm_head"]
    for key in ("max_position_embeddings", "rms_norm_eps", "rope_theta"):
        doc["config"].pop(key)
    doc["future_section"] = {"anything": [1, 2, 3]}
    doc["weights"]["layers"][0]["unused_tensor"] = {"dtype": "float64"}
    inputs = doc["inputs"]
    for tensor in (*doc["rope"].values(), *inputs.values()):
        tensor.pop("encoding")  # absent means base64
    m = _core.Model(write_doc(doc, tmp_path / "minimal.json"), model.kernel)
    cfg = m.config
    assert cfg["max_position_embeddings"] == len(tensor_array(doc["rope"]["cos"]))
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 1e6
    ids, mask = tensor_array(inputs["input_ids"]), tensor_array(inputs["attention_mask"])
    np.testing.assert_array_equal(m.forward(ids, mask), model.forward(ids, mask))


@pytest.mark.parametrize("section", ["config", "meta"])
def test_stated_head_dim_must_be_hidden_over_heads(model_path, tmp_path, section):
    doc = load_doc(model_path)
    doc[section]["head_dim"] = 16  # docs/model.md: hd = H / NH = 8
    with pytest.raises(_core.ModelFileError, match=rf"{section}\.head_dim: expected 8 .* found 16"):
        _core.Model(write_doc(doc, tmp_path / "hd.json"))


# ---- properties -----------------------------------------------------------------------

def test_config_and_inputs(model, model_path):
    doc = load_doc(model_path)
    cfg = model.config
    assert set(cfg) == {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                        "head_dim", "vocab_size", "intermediate_size", "max_position_embeddings",
                        "rms_norm_eps", "rope_theta"}
    for key, value in cfg.items():
        assert value == doc["config"].get(key, doc["meta"].get(key)), key
    ids, mask = model.input_ids, model.attention_mask
    assert ids.dtype == np.int32 and mask.dtype == np.uint8
    np.testing.assert_array_equal(ids, tensor_array(doc["inputs"]["input_ids"]))
    np.testing.assert_array_equal(mask, tensor_array(doc["inputs"]["attention_mask"]))
    assert (mask == 0).any(), "the default model should exercise padding"
    assert "H=64" in repr(model)


def test_build_info():
    info = _core.build_info()
    assert set(info) == {"compiler", "build_type", "openmp", "fast_kernel_isa"}
    assert isinstance(info["openmp"], bool) and info["compiler"]
    assert info["fast_kernel_isa"] in ("avx2+fma", "portable")


def test_kernels_are_listed_and_chosen_by_name(model_path):
    assert _core.kernels() == ["fast", "clear"]  # the first is the default
    assert _core.Model(model_path).kernel == "fast"
    fast, clear = _core.Model(model_path, "fast"), _core.Model(model_path, kernel="clear")
    assert "kernel=clear" in repr(clear)
    ids, mask = fast.input_ids, fast.attention_mask
    keep = mask.astype(bool)
    diff = np.abs(fast.forward(ids, mask) - clear.forward(ids, mask))[keep]
    assert 0 < diff.max() < 1e-5  # the same model to float32 rounding, by different code


def test_unknown_kernel_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match=r"unknown kernel 'turbo' \(choose from fast, clear\)"):
        _core.Model(tmp_path / "missing.json", "turbo")


def test_profile_counts_every_op_and_costs_nothing_when_off(model):
    ids, mask = model.input_ids, model.attention_mask
    cfg = model.config
    B, S = ids.shape
    L, H, hd, NH = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["head_dim"], cfg["num_attention_heads"]
    model.forward(ids, mask)
    assert model.profile() == []  # off by default: nothing is timed
    model.set_profiling(True)
    model.forward(ids, mask)
    model.forward(ids, mask)
    rows = {row["op"]: row for row in model.profile()}
    assert list(rows) == ["embedding", "rmsnorm", "q_proj", "k_proj", "v_proj", "rope", "attention",
                          "o_proj", "gate_up_swiglu", "down_proj", "head"]  # forward order
    assert rows["q_proj"]["calls"] == 2 * L and rows["head"]["calls"] == 2
    assert rows["rmsnorm"]["calls"] == 2 * (2 * L + 1)
    assert rows["q_proj"]["flops"] == 2 * (2 * B * S * H * NH * hd) * L
    assert rows["head"]["flops"] == 2 * (2 * B * S * H * cfg["vocab_size"])
    assert all(row["seconds"] > 0 and row["bytes"] > 0 for row in rows.values())
    model.set_profiling(False)
    model.forward(ids, mask)
    assert {r["op"]: r["calls"] for r in model.profile()}["head"] == 2  # off again: not counted
    model.reset_profile()
    assert model.profile() == []


def test_threads(model):
    before = _core.get_num_threads()
    try:
        _core.set_num_threads(1)
        assert _core.get_num_threads() == 1
        one = model.forward(model.input_ids, model.attention_mask)
        _core.set_num_threads(2)
        assert _core.get_num_threads() == (2 if _core.build_info()["openmp"] else 1)
        # threads split whole dot products, never one sum: results are bitwise equal
        np.testing.assert_array_equal(model.forward(model.input_ids, model.attention_mask), one)
        with pytest.raises(ValueError, match=">= 1"):
            _core.set_num_threads(0)
    finally:
        _core.set_num_threads(before)


# ---- forward and capture ---------------------------------------------------------------

def test_forward_shapes_and_dtypes(model):
    ids, mask = model.input_ids, model.attention_mask
    B, S = ids.shape
    logits = model.forward(ids, mask)
    assert logits.dtype == np.float32 and logits.shape == (B, S, model.config["vocab_size"])
    assert logits.flags.c_contiguous and np.isfinite(logits).all()
    assert model.cache_len == S


def test_mask_none_is_all_ones_and_dtypes_are_accepted(model):
    ids = model.input_ids
    ones = np.ones(ids.shape, np.uint8)
    expected = model.forward(ids, ones)
    np.testing.assert_array_equal(model.forward(ids), expected)
    np.testing.assert_array_equal(model.forward(ids.astype(np.uint16), ones.astype(bool)), expected)
    np.testing.assert_array_equal(model.forward(ids.tolist(), ones.astype(np.int64).tolist()), expected)
    np.testing.assert_array_equal(model.forward(np.asfortranarray(ids.astype(np.int8))), expected)


def test_padding_changes_logits(model):
    ids, mask = model.input_ids, model.attention_mask
    padded_row = int(np.nonzero((mask == 0).any(1))[0][0])
    assert not np.array_equal(model.forward(ids, mask)[padded_row], model.forward(ids)[padded_row])


def test_capture_has_every_documented_intermediate(model):
    ids, mask = model.input_ids, model.attention_mask
    logits, captured = model.forward(ids, mask, capture=True)
    specs = intermediate_specs(model.config, *ids.shape)
    assert list(captured) == list(specs)  # every name, in forward order
    for name, array in captured.items():
        assert array.dtype == np.float32 and array.shape == specs[name], name
        assert np.isfinite(array).all(), name
    np.testing.assert_array_equal(captured["logits"], logits)
    np.testing.assert_array_equal(model.forward(ids, mask), logits)  # capture changes nothing


def test_step_decode_matches_full_forward(make_model):
    path = make_model(hidden=64, layers=2, heads=8, kv_heads=2, vocab=128, seq_len=9, batch_size=3, pad=2,
                      seed=7, max_pos=16)
    m = _core.Model(path)
    ids, mask = m.input_ids, m.attention_mask
    S, N = ids.shape[1], 4
    full = m.forward(ids, mask)
    m.reset_cache()
    assert m.cache_len == 0
    parts = [m.step(ids[:, :S - N], mask[:, :S - N])]
    for t in range(S - N, S):
        parts.append(m.step(ids[:, t:t + 1], mask[:, :t + 1]))
        assert m.cache_len == t + 1
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-5, atol=1e-6)
    # the cache grows past its first capacity up to max_position_embeddings
    for t in range(S, 16):
        m.step(ids[:, :1], np.ones((3, t + 1), np.uint8))
    assert m.cache_len == 16


def test_step_capture_free_forward_resets_cache(model):
    ids, mask = model.input_ids, model.attention_mask
    first = model.forward(ids, mask)
    model.step(ids[:, :1], np.ones((ids.shape[0], ids.shape[1] + 1), np.uint8))
    np.testing.assert_array_equal(model.forward(ids, mask), first)


# ---- step input errors: ValueError, cache untouched ---------------------------------

def _prefilled(model):
    ids, mask = model.input_ids, model.attention_mask
    model.forward(ids, mask)
    return ids, mask, ids.shape[0], ids.shape[1]


def ones(*shape, dtype=np.int64):
    return np.ones(shape, dtype)


# case -> (make (ids, mask) from B, S = cached tokens, V; the message, formatted with B, S,
# B1 = B + 1, S1 = S + 1)
STEP_ERRORS = {
    "id out of range": (lambda B, S, V: (np.full((B, 1), V), None),
                        r"input_ids\[batch 0, position 0\] = 128 is out of range \[0, 128\)"),
    "negative id": (lambda B, S, V: (np.array([[1], [-5]]), None), r"input_ids\[batch 1, position 0\] = -5"),
    "huge id": (lambda B, S, V: (np.full((B, 1), 2**40), None), str(2**40)),
    "mask wrong width": (lambda B, S, V: (ones(B, 1), ones(B, S, dtype=np.int32)),
                         r"attention_mask has shape \({B}, {S}\), expected \({B}, {S1}\)"),
    "mask wrong rows": (lambda B, S, V: (ones(B, 1), ones(B + 1, S + 1)), "attention_mask has shape"),
    "mask value 2": (lambda B, S, V: (ones(B, 1), np.concatenate([ones(B, S), 2 * ones(B, 1)], axis=1)),
                     r"attention_mask\[batch 0, key {S}\] = 2 is not 0 or 1"),
    "mask value 256": (lambda B, S, V: (ones(B, 1), 256 * ones(B, S + 1)), "= 256 is not 0 or 1"),
    "exceeds max_pos": (lambda B, S, V: (ones(B, 128 - S + 1), None), "exceed max_position_embeddings = 128"),
    "batch change": (lambda B, S, V: (ones(B + 1, 1), None), r"batch size {B1} .* KV cache's {B}"),
    "no tokens": (lambda B, S, V: (ones(B, 0), None), r"B, T >= 1"),
    "1-D ids": (lambda B, S, V: (ones(B), None), "2-D"),
    "float ids": (lambda B, S, V: (ones(B, 1, dtype=np.float32), None), "must hold integers"),
    "float mask": (lambda B, S, V: (ones(B, 1), ones(B, S + 1, dtype=np.float64)), "integers or bools"),
    "uint64 beyond int64": (lambda B, S, V: (np.full((B, 1), 2**64 - 1, np.uint64), None), r"2\*\*63"),
    "not an array": (lambda B, S, V: ("tokens", None), "input_ids must hold integers"),
}


@pytest.mark.parametrize("case", STEP_ERRORS)
def test_step_input_errors(model, case):
    make_input, pattern = STEP_ERRORS[case]
    ids, mask, B, S = _prefilled(model)
    bad_ids, bad_mask = make_input(B, S, model.config["vocab_size"])
    with pytest.raises(ValueError, match=pattern.format(B=B, S=S, B1=B + 1, S1=S + 1)):
        model.step(bad_ids, bad_mask)
    # nothing changed: the cache still holds the prefill, and decoding continues from it
    assert model.cache_len == S
    full_mask = np.concatenate([mask, np.ones((B, 1), mask.dtype)], axis=1)
    model.step(ids[:, :1], full_mask)
    assert model.cache_len == S + 1


def test_forward_input_errors(model):
    ids, mask, B, S = _prefilled(model)
    with pytest.raises(_core.InputError, match="out of range"):
        model.forward(ids + 1000, mask)
    assert model.cache_len == S  # a rejected forward keeps the cache
    with pytest.raises(ValueError, match="expected"):
        model.forward(ids, mask[:, :-1])


def test_batch_may_change_after_reset(model):
    _prefilled(model)
    model.reset_cache()
    assert model.step(np.zeros((5, 2), np.int32)).shape == (5, 2, model.config["vocab_size"])


# ---- the standalone runner -----------------------------------------------------------

RUNNER = find_runner()
needs_runner = pytest.mark.skipif(RUNNER is None, reason="xvalid-run not built (pip install the package, or "
                                  "cmake --build build/dev --target xvalid-run; or set XVALID_RUN)")


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([RUNNER, *map(str, args)], capture_output=True, text=True, timeout=120, **kwargs)


@needs_runner
def test_runner_writes_logits_and_intermediates(model, model_path, tmp_path):
    out = tmp_path / "out" / "nested"
    proc = run(model_path, out, "--intermediates", "--threads", "1", "--repeat", "2",
               "--kernel", model.kernel)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1 and "median of 2" in proc.stdout and "threads 1" in proc.stdout
    logits, captured = model.forward(model.input_ids, model.attention_mask, capture=True)
    np.testing.assert_allclose(np.load(out / "logits.npy"), logits, rtol=1e-6, atol=1e-7)
    written = {p.stem: np.load(p) for p in (out / "intermediates").glob("*.npy")}
    assert set(written) == set(captured)
    for name, array in captured.items():
        assert written[name].dtype == np.float32 and written[name].shape == array.shape, name
        np.testing.assert_allclose(written[name], array, rtol=1e-6, atol=1e-7, err_msg=name)
    assert not list(out.rglob("*.tmp-*")), "temporary files left behind"


@needs_runner
@pytest.mark.parametrize("kernel", ["fast", "clear"])
def test_runner_kernel_and_profile(model_path, tmp_path, kernel):
    proc = run(model_path, tmp_path / "out", "--kernel", kernel, "--profile", "--repeat", "3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"kernel {kernel}," in lines[0]
    table = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert lines[1].split() == ["op", "calls", "ms", "share", "GFLOP/s", "GB/s"]
    assert table["q_proj"][0] == "6" and table["head"][0] == "3"  # 2 layers x 3 forwards
    assert "attention" in table and "total" in table
    clear = _core.Model(model_path, kernel)
    np.testing.assert_allclose(np.load(tmp_path / "out" / "logits.npy"),
                               clear.forward(clear.input_ids, clear.attention_mask), rtol=1e-6, atol=1e-7)


@needs_runner
def test_runner_decodes_through_the_kv_cache_and_writes_its_timing(model, model_path, tmp_path):
    """--decode 3: decode_logits.npy (B, 3, V) equals the module's prefill-then-step decode;
    --timing: timing.json with the --repeat samples, the warmup, threads and per-step times."""
    proc = run(model_path, tmp_path, "--threads", "1", "--repeat", "3", "--warmup", "1",
               "--decode", "3", "--timing", "--kernel", model.kernel)
    assert proc.returncode == 0, proc.stderr
    assert "decode 3 steps" in proc.stdout
    ids, mask = model.input_ids, model.attention_mask
    S = ids.shape[1]
    model.reset_cache()
    model.step(ids[:, :S - 3], mask[:, :S - 3])  # prefill
    expected = np.concatenate([model.step(ids[:, t:t + 1], mask[:, :t + 1]) for t in range(S - 3, S)],
                              axis=1)
    decoded = np.load(tmp_path / "decode_logits.npy")
    assert decoded.shape == expected.shape == (ids.shape[0], 3, np.load(tmp_path / "logits.npy").shape[2])
    np.testing.assert_allclose(decoded, expected, rtol=1e-6, atol=1e-7)
    timing = json.loads((tmp_path / "timing.json").read_text())
    assert len(timing["forward_ms"]) == 3 and timing["warmup"] == 1 and timing["threads"] == 1
    assert len(timing["decode_ms"]) == 3 and timing["prefill_ms"] > 0 and timing["load_ms"] > 0
    proc = run(model_path, tmp_path / "again", "--decode", str(S))
    assert proc.returncode == 2 and f"--decode {S} needs at least one prefill token" in proc.stderr


@needs_runner
def test_runner_help():
    proc = run("--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: xvalid-run")


@needs_runner
@pytest.mark.parametrize("args,pattern", [
    ((), "expected MODEL and OUT_DIR"),
    (("{model}", "{out}", "--frobnicate"), "unknown option --frobnicate"),
    (("{model}", "{out}", "--threads", "0"), "--threads needs a positive integer"),
    (("{model}", "{out}", "--repeat"), "--repeat needs a value"),
    (("{model}", "{out}", "--kernel", "turbo"), "unknown kernel 'turbo'"),
    (("{model}", "{out}", "--kernel"), "--kernel needs a value"),
    (("{tmp}/missing.json", "{out}"), "cannot open"),
    (("{tmp}/bad.json", "{out}"), "not valid JSON"),
    (("{tmp}/no_inputs.json", "{out}"), "inputs: missing"),
])
def test_runner_bad_input_exits_2(model_path, tmp_path, args, pattern):
    (tmp_path / "bad.json").write_text(model_path.read_text()[:500])
    doc = load_doc(model_path)
    del doc["inputs"]
    write_doc(doc, tmp_path / "no_inputs.json")
    proc = run(*(a.format(model=model_path, out=tmp_path / "out", tmp=tmp_path) for a in args))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("xvalid-run: error: ") and proc.stderr.count("\n") == 1
    assert re.search(pattern, proc.stderr), proc.stderr
    assert not (tmp_path / "out" / "logits.npy").exists()


@needs_runner
def test_runner_unwritable_out_dir_exits_1(model_path, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run(model_path, blocker)
    assert proc.returncode == 1 and proc.stderr.startswith("xvalid-run: error: ")
