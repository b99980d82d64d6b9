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
