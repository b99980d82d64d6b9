"""The model file: round trip, files written by other tools, and every malformed-file refusal."""

from __future__ import annotations

import base64
import json
import sys
from dataclasses import fields

import numpy as np
import pytest

from conftest import ENGINES
from xvalid.config import ModelConfig
from xvalid.generate import generate_model
from xvalid.modelfile import LayerWeights, read_model, write_model

sys.path.insert(0, str(ENGINES))
from write_seed_model import write_seed_model  # noqa: E402  (xvalid-independent writer)


def test_round_trip_keeps_every_tensor_and_the_config(tmp_path):
    cfg = ModelConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, vocab_size=50,
                      intermediate_size=70, num_hidden_layers=3, max_position_embeddings=20)
    mf = generate_model(cfg, batch_size=3, seq_len=6, seed=5, pad=2)
    mf.weights.lm_head = mf.weights.tok_embedding[::-1].copy()  # untied: must survive too
    write_model(mf, tmp_path / "m.json")
    back = read_model(tmp_path / "m.json")
    assert back.config == cfg
    for a, b in [(mf.input_ids, back.input_ids), (mf.attention_mask, back.attention_mask),
                 (mf.rope_cos, back.rope_cos), (mf.rope_sin, back.rope_sin),
                 (mf.weights.tok_embedding, back.weights.tok_embedding),
                 (mf.weights.final_rms, back.weights.final_rms),
                 (mf.weights.lm_head, back.weights.lm_head)]:
        assert a.dtype == b.dtype and np.array_equal(a, b)
    for la, lb in zip(mf.weights.layers, back.weights.layers):
        for f in fields(LayerWeights):
            assert np.array_equal(getattr(la, f.name), getattr(lb, f.name))
    assert back.meta["generator"]["padding"] == mf.meta["generator"]["padding"]


