"""Hugging Face checkpoints and the hf backend: checkpoints written by transformers itself
(save_pretrained: tied and untied heads, one file and shards, float32 and bfloat16, and a
MiniMind2 config) imported and run against transformers' own forward; generated files exported
and loaded back with from_pretrained; every unsupported feature refused with its key named;
`compare --backends torch,hf,cpp` on an imported checkpoint; and the hf backend without
transformers installed."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from xvalid.modelfile import read_model

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

# GQA 8/2, head_dim 8, an FFN size no rule gives
SIZES = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
             rms_norm_eps=1e-5, rope_theta=10000.0)
LAYER = {"rms_attn": "input_layernorm", "rms_ffn": "post_attention_layernorm",
         "wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
         "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
         "w_down": "mlp.down_proj"}


def llama(tied: bool, seed: int = 0, **sizes):
    """A random LlamaForCausalLM (eager), norm weights not all ones (ones hide norm bugs)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**SIZES, **sizes}, tie_word_embeddings=tied,
                                      attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def save(model, directory: Path, shards: int = 1, dtype=None) -> Path:
    """save_pretrained into `directory`: one model.safetensors, or exactly `shards` shards."""
    if dtype is not None:
        model = model.to(dtype)
    if shards == 1:
        model.save_pretrained(directory)
    else:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(directory, max_shard_size=int(total / shards * 1.2))
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) == shards
    return directory


def hf_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                     attention_mask=torch.from_numpy(mask.astype(np.int64))).logits.float().numpy()


def reference_logits(mf) -> np.ndarray:
    from xvalid.reference import Reference
    return Reference(mf).forward(mf.input_ids, mf.attention_mask).numpy()


def max_error(a, b, mask) -> float:
    keep = mask.astype(bool)
    return float(np.abs(a[keep].astype(np.float64) - b[keep]).max())


