"""The safetensors container: written by `generate --format safetensors` and `convert`, read by
both loaders (detected by content), readable by the safetensors library itself, equal to the
JSON container on every command, and hostile safetensors files refused alike in one line."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from xvalid.modelfile import named_tensors, read_model

BASE_MODEL = REPO / "csrc" / "fuzz" / "seeds" / "tiny-gqa.json"


@pytest.fixture(scope="module")
def st_model(tmp_path_factory) -> Path:
    """The base model in the safetensors container, named .json: the name decides nothing."""
    from xvalid.cli import main
    path = tmp_path_factory.mktemp("st") / "model.json"
    with pytest.raises(SystemExit) as done:
        main(["convert", str(BASE_MODEL), str(path)])
    assert done.value.code == 0
    return path


def test_converted_file_is_safetensors_readable_by_the_library(st_model):
    from safetensors import safe_open

    assert st_model.read_bytes()[7] == 0
    original = read_model(BASE_MODEL)
    with safe_open(str(st_model), "np") as f:
        meta = f.metadata()
        assert meta["format"] == "xvalid-model" and meta["format_version"] == "1"
        assert json.loads(meta["config"])["hidden_size"] == original.config.hidden_size
        keys = set(f.keys())
        for key, array in named_tensors(original):
            assert key in keys
            loaded = f.get_tensor(key)
            assert loaded.dtype == array.dtype and loaded.tobytes() == array.tobytes(), key


def test_doc_snippet_reads_a_safetensors_file(st_model):
    """The safetensors snippet in docs/model-format.md, run as written."""
    doc = (REPO / "docs" / "model-format.md").read_text()
    snippets = [part.split("```", 1)[0] for part in doc.split("```python\n")[1:]]
    snippet = next(text for text in snippets if "m.safetensors" in text)
    scope = {"__name__": "doc"}
    exec(compile(snippet.replace("m.safetensors", str(st_model)), "model-format.md", "exec"), scope)
    mf = read_model(st_model)
    assert np.array_equal(scope["wq"], mf.weights.layers[0].wq)
    assert np.array_equal(scope["ids"], mf.input_ids)
    assert scope["config"]["hidden_size"] == mf.config.hidden_size


def test_round_trip_is_byte_identical_in_tensors(cli, st_model, tmp_path):
    back = tmp_path / "back.json"
    assert cli("convert", st_model, back).code == 0
    assert back.read_bytes()[:1] == b"{"
    again = tmp_path / "again.safetensors"
    assert cli("convert", back, again).code == 0
    assert again.read_bytes() == st_model.read_bytes()
    pairs = [read_model(p) for p in (BASE_MODEL, st_model, back)]
    for (k0, a0), (k1, a1), (k2, a2) in zip(*(named_tensors(mf) for mf in pairs)):
        assert k0 == k1 == k2 and a0.dtype == a1.dtype == a2.dtype
        assert a0.tobytes() == a1.tobytes() == a2.tobytes(), k0
    assert pairs[0].config == pairs[1].config == pairs[2].config
    assert pairs[0].meta == pairs[1].meta == pairs[2].meta


def test_generate_writes_safetensors(cli, tmp_path):
    js, st = tmp_path / "m.json", tmp_path / "m.st"
    flags = ["--hidden", "32", "--layers", "1", "--heads", "4", "--kv-heads", "2", "--vocab", "40"]
    assert cli("generate", *flags, "-o", js).code == 0
    assert cli("generate", *flags, "--format", "safetensors", "-o", st).code == 0
    assert st.read_bytes()[7] == 0
    for (k, a), (_, b) in zip(named_tensors(read_model(js)), named_tensors(read_model(st))):
        assert a.tobytes() == b.tobytes(), k


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_both_containers_give_identical_results(cli, st_model, tmp_path, backend):
    outs = []
    for name, path in (("json", BASE_MODEL), ("st", st_model)):
        out = tmp_path / f"{name}.npy"
        assert cli("run", path, "--backend", backend, "-o", out).code == 0
        outs.append(np.load(out))
    assert outs[0].tobytes() == outs[1].tobytes()
    assert cli("inspect", st_model, "--no-tensors").code == 0
    assert cli("compare", st_model, "--repeat", "1", "--warmup", "0", "-q").code == 0


def test_cpp_reads_float32_tensors_in_place(st_model):
    """The module keeps the mapping: a model loaded from safetensors outlives nothing it needs
    (forward after the loader returned gives the JSON file's logits exactly)."""
    from xvalid import _core
    a, b = _core.Model(str(BASE_MODEL)), _core.Model(str(st_model))
    np.testing.assert_array_equal(a.forward(a.input_ids), b.forward(b.input_ids))


# ---- hostile safetensors files --------------------------------------------------------------

def parts(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def build(header: dict, data: bytes, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def edit_header(edit):
    def make(st_model: Path) -> bytes:
        header, data = parts(st_model)
        edit(header)
        return build(header, data)
    return make


def _shift(header, key, by):
    header[key]["data_offsets"] = [o + by for o in header[key]["data_offsets"]]


HOSTILE = {
    # name -> (make(st_model) -> bytes, message after "<path>: ")
    "short-file": (lambda p: p.read_bytes()[:100], "safetensors header: {header} bytes run past the end of the file (100 bytes)"),
    "truncated-data": (lambda p: p.read_bytes()[:-10], "are not [begin, end] within the {datasize} data bytes"),
    "extra-data": (lambda p: p.read_bytes() + b"\0" * 8, "safetensors data: bytes [{covered}, {datasize}) belong to no tensor"),
    "header-length-lies": (lambda p: struct.pack("<Q", 10**7) + p.read_bytes()[8:],
                           "safetensors header: 10000000 bytes run past the end of the file ({filesize} bytes)"),
    "header-too-large": (lambda p: struct.pack("<Q", 2**40) + p.read_bytes()[8:],
                         "safetensors header: 1099511627776 bytes is more than the limit of 104857600"),
    "header-not-json": (lambda p: struct.pack("<Q", 8) + b"{xxxxxxx", "safetensors header: not valid JSON"),
    "offsets-past-the-end": (edit_header(lambda h: h["rope.cos"].update(data_offsets=[0, 10**9])),
                             "rope.cos: data_offsets [0, 1000000000] are not [begin, end] within the {datasize} data bytes"),
    "offsets-reversed": (edit_header(lambda h: h["rope.cos"].update(data_offsets=[8, 0])),
                         "rope.cos: data_offsets [8, 0] are not [begin, end] within the {datasize} data bytes"),
    "overlapping-tensors": (edit_header(lambda h: h["rope.sin"].update(data_offsets=h["rope.cos"]["data_offsets"])),
                            "overlap another tensor's bytes"),
    "wrong-byte-count": (edit_header(lambda h: h["weights.final_rms"].update(shape=[5])),
                         "weights.final_rms: data_offsets"),
    "wrong-dtype-f64": (edit_header(lambda h: h["rope.cos"].update(dtype="F64")),
                        "rope.cos: dtype expected float32, found 'F64'"),
    "reserved-dtype-f8": (edit_header(lambda h: h["rope.cos"].update(dtype="F8_E4M3")),
                          "rope.cos: dtype float8_e4m3 is not supported yet (format version 2 reads float32 here)"),
    "int-where-float": (edit_header(lambda h: h["rope.cos"].update(dtype="I32")),
                        "rope.cos: dtype expected float32, found 'int32'"),
    "no-config": (edit_header(lambda h: h["__metadata__"].pop("config")),
                  "__metadata__.config: expected JSON text, found null"),
    "config-not-json": (edit_header(lambda h: h["__metadata__"].update(config="{oops")),
                        "__metadata__.config: not valid JSON"),
    "format-version-3": (edit_header(lambda h: h["__metadata__"].update(format_version="3")),
                         "format_version: 3 is newer than this reader supports (2); update xvalid"),
    "nan-weight": (None, "weights.final_rms: "),
    "deep-header": (lambda p: build({"x": json.loads("[" * 70 + "]" * 70)}, b""),
                    "safetensors header: nested deeper than 64 levels"),
}


def nan_weight(st_model: Path) -> bytes:
    header, data = parts(st_model)
    begin = header["weights.final_rms"]["data_offsets"][0]
    data = data[:begin] + np.float32(np.nan).tobytes() + data[begin + 4:]
    return build(header, data)


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_safetensors_refused_alike(cli, st_model, tmp_path, name):
    from xvalid import _core
    from xvalid.errors import ModelFileError

    make, message = HOSTILE[name]
    payload = nan_weight(st_model) if name == "nan-weight" else make(st_model)
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(payload)
    result = cli("inspect", path, "--no-tensors")
    result.assert_one_line_error(2)
    line = result.err.strip().removeprefix("xvalid: error: ")
    with pytest.raises(ModelFileError) as py_err:
        read_model(path)
    with pytest.raises(_core.ModelFileError) as cpp_err:
        _core.Model(str(path))
    assert str(py_err.value) == line
    if message is None:
        return  # not safetensors-shaped at all: both refuse (the JSON reader says why)
    header_len = struct.unpack("<Q", payload[:8])[0]
    fields = {"filesize": len(payload), "header": header_len,
              "datasize": max(len(payload) - 8 - header_len, 0), "covered": max(len(payload) - 16 - header_len, 0)}
    expected = message.format(**fields)
    assert expected in line, line
    if name == "nan-weight":  # both name the key and the value; the wording is each reader's
        assert str(cpp_err.value).startswith(f"{path}: weights.final_rms: ") and "\n" not in str(cpp_err.value)
    else:
        assert str(cpp_err.value) == line


# ---- reduced-precision weights in safetensors -----------------------------------------------
# The base model with int8 weights (blocks of 2) and a source record, written by `convert
# --weight-dtype int8`, then damaged. The same lines as the JSON container's (docs/model-
# format.md), from both loaders.

WQ = "weights.layers[0].wq"


@pytest.fixture(scope="module")
def q_model(tmp_path_factory) -> Path:
    from xvalid.cli import main
    path = tmp_path_factory.mktemp("st-int8") / "q.safetensors"
    with pytest.raises(SystemExit) as done:
        main(["convert", str(BASE_MODEL), str(path), "--weight-dtype", "int8", "--quant-block", "2",
              "--format", "safetensors"])
    assert done.value.code == 0
    return path


def _metadata(edit):
    return edit_header(lambda h: edit(h["__metadata__"]))


def _quantization(edit):
    def apply(meta):
        blocks = json.loads(meta["quantization"])
        edit(blocks)
        meta["quantization"] = json.dumps(blocks)
    return _metadata(apply)


def _rename(key, new):
    return edit_header(lambda h: h.update({new: h.pop(key)}))


def _patch(key, offset, raw: bytes):
    """Overwrite bytes of tensor `key` at `offset` (from its start)."""
    def make(path: Path) -> bytes:
        header, data = parts(path)
        begin = header[key]["data_offsets"][0] + offset
        return build(header, data[:begin] + raw + data[begin + len(raw):])
    return make


ST_DTYPE_CASES = {
    "int8-no-scales-tensor": (_rename(WQ + ".scales", WQ + ".scalez"), f"{WQ}: int8 tensor has no 'scales'"),
    "int8-no-block-size-entry": (_quantization(lambda b: b.pop(WQ)), f"{WQ}: int8 tensor has no 'block_size'"),
    "int8-no-quantization-metadata": (_metadata(lambda m: m.pop("quantization")),
                                      "weights.tok_embedding: int8 tensor has no 'block_size'"),
    "int8-block-size-0": (_quantization(lambda b: b[WQ].update(block_size=0)),
                          f"{WQ}: block_size must be an integer in [1, 4], found 0"),
    "int8-block-size-null": (_quantization(lambda b: b[WQ].update(block_size=None)),
                             f"{WQ}: int8 tensor has no 'block_size'"),
    "int8-block-size-disagrees-with-scales": (_quantization(lambda b: b[WQ].update(block_size=1)),
                                              f"{WQ}.scales: shape expected [4, 4], found [4, 2]"),
    "int8-scales-nan": (_patch(WQ + ".scales", 12, np.float32(np.nan).tobytes()),
                        f"{WQ}.scales: non-finite value nan at index [1, 1] (1 in all)"),
    "int8-scales-f16": (edit_header(lambda h: h[WQ + ".scales"].update(dtype="F16", shape=[4, 4])),
                        f"{WQ}.scales: dtype expected float32, found 'float16'"),
    "quantization-not-json": (_metadata(lambda m: m.update(quantization="{oops")),
                              "__metadata__.quantization: not valid JSON"),
    "quantization-not-an-object": (_metadata(lambda m: m.update(quantization="[1]")),
                                   "__metadata__.quantization: expected an object, found [1]"),
    "quantization-entry-not-an-object": (_quantization(lambda b: b.update({WQ: 32})),
                                         f'__metadata__.quantization: {WQ}: expected an object {{"block_size": n}}, '
                                         f"found 32"),
    "int8-on-a-norm": (edit_header(lambda h: h["weights.final_rms"].update(dtype="I8", shape=[16])),
                       "weights.final_rms: dtype int8 is only allowed for 2-D weight matrices"),
    "lying-dtype-f16": (edit_header(lambda h: h["weights.final_rms"].update(dtype="F16")),
                        "weights.final_rms: data_offsets [{begin}, {end}] hold 16 bytes, shape [4] F16 needs 8"),
    "lying-dtype-bf16-shape": (edit_header(lambda h: h["weights.final_rms"].update(dtype="BF16", shape=[8])),
                               "weights.final_rms: shape expected [4], found [8]"),
    "float16-inf": (None, "weights.final_rms: non-finite value inf at index [1] (1 in all)"),
    "source-no-metadata": (_metadata(lambda m: m.pop("source")), "source.weight_dtype: missing from the model file"),
    "source-no-tensor": (_rename("source.logits", "source.logitz"), "source.logits: missing from the model file"),
    "source-metadata-not-an-object": (_metadata(lambda m: m.update(source="[1]")),
                                      "__metadata__.source: expected an object, found [1]"),
}


def float16_inf(q_model: Path) -> bytes:
    """final_rms stored as float16 with an infinity at index 1."""
    header, data = parts(q_model)
    begin, end = header["weights.final_rms"]["data_offsets"]
    half = np.frombuffer(data[begin:end], "<f4").astype("<f2")
    half[1] = np.inf
    header["weights.final_rms"].update(dtype="F16", data_offsets=[begin, begin + 8])
    filler = {"dtype": "U8", "shape": [8], "data_offsets": [begin + 8, end]}  # the freed bytes
    header["filler"] = filler
    return build(header, data[:begin] + half.tobytes() + data[begin + 8:])


def st_dtype_case(q_model: Path, tmp_path: Path, name: str) -> tuple[Path, str]:
    make, message = ST_DTYPE_CASES[name]
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(float16_inf(q_model) if make is None else make(q_model))
    header, _ = parts(q_model)
    begin, end = header["weights.final_rms"]["data_offsets"]
    return path, f"{path}: " + message.replace("{begin}", str(begin)).replace("{end}", str(end))


def test_quantized_safetensors_model_is_valid(q_model):
    mf = read_model(q_model)
    assert mf.weight_dtype == "int8" and mf.storage[WQ].block_size == 2 and mf.source_logits is not None


@pytest.mark.parametrize("name", ST_DTYPE_CASES)
def test_reduced_precision_safetensors_refused_in_one_line(cli, q_model, tmp_path, name):
    from xvalid.errors import ModelFileError

    path, want = st_dtype_case(q_model, tmp_path, name)
    result = cli("inspect", path, "--no-tensors")
    result.assert_one_line_error(2)
    assert result.err.strip() == f"xvalid: error: {want}"
    with pytest.raises(ModelFileError) as err:
        read_model(path)
    assert str(err.value) == want


@pytest.mark.parametrize("name", ST_DTYPE_CASES)
def test_cpp_refuses_reduced_precision_safetensors_alike(q_model, tmp_path, name):
    from xvalid import _core

    path, want = st_dtype_case(q_model, tmp_path, name)
    with pytest.raises(_core.ModelFileError) as err:
        _core.Model(str(path))
    assert str(err.value) == want
