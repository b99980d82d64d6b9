"""Both C++ kernels on weights stored as float16, bfloat16 and int8 (Q8 blocks): they compute
in float32 from the stored values, so they must pass at the float32 budget against the torch
reference run on the same values (upcast / dequantised exactly), in both containers, over GQA
ratios and padded rows, prefill and decode. Then the loader's refusals of bad typed files, the
bad file itself through the module and the standalone runner, one line each."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CliResult, find_runner

from xvalid.backends import CppBackend, TorchBackend
from xvalid.compare import Candidate, derive_tolerance, judge, run_reference
from xvalid.config import ModelConfig
from xvalid.dtypes import store_weights
from xvalid.generate import generate_model
from xvalid.intermediates import intermediate_names
from xvalid.modelfile import named_tensors, write_model

RUNNER = find_runner()

# (weight dtype, int8 block size): Q8_0, a block size that is no multiple of 8 (the fast
# kernel's decode converts such rows before its dot products), one scale per row
STORAGES = {"float32": ("float32", 32), "float16": ("float16", 32), "bfloat16": ("bfloat16", 32),
            "int8": ("int8", 32), "int8-block5": ("int8", 5), "int8-per-row": ("int8", None)}
# (query heads, kv heads, container): every GQA ratio, both containers
LAYOUTS = {"gqa4-json": (8, 2, "json"), "gqa4-safetensors": (8, 2, "safetensors"),
           "mha-json": (8, 8, "json"), "mqa-safetensors": (8, 1, "safetensors")}
KERNELS = {"cpp": "fast", "cpp-clear": "clear"}
B, S, DECODE = 3, 9, 3


def model_config(heads: int, kv_heads: int) -> ModelConfig:
    # hidden 80: rows of 80 inputs end in a partial 16-wide Q8 block; head_dim 10
    return ModelConfig(hidden_size=80, num_hidden_layers=2, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, vocab_size=97, intermediate_size=256,
                       max_position_embeddings=32)


@pytest.fixture(scope="module")
def typed_files(tmp_path_factory):
    """(storage, layout) -> (model file, the dequantised ModelFile, its reference run and
    tolerance), made once per module."""
    folder = tmp_path_factory.mktemp("typed")
    cache = {}

    def get(storage: str, layout: str):
        if (storage, layout) not in cache:
            heads, kv_heads, container = LAYOUTS[layout]
            original = generate_model(model_config(heads, kv_heads), batch_size=B, seq_len=S, seed=7, pad=2)
            weight_dtype, block_size = STORAGES[storage]
            mf = store_weights(original, weight_dtype, block_size)
            path = folder / f"{storage}-{layout}.{container}"
            write_model(mf, path, progress=False, container=container)
            ref = run_reference(TorchBackend(mf, "float32"), TorchBackend(mf, "float64"),
                                mf.input_ids, mf.attention_mask, capture=True)
            cache[storage, layout] = (path, mf, original, ref, derive_tolerance(ref))
        return cache[storage, layout]

    return get


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("storage", STORAGES)
def test_kernel_passes_at_the_float32_budget_on_stored_weights(typed_files, storage, kernel, layout):
    path, mf, original, ref, tol = typed_files(storage, layout)
    backend = CppBackend(path, KERNELS[kernel], kernel)
    backend.set_threads(2)
    logits, intermediates = backend.forward(mf.input_ids, mf.attention_mask, capture=True)
    decoded = backend.decode(mf.input_ids, mf.attention_mask, S - DECODE)
    cand = Candidate(kernel, "backend", logits, intermediates, decoded)
    judge([cand], ref, tol, DECODE, intermediate_names(mf.config.num_hidden_layers))
    report = cand.report
    assert report["status"] == "pass", report["metrics"]
    assert report["metrics"]["budget_used"] < 0.5, report["metrics"]
    assert report["divergence"]["first"] is None
    assert report["decode"]["pass"]
    if storage != "float32":  # the stored values, not the float32 ones they came from
        assert not np.array_equal(mf.weights.layers[0].wq, original.weights.layers[0].wq)
        wrong = Candidate("original", "backend", TorchBackend(original).forward(mf.input_ids, mf.attention_mask)[0])
        judge([wrong], ref, tol)
        assert wrong.report["status"] == "fail", "the budget cannot tell the storage dtypes apart"


def st_parts(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed) and data bytes."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def st_build(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize("storage", ["float32", "float16", "bfloat16", "int8"])
def test_unaligned_safetensors_tensors_are_copied_and_give_the_same_logits(typed_files, tmp_path, storage):
    """The same file with its data one byte later (a 1-byte tensor first): no tensor is aligned
    for its dtype, so the loader copies instead of using the mapping in place; same logits."""
    path, mf, _, _, _ = typed_files(storage, "gqa4-safetensors")
    header, data = st_parts(path)
    for key, entry in header.items():
        if key != "__metadata__":
            entry["data_offsets"] = [o + 1 for o in entry["data_offsets"]]
    header["pad"] = {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}
    shifted = tmp_path / "shifted.safetensors"
    shifted.write_bytes(st_build(header, b"\0" + data))
    for kernel in KERNELS.values():
        want = CppBackend(path, kernel).forward(mf.input_ids, mf.attention_mask)[0]
        got = CppBackend(shifted, kernel).forward(mf.input_ids, mf.attention_mask)[0]
        np.testing.assert_array_equal(got, want)


# ---- bad typed files: one line naming the key, from the module and the runner alike ----------
# The messages are the format's (the Python reader writes the same ones).

def b64(array: np.ndarray) -> str:
    import base64
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()


def tensor_of(obj: dict, dtype) -> np.ndarray:
    import base64
    return np.frombuffer(base64.b64decode(obj["data"]), dtype=dtype).reshape(obj["shape"]).copy()


def set_scales(obj: dict, scales: np.ndarray) -> None:
    obj["scales"].update(shape=list(scales.shape), data=b64(scales.astype(np.float32)))


def poke(obj: dict, dtype, index: tuple, value) -> None:
    array = tensor_of(obj, dtype)
    array[index] = value
    obj["data"] = b64(array)


def wq(doc: dict) -> dict:
    return doc["weights"]["layers"][0]["wq"]


def w_up(doc: dict) -> dict:
    return doc["weights"]["layers"][1]["w_up"]


def with_source(doc: dict, weight_dtype="float32", shape=(B, S, 97), nan_at=None) -> None:
    """The quantisation record: the logits of the model before its weights were converted."""
    logits = np.linspace(-1, 1, int(np.prod(shape)), dtype=np.float32).reshape(shape)
    if nan_at is not None:
        logits[nan_at] = np.nan
    doc["source"] = {"weight_dtype": weight_dtype, "logits": {"shape": list(shape), "dtype": "float32",
                                                              "encoding": "base64", "data": b64(logits)}}


# storage -> name -> (edit of the JSON document, message after "<path>: "); wq is (80, 80):
# three Q8 blocks a row, the last partial
JSON_CASES = {
    "int8": {
        "no-scales": (lambda d: wq(d).pop("scales"), "weights.layers[0].wq: int8 tensor has no 'scales'"),
        "null-scales": (lambda d: wq(d).update(scales=None), "weights.layers[0].wq: int8 tensor has no 'scales'"),
        "no-block-size": (lambda d: wq(d).pop("block_size"), "weights.layers[0].wq: int8 tensor has no 'block_size'"),
        "block-size-0": (lambda d: wq(d).update(block_size=0),
                         "weights.layers[0].wq: block_size must be an integer in [1, 80], found 0"),
        "block-size-past-row": (lambda d: wq(d).update(block_size=81),
                                "weights.layers[0].wq: block_size must be an integer in [1, 80], found 81"),
        "block-size-negative": (lambda d: wq(d).update(block_size=-32),
                                "weights.layers[0].wq: block_size must be an integer in [1, 80], found -32"),
        "block-size-string": (lambda d: wq(d).update(block_size="32"),
                              'weights.layers[0].wq: block_size must be an integer in [1, 80], found "32"'),
        "block-size-bool": (lambda d: wq(d).update(block_size=True),
                            "weights.layers[0].wq: block_size must be an integer in [1, 80], found true"),
        "block-size-float": (lambda d: wq(d).update(block_size=32.0),
                             "weights.layers[0].wq: block_size must be an integer in [1, 80], found 32.0"),
        "scales-one-block-too-many": (lambda d: set_scales(wq(d), np.ones((80, 4))),
                                      "weights.layers[0].wq.scales: shape expected [80, 3], found [80, 4]"),
        "scales-for-another-block-size": (lambda d: wq(d).update(block_size=16),
                                          "weights.layers[0].wq.scales: shape expected [80, 5], found [80, 3]"),
        "scales-nan": (lambda d: poke(wq(d)["scales"], "<f4", (3, 1), np.nan),
                       "weights.layers[0].wq.scales: non-finite value nan at index [3, 1] (1 in all)"),
        "scales-inf-twice": (lambda d: (poke(wq(d)["scales"], "<f4", (7, 2), -np.inf),
                                        poke(wq(d)["scales"], "<f4", (9, 0), np.inf)),
                             "weights.layers[0].wq.scales: non-finite value -inf at index [7, 2] (2 in all)"),
        "scales-float16": (lambda d: wq(d)["scales"].update(dtype="float16"),
                           "weights.layers[0].wq.scales: dtype expected float32, found 'float16'"),
        "scales-short": (lambda d: wq(d)["scales"].update(data=b64(np.ones(80 * 3 - 1, np.float32))),
                         "weights.layers[0].wq.scales: data holds 1276 base64 characters, expected 1280 for shape [80, 3] float32"),
        "int8-norm": (lambda d: d["weights"]["final_rms"].update(dtype="int8", data=b64(np.ones(80, np.int8))),
                      "weights.final_rms: dtype int8 is only allowed for 2-D weight matrices"),
        "int8-rope": (lambda d: d["rope"]["cos"].update(dtype="int8"), "rope.cos: dtype expected float32, found 'int8'"),
        "int8-short": (lambda d: wq(d).update(data=b64(np.ones(80 * 80 - 3, np.int8))),
                       "weights.layers[0].wq: data holds 8532 base64 characters, expected 8536 for shape [80, 80] int8"),
        "reserved-matrix": (lambda d: d["weights"]["layers"][0]["wo"].update(dtype="int4"),
                            "weights.layers[0].wo: dtype int4 is not supported yet "
                            "(format version 2 reads float32, float16, bfloat16 or int8 here)"),
        "reserved-vector": (lambda d: d["weights"]["layers"][1]["rms_ffn"].update(dtype="float8_e4m3"),
                            "weights.layers[1].rms_ffn: dtype float8_e4m3 is not supported yet "
                            "(format version 2 reads float32, float16 or bfloat16 here)"),
        "unknown-vector": (lambda d: d["weights"]["final_rms"].update(dtype="float64"),
                           "weights.final_rms: dtype expected float32, float16 or bfloat16, found 'float64'"),
        # the quantisation record: not the kernel's, checked so that both loaders refuse alike
        "source-not-an-object": (lambda d: d.update(source=[1]), "source: expected an object, found list"),
        "source-weight-dtype-number": (lambda d: with_source(d, weight_dtype=32),
                                       "source.weight_dtype: expected a string, found 32"),
        "source-logits-shape": (lambda d: with_source(d, shape=(B, S, 96)),
                                f"source.logits: shape expected [{B}, {S}, 97], found [{B}, {S}, 96]"),
        "source-logits-nan": (lambda d: with_source(d, nan_at=(2, 4, 5)),
                              "source.logits: non-finite value nan at index [2, 4, 5] (1 in all)"),
    },
    "float16": {
        "inf-weight": (lambda d: poke(w_up(d), "<u2", (200, 17), 0x7C00),
                       "weights.layers[1].w_up: non-finite value inf at index [200, 17] (1 in all)"),
        "nan-norm": (lambda d: poke(d["weights"]["final_rms"], "<u2", (5,), 0xFE00),
                     "weights.final_rms: non-finite value nan at index [5] (1 in all)"),
        "short-data": (lambda d: wq(d).update(data=b64(np.ones(80 * 80 - 1, np.float16))),
                       "weights.layers[0].wq: data holds 17064 base64 characters, expected 17068 for shape [80, 80] float16"),
    },
    "bfloat16": {
        "nan-weight": (lambda d: poke(w_up(d), "<u2", (0, 3), 0x7FC0),
                       "weights.layers[1].w_up: non-finite value nan at index [0, 3] (1 in all)"),
        "minus-inf-norm": (lambda d: poke(d["weights"]["layers"][0]["rms_attn"], "<u2", (79,), 0xFF80),
                           "weights.layers[0].rms_attn: non-finite value -inf at index [79] (1 in all)"),
    },
}


def quantization_without(key: str):
    def edit(header: dict) -> None:
        q = json.loads(header["__metadata__"]["quantization"])
        q.pop(key)
        header["__metadata__"]["quantization"] = json.dumps(q)
    return edit


def scales_as_float16(header: dict) -> None:  # same bytes: (80, 3) float32 = (80, 6) float16
    header["weights.layers[0].wq.scales"].update(dtype="F16", shape=[80, 6])


def scales_renamed(header: dict) -> None:  # still covering its bytes, owned by no tensor
    header["orphan.scales"] = header.pop("weights.layers[0].wq.scales")


def quantization_entry(value):
    def edit(header: dict) -> None:
        q = json.loads(header["__metadata__"]["quantization"])
        q["weights.layers[0].wq"] = value
        header["__metadata__"]["quantization"] = json.dumps(q)
    return edit


def source_tensor(header: dict, data: bytearray) -> None:  # "source.logits" after the data
    logits = np.zeros((B, S, 97), np.float32)
    end = len(data)
    header["source.logits"] = {"dtype": "F32", "shape": [B, S, 97], "data_offsets": [end, end + logits.nbytes]}
    data += logits.tobytes()


ST_CASES = {
    "no-scales-tensor": (scales_renamed, "weights.layers[0].wq: int8 tensor has no 'scales'"),
    "no-block-size": (quantization_without("weights.layers[0].wq"), "weights.layers[0].wq: int8 tensor has no 'block_size'"),
    "no-quantization": (lambda h: h["__metadata__"].pop("quantization"),
                        "weights.tok_embedding: int8 tensor has no 'block_size'"),
    "quantization-not-json": (lambda h: h["__metadata__"].update(quantization="{oops"),
                              "__metadata__.quantization: not valid JSON"),
    "quantization-a-list": (lambda h: h["__metadata__"].update(quantization="[1, 2]"),
                            "__metadata__.quantization: expected an object, found [1, 2]"),
    "quantization-entry-a-number": (quantization_entry(32), '__metadata__.quantization: weights.layers[0].wq: '
                                    'expected an object {"block_size": n}, found 32'),
    "quantization-entry-null": (quantization_entry(None), "weights.layers[0].wq: int8 tensor has no 'block_size'"),
    "source-metadata-a-list": (lambda h: h["__metadata__"].update(source="[1]"),
                               "__metadata__.source: expected an object, found [1]"),
    "source-tensor-without-metadata": (source_tensor, "source.weight_dtype: missing from the model file"),
    "block-size-0": (lambda h: h["__metadata__"].update(quantization=json.dumps(
        {k: {"block_size": 0 if k == "weights.layers[0].wq" else 32}
         for k in json.loads(h["__metadata__"]["quantization"])})),
        "weights.layers[0].wq: block_size must be an integer in [1, 80], found 0"),
    "scales-float16": (scales_as_float16, "weights.layers[0].wq.scales: dtype expected float32, found 'float16'"),
}


def refusals(path: Path) -> tuple[str, CliResult | None]:
    """(the module's ModelFileError message, the runner's result or None without a runner)."""
    from xvalid import _core
    with pytest.raises(_core.ModelFileError) as caught:
        _core.Model(str(path))
    runner = None
    if RUNNER is not None:
        proc = subprocess.run([RUNNER, path, path.parent / "out"], capture_output=True, text=True, timeout=120)
        runner = CliResult(proc.returncode, proc.stdout, proc.stderr)
    return str(caught.value), runner


def assert_refused(path: Path, message: str) -> None:
    module, runner = refusals(path)
    assert module == f"{path}: {message}"
    if runner is not None:
        runner.assert_one_line_error(2)
        assert runner.err.strip() == f"xvalid-run: error: {path}: {message}"
        assert not (path.parent / "out" / "logits.npy").exists()


@pytest.mark.parametrize("storage,name", [(s, n) for s, cases in JSON_CASES.items() for n in cases])
def test_bad_typed_json_file_is_refused_in_one_line(typed_files, tmp_path, storage, name):
    path, _, _, _, _ = typed_files(storage, "gqa4-json")
    doc = json.loads(path.read_text())
    edit, message = JSON_CASES[storage][name]
    edit(doc)
    bad = tmp_path / f"{name}.json"
    bad.write_text(json.dumps(doc))
    assert_refused(bad, message)


@pytest.mark.parametrize("name", ST_CASES)
def test_bad_typed_safetensors_file_is_refused_in_one_line(typed_files, tmp_path, name):
    path, _, _, _, _ = typed_files("int8", "gqa4-safetensors")
    header, data = st_parts(path)
    edit, message = ST_CASES[name]
    data = bytearray(data)
    edit(*(header, data)[:edit.__code__.co_argcount])  # an edit of the header, or of header and data
    bad = tmp_path / f"{name}.safetensors"
    bad.write_bytes(st_build(header, bytes(data)))
    assert_refused(bad, message)


def test_a_valid_quantisation_record_is_read_past(typed_files, tmp_path):
    """A file with the record (JSON: the top-level key; safetensors: the tensor and the
    metadata) loads, and the logits are the same as without it."""
    path, mf, _, _, _ = typed_files("int8", "gqa4-json")
    doc = json.loads(path.read_text())
    with_source(doc)
    with_record = tmp_path / "source.json"
    with_record.write_text(json.dumps(doc))
    st_path, _, _, _, _ = typed_files("int8", "gqa4-safetensors")
    header, data = st_parts(st_path)
    data = bytearray(data)
    source_tensor(header, data)
    header["__metadata__"]["source"] = json.dumps({"weight_dtype": "float32"})
    st_record = tmp_path / "source.safetensors"
    st_record.write_bytes(st_build(header, bytes(data)))
    for original, changed in ((path, with_record), (st_path, st_record)):
        want = CppBackend(original, "fast").forward(mf.input_ids, mf.attention_mask)[0]
        got = CppBackend(changed, "fast").forward(mf.input_ids, mf.attention_mask)[0]
        np.testing.assert_array_equal(got, want)


def test_good_typed_files_load_in_the_runner(typed_files, tmp_path):
    """The unedited files of the cases above load (the runner writes its logits), so each
    refusal above is the edit's."""
    if RUNNER is None:
        pytest.skip("no xvalid-run")
    for storage, layout in [("int8", "gqa4-json"), ("int8", "gqa4-safetensors"), ("float16", "gqa4-json"),
                            ("bfloat16", "gqa4-json")]:
        path, mf, _, ref, _ = typed_files(storage, layout)
        out = tmp_path / f"{storage}-{layout}"
        proc = subprocess.run([RUNNER, path, out, "--kernel", "clear"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        logits = np.load(out / "logits.npy")
        keep = mf.attention_mask.astype(bool)
        assert np.abs(logits - ref.logits)[keep].max() < 1e-5


PEAK_RSS_SCRIPT = r"""
import resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True)
assert proc.returncode == 0, proc.stderr
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # KiB
"""


@pytest.mark.parametrize("container", ["json", "safetensors"])
def test_runner_holds_the_weights_as_stored_not_as_float32(tmp_path, container):
    """The runner's peak memory on an int8 model is below its peak on the same model in
    float32 by more than half of the float32 weights: the loader keeps the int8 bytes and the
    kernel converts as it reads (4 bytes a weight saved, 1 + 4/32 kept)."""
    if RUNNER is None:
        pytest.skip("no xvalid-run")
    cfg = ModelConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=4096, intermediate_size=704, max_position_embeddings=16)
    original = generate_model(cfg, batch_size=1, seq_len=4, seed=3, pad=0)
    peaks = {}
    for weight_dtype in ("float32", "int8"):
        mf = store_weights(original, weight_dtype)
        path = tmp_path / f"{weight_dtype}.{container}"
        write_model(mf, path, progress=False, container=container)
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, RUNNER, path, tmp_path / "out", "--threads", "1"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        peaks[weight_dtype] = int(proc.stdout) * 1024
    float32_bytes = sum(a.nbytes for key, a in named_tensors(original) if key.startswith("weights.") and a.ndim == 2)
    assert peaks["float32"] - peaks["int8"] > 0.5 * float32_bytes, (peaks, float32_bytes)