def assert_same_weights(mf, model, tied: bool) -> None:
    """Every tensor of the file is the checkpoint's, bit for bit, under its mapped name."""
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    w = mf.weights
    assert np.array_equal(w.tok_embedding, state["model.embed_tokens.weight"])
    assert np.array_equal(w.final_rms, state["model.norm.weight"])
    assert np.array_equal(w.lm_head, state["lm_head.weight"])
    assert np.array_equal(w.lm_head, w.tok_embedding) == tied
    for index, layer in enumerate(w.layers):
        for ours, theirs in LAYER.items():
            assert np.array_equal(getattr(layer, ours),
                                  state[f"model.layers.{index}.{theirs}.weight"]), (index, ours)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """A generated model (tied head, GQA 8/4, a padded row), written in-process."""
    from xvalid.cli import main
    path = tmp_path_factory.mktemp("generated") / "m.json"
    with pytest.raises(SystemExit) as done:
        main(["generate", "--seq-len", "6", "--batch-size", "2", "--kv-heads", "4", "-o", str(path)])
    assert done.value.code == 0
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Untied 2 shards (the target's checkpoint), and tied in one file; with their models."""
    root = tmp_path_factory.mktemp("hf")
    untied, tied = llama(tied=False, seed=1), llama(tied=True, seed=2)
    return {"untied-2-shards": (save(untied, root / "untied", shards=2), untied, False),
            "tied-1-file": (save(tied, root / "tied"), tied, True)}


# ---------------------------------------------------------------------------------------------
# import


@pytest.mark.parametrize("name", ["untied-2-shards", "tied-1-file"])
def test_import_matches_transformers(cli, tmp_path, checkpoints, name):
    directory, model, tied = checkpoints[name]
    out = tmp_path / "m.json"
    result = cli("import", directory, "-o", out, "--seq-len", 9, "--batch-size", 3, "--pad", 2)
    assert result.code == 0, result.err
    assert "untied head" in result.out if not tied else "tied head" in result.out
    mf = read_model(out)
    assert (mf.config.hidden_size, mf.config.num_key_value_heads, mf.config.intermediate_size,
            mf.config.rms_norm_eps, mf.config.rope_theta) == (64, 2, 160, 1e-5, 10000.0)
    assert (mf.attention_mask == 0).any(axis=1).sum() == 2  # padded rows, left and right
    assert_same_weights(mf, model, tied)
    ours, theirs = reference_logits(mf), hf_logits(model, mf.input_ids, mf.attention_mask)
    assert max_error(ours, theirs, mf.attention_mask) < 1e-5
    assert mf.meta["source"]["architecture"] == "LlamaForCausalLM"


def test_import_draws_the_inputs_generate_draws(cli, tmp_path, checkpoints):
    """Same --seed and input flags as generate: the same ids and mask (one shared draw)."""
    directory = checkpoints["tied-1-file"][0]
    flags = ["--seq-len", 7, "--batch-size", 3, "--pad", 2, "--pad-len", 2, "--seed", 5]
    assert cli("import", directory, "-o", tmp_path / "a.json", *flags).code == 0
    assert cli("generate", "--vocab", 128, "-o", tmp_path / "b.json", *flags).code == 0
    a, b = read_model(tmp_path / "a.json"), read_model(tmp_path / "b.json")
    assert np.array_equal(a.input_ids, b.input_ids)
    assert np.array_equal(a.attention_mask, b.attention_mask)


def test_import_bfloat16_keeps_its_storage_exactly(cli, tmp_path):
    model = llama(tied=False, seed=3)
    directory = save(model, tmp_path / "bf16", dtype=torch.bfloat16)
    out = tmp_path / "m.safetensors"
    result = cli("import", directory, "-o", out, "--format", "safetensors")
    assert result.code == 0, result.err
    assert "kept as bfloat16" in result.out
    mf = read_model(out)
    assert mf.meta["source"]["dtypes"] == {"BF16": 21}
    assert mf.weight_dtype == "bfloat16"
    assert all(stored.dtype == "bfloat16" for stored in mf.storage.values())
    assert mf.source_logits is None  # nothing was converted: no quantisation record
    assert_same_weights(mf, model, tied=False)  # model is bfloat16 now: .float() is exact


def test_import_with_weight_dtype_quantises_and_records_the_source(cli, tmp_path, checkpoints):
    directory, model, _ = checkpoints["untied-2-shards"]
    out = tmp_path / "q.json"
    result = cli("import", directory, "-o", out, "--weight-dtype", "int8", "--seq-len", 6)
    assert result.code == 0, result.err
    mf = read_model(out)
    assert mf.weight_dtype == "int8" and mf.source_logits is not None
    wq = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    stored = mf.storage["weights.layers[0].wq"]
    assert stored.dtype == "int8" and stored.block_size == 32
    # dequantised values within half a quantisation step of the checkpoint's
    step = np.repeat(stored.scales, 32, axis=1)[:, :wq.shape[1]]
    assert np.all(np.abs(mf.weights.layers[0].wq - wq) <= step / 2 + 1e-7)


def test_import_given_ids(cli, tmp_path, checkpoints):
    directory, model, _ = checkpoints["untied-2-shards"]
    result = cli("import", directory, "-o", tmp_path / "a.json", "--ids", "5,6,7,8",
                 "--ids", "9 10")
    assert result.code == 0, result.err
    mf = read_model(tmp_path / "a.json")
    assert mf.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert mf.input_ids[0].tolist() == [5, 6, 7, 8] and mf.input_ids[1, 2:].tolist() == [9, 10]
    ids_file = tmp_path / "ids.json"
    ids_file.write_text("[[5, 6, 7, 8], [9, 10]]")
    assert cli("import", directory, "-o", tmp_path / "b.json", "--ids-file", ids_file).code == 0
    text_file = tmp_path / "ids.txt"
    text_file.write_text("5, 6, 7, 8\n\n9 10\n")
    assert cli("import", directory, "-o", tmp_path / "c.json", "--ids-file", text_file).code == 0
    for other in ("b.json", "c.json"):
        again = read_model(tmp_path / other)
        assert np.array_equal(again.input_ids, mf.input_ids)
        assert np.array_equal(again.attention_mask, mf.attention_mask)


@pytest.mark.parametrize("args,needle", [
    (["--ids", "1,2", "--seq-len", "4"], "--seq-len draws random inputs"),
    (["--ids", "1,2", "--ids-file", "x"], "not both"),
    (["--ids", "1,x"], "--ids: line 1: expected token ids"),
    (["--ids", "1,128"], "id 128 is outside the vocabulary [0, 128)"),
    (["--ids", "[[1, 2], [true]]"], "row 1: expected token ids"),
    (["--seq-len", "65"], "exceeds the checkpoint's max_position_embeddings 64"),
    (["--pad", "3"], "--pad 3 must be between 0 and --batch-size 2"),
])
def test_import_bad_inputs(cli, tmp_path, checkpoints, args, needle):
    out = tmp_path / "m.json"
    cli("import", checkpoints["tied-1-file"][0], "-o", out, *args).assert_one_line_error(2, needle)
    assert not out.exists()


def test_import_minimind2_config(cli, tmp_path):
    """MiniMind2's dense model as its own code saves it: MiniMind config keys (expert counts
    with use_moe false, intermediate_size null: derived from the tensors), tied head, the
    same tensor names; it computes what LlamaForCausalLM computes."""
    model = llama(tied=True, seed=4, intermediate_size=192, rope_theta=1e6)
    directory = tmp_path / "minimind"
    directory.mkdir()
    state = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    safetensors_numpy.save_file(state, str(directory / "model.safetensors"), {"format": "pt"})
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["MiniMindForCausalLM"], "model_type": "minimind", "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
        "vocab_size": 128, "max_position_embeddings": 64, "intermediate_size": None,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "hidden_act": "silu", "dropout": 0.0,
        "flash_attn": True, "use_moe": False, "n_routed_experts": 4, "n_shared_experts": 1,
        "num_experts_per_tok": 2, "scoring_func": "softmax", "bos_token_id": 1,
        "eos_token_id": 2}))
    out = tmp_path / "m.json"
    result = cli("import", directory, "-o", out, "--seq-len", 6, "--batch-size", 2)
    assert result.code == 0, result.err
    assert "intermediate_size=192 (from the gate_proj tensor)" in result.out
    mf = read_model(out)
    assert mf.config.intermediate_size == 192 and mf.meta["source"]["tied"]
    assert_same_weights(mf, model, tied=True)
    ours, theirs = reference_logits(mf), hf_logits(model, mf.input_ids, mf.attention_mask)
    assert max_error(ours, theirs, mf.attention_mask) < 1e-5