def test_rope_tables_follow_the_spec(tmp_path):
    mf = generate_model(ModelConfig(max_position_embeddings=64), seq_len=5)
    hd = mf.config.head_dim
    p, j = 37, 3
    angle = p / 1e6 ** (2 * (j % (hd // 2)) / hd)
    assert mf.rope_cos[p, j] == pytest.approx(np.cos(angle), abs=1e-7)
    assert mf.rope_sin[p, j + hd // 2] == pytest.approx(np.sin(angle), abs=1e-7)


def test_layout_doc_reader_reads_a_generated_file(tmp_path):
    """The numpy snippet in docs/model-format.md, run as written, reads our file."""
    doc = (ENGINES.parent.parent / "docs" / "model-format.md").read_text()
    snippets = [part.split("```", 1)[0] for part in doc.split("```python\n")[1:]]
    snippet = next(text for text in snippets if "model.json" in text)
    path = tmp_path / "m.json"
    write_model(generate_model(ModelConfig(), seq_len=5), path)
    scope = {"__name__": "doc"}
    exec(compile(snippet.replace("model.json", str(path)), "model-format.md", "exec"), scope)
    mf = read_model(path)
    assert np.array_equal(scope["wq"], mf.weights.layers[0].wq)
    assert np.array_equal(scope["ids"], mf.input_ids)


@pytest.mark.parametrize("hidden,heads,kvh,pad_left,pad_right", [
    (64, 8, 2, (1,), ()), (64, 8, 8, (), (1,)), (64, 8, 1, (0,), (1,)),
    (128, 8, 2, (1,), (2,)), (256, 8, 1, (), ()), (512, 8, 2, (0,), (1,)),
])
def test_run_on_files_written_by_another_tool_matches_an_independent_engine(
        cli, tmp_path, hidden, heads, kvh, pad_left, pad_right):
    """Acceptance: seed-layout files (random norms, padding, GQA) give the same logits through
    `xvalid run` as an independent numpy implementation, to 1e-5 on unpadded rows."""
    import subprocess
    model = tmp_path / "seed.json"
    write_seed_model(model, hidden=hidden, layers=2, heads=heads, kv_heads=kvh, vocab=128,
                     max_pos=32, batch=3, seq=10, seed=hidden + kvh, pad_left_rows=pad_left,
                     pad_right_rows=pad_right)
    assert "format" not in json.loads(model.read_text())
    result = cli("run", model, "--backend", "torch", "-o", tmp_path / "logits.npy")
    assert result.code == 0, result.err
    ours = np.load(tmp_path / "logits.npy")
    proc = subprocess.run([sys.executable, str(ENGINES / "numpy_engine.py"), str(model),
                           str(tmp_path / "engine"), "--format", "npy", "--no-intermediates"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    theirs = np.load(tmp_path / "engine" / "logits.npy")
    keep = read_model(model).attention_mask.astype(bool)
    assert np.abs(ours[keep] - theirs[keep]).max() < 1e-5
    assert np.abs(ours[keep]).max() > 0.1  # not a vacuous comparison


# ---------------------------------------------------------------------------------------------
# malformed files: every one is refused by `xvalid inspect` (and `run`) with one line, exit 2


def _corrupt(path, edit):
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(array.tobytes()).decode()


def _set_config(key, value):
    return lambda d: d["config"].__setitem__(key, value)


def _replace_tensor(where, array, dtype=None):
    def edit(d):
        obj = eval("d" + where, {"d": d})  # noqa: S307 (test-only key path)
        obj.update(shape=list(array.shape), data=_b64(array), dtype=dtype or str(array.dtype))
    return edit


def _rope_rows(rows, set_config=True):
    """Keep the first `rows` rows of both RoPE tables (and say so in the config)."""
    def edit(d):
        if set_config:
            d["config"]["max_position_embeddings"] = rows
        for table in ("cos", "sin"):
            obj = d["rope"][table]
            array = np.frombuffer(base64.b64decode(obj["data"]), np.float32).reshape(obj["shape"])
            obj.update(shape=[rows, obj["shape"][1]], data=_b64(array[:rows]))
    return edit


def _extra_layer(d):
    d["weights"]["layers"].append(json.loads(json.dumps(d["weights"]["layers"][0])))


CORRUPTIONS = {
    "missing config": (lambda d: d.pop("config"), "config: missing from the model file"),
    "missing layer tensor": (lambda d: d["weights"]["layers"][1].pop("wk"),
                             "weights.layers[1].wk"),
    "missing rope": (lambda d: d["rope"].pop("sin"), "rope.sin"),
    "wrong shape": (lambda d: d["weights"]["layers"][0]["wk"].__setitem__("shape", [64, 64]),
                    "weights.layers[0].wk: shape expected [16, 64], found [64, 64]"),
    "bad base64": (lambda d: d["weights"]["final_rms"].__setitem__(
        "data", "!" + d["weights"]["final_rms"]["data"][1:]), "weights.final_rms: bad base64"),
    "short data": (lambda d: d["weights"]["final_rms"].__setitem__(
        "data", d["weights"]["final_rms"]["data"][:-8]), "weights.final_rms: data holds"),
    "float8 weights": (lambda d: d["weights"]["layers"][0]["wq"].__setitem__("dtype", "float8_e4m3"),
                       "weights.layers[0].wq: dtype float8_e4m3 is not supported yet"),
    "unknown dtype": (lambda d: d["weights"]["tok_embedding"].__setitem__("dtype", "complex64"),
                      "dtype expected float32"),
    "hex encoding": (lambda d: d["weights"]["tok_embedding"].__setitem__("encoding", "hex"),
                     "encoding expected 'base64'"),
    "NaN weight": (_replace_tensor('["weights"]["layers"][1]["w_up"]',
                                   np.where(np.arange(192 * 64).reshape(192, 64) == 70, np.nan,
                                            0.01).astype(np.float32)),
                   "weights.layers[1].w_up: non-finite value nan at index [1, 6]"),
    "Inf weight": (_replace_tensor('["weights"]["final_rms"]',
                                   np.where(np.arange(64) == 9, -np.inf, 1.0).astype(np.float32)),
                   "weights.final_rms: non-finite value -inf at index [9]"),
    "id out of range": (_replace_tensor('["inputs"]["input_ids"]',
                                        np.array([[1, 2, 3, 4, 5], [1, 2, 128, 4, 5]], np.int32)),
                        "id 128 at batch 1, position 2 is outside the vocabulary"),
    "negative id": (_replace_tensor('["inputs"]["input_ids"]',
                                    np.array([[1, -2, 3, 4, 5], [1, 2, 3, 4, 5]], np.int32)),
                    "id -2 at batch 0, position 1"),
    "mask value 2": (_replace_tensor('["inputs"]["attention_mask"]',
                                     np.array([[1, 1, 1, 1, 1], [1, 2, 1, 1, 1]], np.uint8)),
                     "attention_mask: value 2 at batch 1, position 1"),
    "mask shape": (_replace_tensor('["inputs"]["attention_mask"]', np.ones((2, 4), np.uint8)),
                   "inputs.attention_mask: shape expected [2, 5], found [2, 4]"),
    "format version 3": (lambda d: d.__setitem__("format_version", 3),
                         "format_version: 3 is newer than this reader supports (2)"),
    "absurd hidden": (_set_config("hidden_size", 10**9), "absurdly large"),
    "absurd tensor shape": (lambda d: d["weights"]["tok_embedding"].__setitem__(
        "shape", [2**40, 2**40]), "shape expected [128, 64]"),
    "heads do not divide": (_set_config("num_attention_heads", 7), "does not divide"),
    "string config": (_set_config("vocab_size", "128"), "config.vocab_size must be an integer"),
    "layer count": (lambda d: d["weights"]["layers"].pop(), "expected 2 layers"),
    "meta head_dim": (lambda d: d["meta"].__setitem__("head_dim", 16), "meta.head_dim"),
    "layers not a list": (lambda d: d["weights"].__setitem__("layers", {}), "expected a list"),
    "tensor not an object": (lambda d: d["rope"].__setitem__("cos", [1, 2]), "rope.cos"),
    "top level list": (lambda d: (d.clear(), d.update({"x": 1})), "config: missing from the model file"),
    "lm_head shape": (_replace_tensor('["weights"]["lm_head"]', np.zeros((64, 128), np.float32)),
                      "weights.lm_head: shape expected [128, 64], found [64, 128]"),
    "extra layer": (_extra_layer, "expected 2 layers (config.num_hidden_layers), found 3"),
    "rope rows": (_rope_rows(64, set_config=False), "rope.cos: shape expected [128, 8], found [64, 8]"),
    "seq_len max_pos + 1": (_rope_rows(4), "input_ids: 5 positions exceed max_position_embeddings 4"),
    "no tokens": (_replace_tensor('["inputs"]["input_ids"]', np.zeros((2, 0), np.int32)),
                  "inputs.input_ids: shape expected [B, S] with B, S >= 1, found [2, 0]"),
}

# What the C++ loader says about the same files (its own wording, the same key).
CPP_NEEDLES = {
    "missing config": "config: missing from the model file",
    "missing layer tensor": "weights.layers[1].wk: missing",
    "missing rope": "rope.sin: missing",
    "wrong shape": "weights.layers[0].wk: shape expected [16, 64], found [64, 64]",
    "bad base64": "weights.final_rms: invalid base64 character '!' at offset 0",
    "short data": "weights.final_rms: data holds 336 base64 characters, expected 344 for shape [64] float32",
    "float8 weights": "weights.layers[0].wq: dtype float8_e4m3 is not supported yet",
    "unknown dtype": "weights.tok_embedding: dtype expected float32, float16, bfloat16 or int8, found 'complex64'",
    "hex encoding": "weights.tok_embedding: encoding expected 'base64', found 'hex'",
    "NaN weight": "weights.layers[1].w_up: non-finite value nan at index [1, 6] (1 in all)",
    "Inf weight": "weights.final_rms: non-finite value -inf at index [9] (1 in all)",
    "id out of range": "inputs.input_ids: id 128 at batch 1, position 2 is outside the vocabulary",
    "negative id": "inputs.input_ids: id -2 at batch 0, position 1",
    "mask value 2": "inputs.attention_mask: value 2 at batch 1, position 1",
    "mask shape": "inputs.attention_mask: shape [2, 4] differs from input_ids' [2, 5]",
    "format version 3": "format_version: 3 is newer than this reader supports (2)",
    "absurd hidden": "config.hidden_size: 1000000000 exceeds the supported maximum",
    "absurd tensor shape": "weights.tok_embedding: shape [1099511627776, 1099511627776]",
    "heads do not divide": "config.num_attention_heads: 7 does not divide hidden_size 64",
    "string config": "config.vocab_size: must be a positive integer",
    "layer count": "weights.layers: expected a list of num_hidden_layers = 2 layers, found 1",
    "meta head_dim": "meta.head_dim: expected 8",
    "layers not a list": "weights.layers: expected a list",
    "tensor not an object": "rope.cos: expected a tensor",
    "top level list": "config: missing from the model file",
    "lm_head shape": "weights.lm_head: shape expected [128, 64], found [64, 128]",
    "extra layer": "weights.layers: expected a list of num_hidden_layers = 2 layers, found 3",
    "rope rows": "rope.cos: shape expected [128, 8], found [64, 8]",
    "seq_len max_pos + 1": "inputs.input_ids: 5 positions exceed max_position_embeddings 4",
    "no tokens": "inputs.input_ids: shape [2, 0] is not (B, S) with B, S >= 1",
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_malformed_files_are_refused_naming_the_problem(cli, tiny_model, tmp_path, case):
    edit, needle = CORRUPTIONS[case]
    path = tmp_path / "bad.json"
    path.write_bytes(tiny_model.read_bytes())
    _corrupt(path, edit)
    result = cli("inspect", path)
    result.assert_one_line_error(2, needle)
    assert "at at" not in result.err
    cli("run", path, "-o", tmp_path / "l.npy").assert_one_line_error(2, needle)
    assert not (tmp_path / "l.npy").exists()
    # The C++ loader refuses the same file (it reads files that Python never saw).
    core = pytest.importorskip("xvalid._core")
    with pytest.raises(core.ModelFileError) as refused:
        core.Model(str(path))
    assert str(refused.value).startswith(f"{path}: ") and "\n" not in str(refused.value)
    assert CPP_NEEDLES[case] in str(refused.value)


def test_seq_len_equal_to_max_positions_is_accepted(cli, tiny_model, tmp_path):
    """The boundary of the "positions exceed max_position_embeddings" refusal: S = 5 positions
    with a 5-row RoPE table is a valid file, for both readers."""
    path = tmp_path / "edge.json"
    path.write_bytes(tiny_model.read_bytes())
    _corrupt(path, _rope_rows(5))
    result = cli("run", path, "-o", tmp_path / "l.npy")
    assert result.code == 0, result.err
    assert np.load(tmp_path / "l.npy").shape == (2, 5, 128)
    core = pytest.importorskip("xvalid._core")
    assert core.Model(str(path)).config["max_position_embeddings"] == 5


@pytest.mark.parametrize("content,needle", [
    (None, "no such file"),
    (b"", "not valid JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b"\xff\xfe garbage", "not valid JSON"),
    (b"[" * 100000, "JSON"),
    (b'{"a', "not valid JSON (Unterminated string starting at: line 1, column 2; truncated"),
])
def test_unreadable_files_are_refused(cli, tmp_path, content, needle):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_bytes(content)
    cli("inspect", path).assert_one_line_error(2, needle)


def test_truncated_file_is_refused(cli, tiny_model, tmp_path):
    path = tmp_path / "cut.json"
    data = tiny_model.read_bytes()
    for cut in (len(data) // 3, len(data) - 5):
        path.write_bytes(data[:cut])
        cli("inspect", path).assert_one_line_error(2, "not valid JSON", "truncated")


def test_directory_is_refused(cli, tmp_path):
    cli("inspect", tmp_path).assert_one_line_error(2, "is a directory")


def test_inspect_shows_config_tensors_inputs_and_reference(cli, make_model):
    path = make_model(batch_size=3, seq_len=6, pad=2)
    result = cli("inspect", path)
    assert result.code == 0, result.err
    out = result.out
    for needle in ("hidden_size", "weights.layers[1].w_down", "[64, 192]", "rope.cos",
                   "row 1 left", "row 2 right", "lm_head tied: yes", "top-1 margin",
                   "float32", "int32", "uint8"):
        assert needle in out, needle
    mf = read_model(path)
    from xvalid.modelfile import tensor_checksum
    assert tensor_checksum(mf.weights.layers[1].w_down) in out
    assert f"{mf.config.num_parameters:,}" in out