# ---------------------------------------------------------------------------------------------
# refusals: each writes the bad checkpoint itself and expects one line naming the key


def _config(**changes):
    def edit(directory: Path) -> None:
        path = directory / "config.json"
        config = json.loads(path.read_text())
        for key, value in changes.items():
            if value is _DROP:
                config.pop(key, None)
            else:
                config[key] = value
        path.write_text(json.dumps(config))
    return edit


_DROP = object()


def _tensors(add: dict | None = None, drop: tuple = (), cast: dict | None = None):
    """Rewrite model.safetensors with tensors added, dropped, or stored in another dtype."""
    def edit(directory: Path) -> None:
        from safetensors.numpy import load_file
        path = directory / "model.safetensors"
        state = load_file(str(path))
        for name in drop:
            del state[name]
        for name, dtype in (cast or {}).items():
            state[name] = state[name].astype(dtype)
        state.update(add or {})
        safetensors_numpy.save_file(state, str(path), {"format": "pt"})
    return edit


REFUSED = {
    "attention_bias": (_config(attention_bias=True), "attention_bias"),
    "mlp_bias": (_config(mlp_bias=True), "mlp_bias"),
    "rope_scaling": (_config(rope_scaling={"rope_type": "linear", "factor": 2.0}),
                     "rope_scaling"),
    "rope_parameters": (_config(rope_parameters={"rope_type": "llama3", "factor": 8.0,
                                                 "rope_theta": 5e5}),
                        "rope_parameters.rope_type"),
    "partial_rotary_factor": (_config(partial_rotary_factor=0.5), "partial_rotary_factor"),
    "sliding_window": (_config(sliding_window=16), "sliding_window"),
    "use_sliding_window": (_config(use_sliding_window=True, sliding_window=16),
                           "use_sliding_window"),
    "num_local_experts": (_config(num_local_experts=8), "num_local_experts"),
    "num_experts": (_config(num_experts=4), "num_experts"),
    "use_moe": (_config(use_moe=True, n_routed_experts=4), "use_moe"),
    "qk_norm": (_config(qk_norm=True), "qk_norm"),
    "q_norm tensor": (_tensors(add={"model.layers.1.self_attn.q_norm.weight":
                                    np.ones(8, np.float32)}),
                      "model.layers.1.self_attn.q_norm.weight"),
    "attention bias tensor": (_tensors(add={"model.layers.0.self_attn.q_proj.bias":
                                            np.zeros(64, np.float32)}),
                              "model.layers.0.self_attn.q_proj.bias"),
    "hidden_act": (_config(hidden_act="gelu"), "hidden_act"),
    "head_dim": (_config(head_dim=16), "head_dim"),
    "layer_types": (_config(layer_types=["sliding_attention", "full_attention"]),
                    "layer_types"),
    "architecture": (_config(architectures=["MistralForCausalLM"]), "architectures"),
    "dtype": (_tensors(cast={"model.layers.0.mlp.up_proj.weight": np.float64}),
              "model.layers.0.mlp.up_proj.weight: dtype F64"),
    "missing tensor": (_tensors(drop=("model.layers.1.mlp.down_proj.weight",)),
                       "model.layers.1.mlp.down_proj.weight: missing"),
    "shape": (_config(intermediate_size=128), "model.layers.0.mlp.gate_proj.weight: shape"),
    "untied without lm_head": (_config(tie_word_embeddings=False), "lm_head.weight: missing"),
    "tied with another lm_head": (_tensors(add={"lm_head.weight":
                                                np.zeros((128, 64), np.float32)}),
                                  "lm_head.weight: differs"),
    "inv_freq": (_tensors(add={"model.layers.0.self_attn.rotary_emb.inv_freq":
                               np.ones(4, np.float32)}), "rotary_emb.inv_freq"),
    "non-finite": (_tensors(add={"model.norm.weight": np.full(64, np.nan, np.float32)}),
                   "model.norm.weight: non-finite"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    "damaged weights": (lambda d: (d / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{"),
                        "not a readable safetensors file"),
    "config not JSON": (lambda d: (d / "config.json").write_text("{"), "config.json: not valid"),
}


@pytest.mark.parametrize("feature", list(REFUSED))
def test_import_refuses(cli, tmp_path, checkpoints, feature):
    edit, needle = REFUSED[feature]
    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoints["tied-1-file"][0], directory)
    edit(directory)
    out = tmp_path / "m.json"
    cli("import", directory, "-o", out).assert_one_line_error(2, needle)
    assert not out.exists()


def test_import_refuses_a_bad_shard_index(cli, tmp_path, checkpoints):
    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoints["untied-2-shards"][0], directory)
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"]["model.norm.weight"]
    other = next(s for s in index["weight_map"].values() if s != shard)
    index["weight_map"]["model.norm.weight"] = other
    index_path.write_text(json.dumps(index))
    cli("import", directory, "-o", tmp_path / "m.json").assert_one_line_error(
        2, f"lists model.norm.weight in {other}, which does not hold it")


# ---------------------------------------------------------------------------------------------
# export


def test_export_loads_in_transformers(cli, tmp_path, checkpoints, generated):
    """A generated (tied) file and an imported untied one: from_pretrained gives the
    reference's logits, and the untied round trip gives back the checkpoint's tensors."""
    imported = tmp_path / "imported.json"
    directory, original, _ = checkpoints["untied-2-shards"]
    assert cli("import", directory, "-o", imported, "--seq-len", 5).code == 0
    for path, tied in ((generated, True), (imported, False)):
        out = tmp_path / f"export-{path.stem}"
        result = cli("export", path, out)
        assert result.code == 0, result.err
        assert ("tied head" if tied else "untied head") in result.out
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
        mf = read_model(path)
        loaded = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager")
        assert loaded.config.tie_word_embeddings == tied
        assert_same_weights(mf, loaded, tied)
        err = max_error(hf_logits(loaded, mf.input_ids, mf.attention_mask),
                        reference_logits(mf), mf.attention_mask)
        assert err < 1e-5
    assert_same_weights(read_model(imported), original, tied=False)


def test_export_refuses_a_non_empty_directory_and_replaces_it_with_force(cli, tmp_path,
                                                                         generated):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cli("export", generated, out).assert_one_line_error(2, "is not empty (--force replaces it)")
    assert (out / "keep.txt").read_text() == "mine"
    assert cli("export", generated, out, "--force").code == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind


def test_export_refuses_rope_tables_transformers_cannot_carry(cli, tmp_path, generated):
    from xvalid.modelfile import write_model
    mf = read_model(generated)
    mf.rope_cos = mf.rope_cos.copy()
    mf.rope_cos[3, 0] += 1e-3
    path = tmp_path / "odd-rope.json"
    write_model(mf, path)
    cli("export", path, tmp_path / "out").assert_one_line_error(2, "rope.cos: differs")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# the hf backend


def test_compare_torch_hf_cpp_on_an_imported_checkpoint(cli, tmp_path, checkpoints):
    """The target: a transformers-saved random Llama (GQA, untied head, 2 shards), imported,
    compared with --backends torch,hf,cpp (and their KV caches): PASS, torch vs hf within the
    float32 budget, every intermediate of hf compared."""
    model = tmp_path / "m.json"
    assert cli("import", checkpoints["untied-2-shards"][0], "-o", model, "--seq-len", 8,
               "--batch-size", 3, "--pad", 2).code == 0
    report_path = tmp_path / "report.json"
    result = cli("compare", model, "--backends", "torch,hf,cpp", "--decode", 3, "--repeat", 1,
                 "--warmup", 0, "--json", report_path)
    assert result.code == 0, result.out + result.err
    report = json.loads(report_path.read_text())
    jsonschema = pytest.importorskip("jsonschema")
    schema = Path(__file__).parents[1] / "python" / "xvalid" / "schemas" / "compare-report.schema.json"
    jsonschema.validate(report, json.loads(schema.read_text()))
    assert report["verdict"] == "pass"
    hf = next(c for c in report["candidates"] if c["name"] == "hf")
    assert hf["status"] == "pass" and hf["decode"]["status"] == "pass"
    assert hf["metrics"]["max_abs"] <= report["tolerance"]["atol"]
    assert hf["divergence"]["compared"] == hf["divergence"]["expected"]
    assert report["versions"]["backends"]["hf"]["attention"] == "eager"


def test_hf_backend_runs_transformers_on_the_files_weights(tmp_path, checkpoints, cli):
    """The hf candidate is transformers' own computation on the file's weights: its logits
    move when one of its weights does, it captures every named intermediate, and a file
    whose RoPE tables are not the ones transformers computes from rope_theta is refused."""
    from xvalid.hf_backend import HfBackend
    from xvalid.errors import ModelFileError
    model = tmp_path / "m.json"
    assert cli("import", checkpoints["tied-1-file"][0], "-o", model, "--seq-len", 6).code == 0
    mf = read_model(model)
    backend = HfBackend(mf)
    good, captured = backend.forward(mf.input_ids, mf.attention_mask, capture=True)
    assert len(captured) == 3 + 12 * mf.config.num_hidden_layers
    assert captured["layer1.q"].shape == (2, 6, 8, 8) and captured["layer1.k"].shape == (2, 6, 2, 8)
    with torch.no_grad():
        backend.model.model.layers[1].post_attention_layernorm.weight.mul_(1.01)
    bad, _ = backend.forward(mf.input_ids, mf.attention_mask)
    assert max_error(bad, good, mf.attention_mask) > 1e-4
    mf.rope_sin = mf.rope_sin.copy()
    mf.rope_sin[5, 1] += 1e-3
    with pytest.raises(ModelFileError, match="rope.sin: differs"):
        HfBackend(mf)


def test_hf_backend_without_transformers(cli, tmp_path, generated, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    needle = "transformers is not installed: pip install 'xvalid[hf]'"
    cli("compare", generated, "--backends", "torch,hf").assert_one_line_error(2, needle)
    out = tmp_path / "logits.npy"
    cli("run", generated, "--backend", "hf", "-o", out).assert_one_line_error(2, needle)
    assert not out.exists()
