"""Hugging Face transformers checkpoints: `xvalid import` reads one into a model file, `xvalid
export` writes a model file as one (docs/huggingface.md).

A checkpoint is a directory with config.json and its weights in model.safetensors, or in
shards listed by model.safetensors.index.json. Two architectures compute what xvalid's model
computes (docs/model.md): LlamaForCausalLM, and MiniMind2's dense MiniMindForCausalLM. Every
config key and tensor the kernel depends on is checked, and whatever the model does not
implement (biases, RoPE scaling, sliding windows, MoE, q/k norms, other tensors) is refused
with one line naming the key or tensor: a checkpoint is never run as something it is not.

Tensors are read with the `safetensors` library into numpy (no torch, no transformers);
float16 and bfloat16 tensors are upcast to float32, exactly; a checkpoint stored wholly in one of
them keeps that storage dtype in the model file (docs/model-format.md, reduced precision).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import ModelConfig
from .errors import ConfigError, InputError, ModelFileError, XValidError, brief, cut
from .modelfile import LayerWeights, ModelFile, Weights, _finite, layer_shapes

INSTALL_HINT = "pip install 'xvalid[hf]'"
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# xvalid's weight names -> the checkpoint's tensor names (the same in both architectures)
GLOBAL_NAMES = {"tok_embedding": "model.embed_tokens.weight", "final_rms": "model.norm.weight",
                "lm_head": "lm_head.weight"}
LAYER_NAMES = {"rms_attn": "input_layernorm.weight", "rms_ffn": "post_attention_layernorm.weight",
               "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight",
               "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight",
               "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight",
               "w_down": "mlp.down_proj.weight"}
assert set(LAYER_NAMES) == {f.name for f in fields(LayerWeights)}

# Older transformers saved RoPE's inverse frequencies as a buffer: derived from rope_theta,
# checked against it, not a weight.
INV_FREQ = re.compile(r"model\.layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq")
QK_NORM = re.compile(r"model\.layers\.\d+\.self_attn\.[qk]_norm\.weight")

# safetensors dtype -> numpy dtype read; everything is stored as float32
READ_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}  # BF16: bits, see _bf16

# The config.json defaults of each architecture's config class, for keys a file leaves out
# (transformers' LlamaConfig; MiniMind2's MiniMindConfig). intermediate_size None: MiniMind's
# rule (ModelConfig's 0). The importer lists every default it used.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": None,
        "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": False},
    "MiniMindForCausalLM": {
        "vocab_size": 6400, "hidden_size": 512, "intermediate_size": None,
        "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
        "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
        "rope_theta": 1e6, "tie_word_embeddings": True},
}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "minimind": "MiniMindForCausalLM"}

# Config switches of features the model does not implement: refused when true.
REFUSED_SWITCHES = {
    "attention_bias": "biases on the attention projections",
    "mlp_bias": "biases on the MLP projections",
    "use_sliding_window": "sliding-window attention",
    "use_moe": "a mixture of experts",
    "qk_norm": "RMSNorm on queries and keys",
    "use_qk_norm": "RMSNorm on queries and keys",
    "inference_rope_scaling": "RoPE scaling (YaRN)",
}
# Expert counts of MoE configs: refused when positive, unless the config's own `use_moe` is
# false (MiniMind keeps its expert counts in every config and ignores them then).
EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")


def _missing_safetensors() -> XValidError:
    return XValidError(f"the safetensors library is not installed: {INSTALL_HINT}")


# ---------------------------------------------------------------------------------------------
# config.json


@dataclass
class CheckpointConfig:
    """What config.json says, mapped to xvalid's config."""

    architecture: str
    config: ModelConfig
    tied: bool
    defaults: dict[str, Any] = field(default_factory=dict)  # keys absent, default used
    intermediate_from_tensors: bool = False  # intermediate_size absent: from gate_proj's shape


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file ({what})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path}: not valid JSON ({_one_line(exc)})") from None
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def architecture_of(raw: dict) -> str:
    """The supported architecture config.json names (`architectures`, else `model_type`)."""
    names = raw.get("architectures")
    if names is not None:
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise ModelFileError(f"config.json: architectures: expected a list of names, found "
                                 f"{brief(names)}")
        supported = [n for n in names if n in ARCHITECTURES]
        if not supported:
            raise ModelFileError(f"config.json: architectures: {cut(', '.join(names))} is not "
                                 f"supported (xvalid reads {', '.join(ARCHITECTURES)})")
        return supported[0]
    model_type = raw.get("model_type")
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    raise ModelFileError(f"config.json: no architectures and model_type {brief(model_type)} is "
                         f"not one of {', '.join(MODEL_TYPES)}")


def _refuse_features(raw: dict) -> None:
    """One line naming the first config key of a feature the model does not implement."""
    for key, feature in REFUSED_SWITCHES.items():
        if raw.get(key):
            raise ConfigError(f"config.json: {key} is {brief(raw[key])}: {feature} is not "
                              f"supported")
    moe_off = "use_moe" in raw and not raw["use_moe"]
    for key in EXPERT_COUNTS:
        value = raw.get(key)
        if not moe_off and isinstance(value, (int, float)) and value > 0:
            raise ConfigError(f"config.json: {key} is {brief(value)}: a mixture of experts is "
                              f"not supported")
    window = raw.get("sliding_window")
    if window is not None and raw.get("use_sliding_window", True):
        raise ConfigError(f"config.json: sliding_window is {brief(window)}: sliding-window "
                          f"attention is not supported")
    layer_types = raw.get("layer_types")
    if layer_types is not None and (not isinstance(layer_types, list) or any(
            t != "full_attention" for t in layer_types)):
        raise ConfigError(f"config.json: layer_types is {brief(layer_types)}: only "
                          f"full_attention layers are supported")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config.json: hidden_act is {brief(act)}: only silu (SwiGLU) is "
                          f"supported")


def _rope_theta(raw: dict, defaults: dict, used: dict) -> float:
    """rope_theta from transformers 5's rope_parameters or the older top-level key; refuses
    any RoPE variant but the default one (scaling, partial rotation)."""
    scaling = raw.get("rope_scaling")
    if scaling is not None and not (isinstance(scaling, dict) and
                                    scaling.get("rope_type", scaling.get("type")) == "default"):
        raise ConfigError(f"config.json: rope_scaling is {brief(scaling)}: RoPE scaling is not "
                          f"supported")
    params = raw.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ConfigError(f"config.json: rope_parameters: expected an object, found "
                              f"{brief(params)}")
        if params.get("rope_type", "default") != "default":
            raise ConfigError(f"config.json: rope_parameters.rope_type is "
                              f"{brief(params['rope_type'])}: RoPE scaling is not supported")
    for source in (raw, params or {}):
        factor = source.get("partial_rotary_factor")
        if factor is not None and factor != 1:
            raise ConfigError(f"config.json: partial_rotary_factor is {brief(factor)}: RoPE on "
                              f"part of the head is not supported")
    theta = (params or {}).get("rope_theta", raw.get("rope_theta"))
    if theta is None:
        theta = used["rope_theta"] = defaults["rope_theta"]
    return theta


def read_config(raw: Any) -> CheckpointConfig:
    """Map a parsed config.json to xvalid's config; ConfigError / ModelFileError names the
    key of the first problem."""
    if not isinstance(raw, dict):
        raise ModelFileError(f"config.json: expected a JSON object, found {brief(raw)}")
    architecture = architecture_of(raw)
    _refuse_features(raw)
    defaults = ARCHITECTURES[architecture]
    used: dict[str, Any] = {}

    def get(key: str):
        if raw.get(key) is None:
            used[key] = defaults[key]
            return defaults[key]
        return raw[key]

    heads = get("num_attention_heads")
    kv_heads = get("num_key_value_heads")
    if kv_heads is None:  # Llama: as many key/value heads as query heads
        kv_heads = used["num_key_value_heads"] = heads
    intermediate = get("intermediate_size")
    values = {"hidden_size": get("hidden_size"), "num_hidden_layers": get("num_hidden_layers"),
              "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "vocab_size": get("vocab_size"), "intermediate_size": intermediate or 0,
              "max_position_embeddings": get("max_position_embeddings"),
              "rms_norm_eps": get("rms_norm_eps"), "rope_theta": _rope_theta(raw, defaults, used)}
    for key, value in values.items():
        if key in ("rms_norm_eps", "rope_theta"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok:
            raise ConfigError(f"config.json: {key}: expected a number, found {brief(value)}")
    if intermediate is not None and intermediate <= 0:
        raise ConfigError(f"config.json: intermediate_size must be positive, found {intermediate}")
    cfg = ModelConfig(**values)
    head_dim = raw.get("head_dim")
    if head_dim is not None and head_dim != cfg.head_dim:
        raise ConfigError(f"config.json: head_dim is {brief(head_dim)}, but hidden_size / "
                          f"num_attention_heads = {cfg.head_dim}: a head_dim of its own is not "
                          f"supported")
    tied = get("tie_word_embeddings")
    if not isinstance(tied, bool):
        raise ConfigError(f"config.json: tie_word_embeddings: expected true or false, found "
                          f"{brief(tied)}")
    return CheckpointConfig(architecture, cfg, tied, used, intermediate is None)


# ---------------------------------------------------------------------------------------------
# the weights


def shard_files(directory: Path) -> dict[str, Path]:
    """Every tensor name of the checkpoint -> the safetensors file holding it (model.
    safetensors first, as transformers looks, else the shards of the index)."""
    single = directory / SINGLE_FILE
    index_path = directory / INDEX_FILE
    if single.is_file():
        return {name: single for name in _keys(single)}
    if not index_path.is_file():
        present = sorted(p.name for p in directory.iterdir()
                         if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        other = (f" ({cut(', '.join(present))} found: re-save with save_pretrained(..., "
                 f"safe_serialization=True))" if present else "")
        raise ModelFileError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}{other}")
    index = _read_json(index_path, "the shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelFileError(f"{index_path}: weight_map: expected an object of tensor name -> "
                             f"file name")
    files: dict[str, Path] = {}
    for shard in sorted(set(weight_map.values())):
        path = directory / shard
        if Path(shard).name != shard or not path.is_file():
            raise ModelFileError(f"{index_path}: shard {cut(shard)} is not a file in {directory}")
        for name in _keys(path):
            if name in files:
                raise ModelFileError(f"{name}: in both {files[name].name} and {shard}")
            files[name] = path
    for name, shard in weight_map.items():
        if files.get(name) != directory / shard:
            raise ModelFileError(f"{index_path}: lists {cut(name)} in {cut(shard)}, which does "
                                 f"not hold it")
    return files


def _open(path: Path):
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise _missing_safetensors() from None
    try:
        return safe_open(str(path), framework="np")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: not a readable safetensors file ({_one_line(exc)})") from None


def _keys(path: Path) -> list[str]:
    with _open(path) as f:
        return list(f.keys())


def _bf16(path: Path, name: str) -> np.ndarray:
    """A bfloat16 tensor as float32, exactly (bfloat16 is float32's upper 16 bits); numpy has
    no bfloat16, so the bytes are found through the header the safetensors library checked."""
    with open(path, "rb") as fp:
        (length,) = struct.unpack("<Q", fp.read(8))
        entry = json.loads(fp.read(length))[name]
        begin, end = entry["data_offsets"]
        fp.seek(8 + length + begin)
        bits = np.frombuffer(fp.read(end - begin), dtype="<u2")
    return (bits.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])


@dataclass
class TensorEntry:
    name: str
    path: Path
    dtype: str
    shape: list[int]


def _entries(files: dict[str, Path]) -> dict[str, TensorEntry]:
    """Dtype and shape of every tensor, from the headers alone."""
    entries = {}
    for path in sorted(set(files.values())):
        with _open(path) as f:
            for name in f.keys():
                view = f.get_slice(name)
                entries[name] = TensorEntry(name, path, view.get_dtype(), list(view.get_shape()))
    return entries


def expected_tensors(cfg: ModelConfig, tied: bool) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape; lm_head only when the head is not tied."""
    H, V = cfg.hidden_size, cfg.vocab_size
    shapes = {GLOBAL_NAMES["tok_embedding"]: (V, H), GLOBAL_NAMES["final_rms"]: (H,)}
    if not tied:
        shapes[GLOBAL_NAMES["lm_head"]] = (V, H)
    per_layer = layer_shapes(cfg)
    for layer in range(cfg.num_hidden_layers):
        for ours, theirs in LAYER_NAMES.items():
            shapes[f"model.layers.{layer}.{theirs}"] = per_layer[ours]
    return shapes


def _check_tensors(entries: dict[str, TensorEntry], ck: CheckpointConfig) -> dict[str, tuple]:
    """The checkpoint's tensors are exactly the model's, in supported dtypes and the config's
    shapes; the first problem is named. Returns the expected shapes."""
    cfg = ck.config
    expected = expected_tensors(cfg, ck.tied)
    head = GLOBAL_NAMES["lm_head"]
    for name, entry in sorted(entries.items()):
        if QK_NORM.fullmatch(name):
            raise ConfigError(f"{name}: RMSNorm on queries and keys (q/k norms) is not supported")
        if name in expected or name == head or INV_FREQ.fullmatch(name):
            continue
        raise ConfigError(f"{name}: not a tensor of {ck.architecture} as xvalid runs it "
                          f"(biases, q/k norms and experts are not supported)")
    for name, shape in expected.items():
        entry = entries.get(name)
        if entry is None:
            why = " (tie_word_embeddings is false)" if name == head else ""
            raise ModelFileError(f"{name}: missing from the checkpoint{why}")
        if entry.dtype not in READ_DTYPES:
            raise ModelFileError(f"{name}: dtype {entry.dtype} is not supported (F32, F16 and "
                                 f"BF16 are read, as float32)")
        if tuple(entry.shape) != shape:
            raise ModelFileError(f"{name}: shape expected {list(shape)} by config.json, found "
                                 f"{entry.shape}")
    return expected


def _load(entry: TensorEntry) -> np.ndarray:
    if entry.dtype == "BF16":
        array = _bf16(entry.path, entry.name)
    else:
        with _open(entry.path) as f:
            array = f.get_tensor(entry.name)
    array = np.ascontiguousarray(array, dtype=np.float32)
    return _finite(array, entry.name)


def _check_inv_freq(entries: dict[str, TensorEntry], cfg: ModelConfig) -> None:
    """A saved rotary inv_freq buffer must be the one rope_theta gives (else the checkpoint
    was made with another RoPE than config.json says)."""
    hd = cfg.head_dim
    want = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    for name, entry in entries.items():
        if not INV_FREQ.fullmatch(name):
            continue
        found = np.asarray(_load(entry), np.float64).reshape(-1)
        if found.shape != want.shape or not np.allclose(found, want, rtol=1e-5, atol=0):
            raise ConfigError(f"{name}: does not match rope_theta {cfg.rope_theta:g} "
                              f"(another RoPE than config.json describes)")


@dataclass
class Checkpoint:
    """A checkpoint's weights as xvalid's, and where they came from."""

    directory: Path
    info: CheckpointConfig
    weights: Weights
    source_dtypes: dict[str, int]  # safetensors dtype -> tensor count

    @property
    def config(self) -> ModelConfig:
        return self.info.config


def read_checkpoint(directory: str | os.PathLike, progress: Callable[[str, int], Any] | None = None
                    ) -> Checkpoint:
    """Read and check a checkpoint directory. `progress(label, total_bytes)` is a context
    manager yielding advance(nbytes) (progress.byte_progress), for big checkpoints."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelFileError(f"{directory}: not a directory (expected a transformers checkpoint "
                             f"directory with {CONFIG_FILE})")
    ck = read_config(_read_json(directory / CONFIG_FILE, "the checkpoint's config"))
    entries = _entries(shard_files(directory))
    if ck.intermediate_from_tensors:  # MiniMind writes null and derives it; the tensor tells
        gate = entries.get("model.layers.0." + LAYER_NAMES["w_gate"])
        if gate is not None and len(gate.shape) == 2:
            ck.config = ModelConfig(**{**_init_values(ck.config), "intermediate_size": gate.shape[0]})
            ck.defaults["intermediate_size"] = f"{gate.shape[0]} (from the gate_proj tensor)"
    expected = _check_tensors(entries, ck)
    _check_inv_freq(entries, ck.config)
    from .generate import check_weight_memory
    cfg = ck.config
    check_weight_memory(cfg, 0 if ck.tied else cfg.vocab_size * cfg.hidden_size)
    total = 4 * sum(math.prod(shape) for shape in expected.values())
    from .progress import byte_progress
    opener = progress or byte_progress
    with opener(f"reading {directory.name}", total) as advance:
        def load(name: str) -> np.ndarray:
            array = _load(entries[name])
            advance(array.nbytes)
            return array
        embedding = load(GLOBAL_NAMES["tok_embedding"])
        layers = [LayerWeights(**{ours: load(f"model.layers.{layer}.{theirs}")
                                  for ours, theirs in LAYER_NAMES.items()})
                  for layer in range(cfg.num_hidden_layers)]
        final_rms = load(GLOBAL_NAMES["final_rms"])
        lm_head = embedding if ck.tied else load(GLOBAL_NAMES["lm_head"])
    if ck.tied and GLOBAL_NAMES["lm_head"] in entries:
        saved = _load(entries[GLOBAL_NAMES["lm_head"]])
        if saved.shape != embedding.shape or not np.array_equal(saved, embedding):
            raise ConfigError(f"{GLOBAL_NAMES['lm_head']}: differs from "
                              f"{GLOBAL_NAMES['tok_embedding']}, but tie_word_embeddings is true")
    dtypes: dict[str, int] = {}
    for name in expected:
        dtypes[entries[name].dtype] = dtypes.get(entries[name].dtype, 0) + 1
    return Checkpoint(directory, ck, Weights(embedding, final_rms, lm_head, layers), dtypes)


def _init_values(cfg: ModelConfig) -> dict:
    return {f.name: getattr(cfg, f.name) for f in fields(ModelConfig) if f.init}


# ---------------------------------------------------------------------------------------------
# inputs


def parse_ids_text(text: str, where: str) -> list[list[int]]:
    """Rows of token ids from `--ids` or an ids file: a JSON list of lists (or one list), else
    one row per line, ids separated by commas or spaces."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            rows = json.loads(stripped)
        except ValueError as exc:
            raise InputError(f"{where}: not valid JSON ({_one_line(exc)})") from None
        if isinstance(rows, list) and rows and not isinstance(rows[0], list):
            rows = [rows]
        if not (isinstance(rows, list) and all(isinstance(r, list) for r in rows)):
            raise InputError(f"{where}: expected a list of rows of ids, found {brief(rows)}")
        for index, row in enumerate(rows):
            bad = next((v for v in row if isinstance(v, bool) or not isinstance(v, int)), None)
            if bad is not None or not row:
                raise InputError(f"{where}: row {index}: expected token ids (integers), found "
                                 f"{brief(row)}")
        return rows
    rows = []
    for number, line in enumerate(stripped.splitlines(), 1):
        words = line.replace(",", " ").split()
        if not words:
            continue
        try:
            rows.append([int(w) for w in words])
        except ValueError:
            raise InputError(f"{where}: line {number}: expected token ids, found "
                             f"'{cut(line.strip())}'") from None
    return rows


def given_inputs(rows: list[list[int]], cfg: ModelConfig, seed: int
                 ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """ids (B,S) int32 and mask (B,S) uint8 from rows of ids; shorter rows are padded on the
    left to the longest (as transformers pads prompts for generation), their padded positions
    holding ids drawn from `seed` (not one constant id: see generate.padded_inputs)."""
    if not rows:
        raise InputError("no token ids given")
    S = max(len(row) for row in rows)
    if S > cfg.max_position_embeddings:
        raise InputError(f"a row of {S} ids exceeds max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, size=(len(rows), S), dtype=np.int32)
    mask = np.zeros((len(rows), S), np.uint8)
    padding = []
    for index, row in enumerate(rows):
        bad = next((v for v in row if not 0 <= v < cfg.vocab_size), None)
        if bad is not None:
            raise InputError(f"row {index}: id {bad} is outside the vocabulary "
                             f"[0, {cfg.vocab_size})")
        ids[index, S - len(row):] = row
        mask[index, S - len(row):] = 1
        if len(row) < S:
            padding.append({"row": index, "side": "left", "length": S - len(row)})
    return ids, mask, padding


def checkpoint_model(ck: Checkpoint, ids: np.ndarray, mask: np.ndarray, meta: dict) -> ModelFile:
    """The model file of a checkpoint and inputs: RoPE tables from rope_theta (as generate
    makes them), meta.source saying where the weights came from."""
    from .generate import rope_tables
    cfg = ck.config
    cos, sin = rope_tables(cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta)
    source = {"tool": "xvalid import", "checkpoint": str(ck.directory),
              "architecture": ck.info.architecture, "tied": ck.info.tied,
              "dtypes": ck.source_dtypes,
              "defaults": dict(ck.info.defaults)}
    if set(ck.source_dtypes) - {"F32"}:
        source["upcast"] = "F16/BF16 tensors stored as float32 (exact)"
    full = {"B": int(ids.shape[0]), "S": int(ids.shape[1]), "head_dim": cfg.head_dim,
            "source": source, **meta}
    return ModelFile(cfg, ck.weights, ids, mask, cos, sin, full)


STORAGE_OF = {"F16": "float16", "BF16": "bfloat16"}


def keep_checkpoint_dtype(mf: ModelFile, ck: Checkpoint) -> ModelFile:
    """`mf` with its weights stored as the checkpoint stores them when every weight tensor is
    F16, or every one BF16 (the float32 weights are their exact upcast, so storing them back
    loses nothing); else `mf` itself, in float32."""
    dtypes = set(ck.source_dtypes)
    if len(dtypes) != 1 or next(iter(dtypes)) not in STORAGE_OF:
        return mf
    from .dtypes import store_weights
    stored = store_weights(mf, STORAGE_OF[dtypes.pop()])
    source = {key: value for key, value in mf.meta["source"].items() if key != "upcast"}
    stored.meta = {**mf.meta, "source": {**source, "kept": stored.weight_dtype}}
    return stored


# ---------------------------------------------------------------------------------------------
# export


def is_tied(mf: ModelFile) -> bool:
    w = mf.weights
    return w.lm_head is w.tok_embedding or np.array_equal(w.lm_head, w.tok_embedding)


def hf_config(mf: ModelFile) -> dict:
    """config.json of LlamaForCausalLM for a model file: every key spelled out (the RoPE base
    both as transformers 4 and 5 read it), float32."""
    c = mf.config
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "vocab_size": c.vocab_size, "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": float(c.rms_norm_eps), "rope_theta": float(c.rope_theta),
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(c.rope_theta)},
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "pretraining_tp": 1, "use_cache": True,
        "tie_word_embeddings": is_tied(mf), "torch_dtype": "float32", "dtype": "float32",
    }


def hf_state(mf: ModelFile) -> dict[str, np.ndarray]:
    """Checkpoint tensor name -> float32 array; no lm_head when the head is tied (transformers
    ties it to the embedding itself)."""
    w = mf.weights
    state = {GLOBAL_NAMES["tok_embedding"]: w.tok_embedding,
             GLOBAL_NAMES["final_rms"]: w.final_rms}
    if not is_tied(mf):
        state[GLOBAL_NAMES["lm_head"]] = w.lm_head
    for index, layer in enumerate(w.layers):
        for ours, theirs in LAYER_NAMES.items():
            state[f"model.layers.{index}.{theirs}"] = getattr(layer, ours)
    return state


# transformers computes its RoPE tables from rope_theta; a file whose tables are other ones
# cannot be exported. numpy and torch tables differ by up to 6e-8 (docs/model.md).
ROPE_TABLE_TOLERANCE = 1e-6


def check_rope_tables(mf: ModelFile) -> None:
    from .generate import rope_tables
    c = mf.config
    cos, sin = rope_tables(c.max_position_embeddings, c.head_dim, c.rope_theta)
    for key, ours, standard in (("rope.cos", mf.rope_cos, cos), ("rope.sin", mf.rope_sin, sin)):
        diff = float(np.abs(ours.astype(np.float64) - standard).max())
        if not diff <= ROPE_TABLE_TOLERANCE:
            raise ModelFileError(f"{key}: differs from the standard table for rope_theta "
                                 f"{c.rope_theta:g} by {diff:.3g}; a transformers checkpoint "
                                 f"carries only rope_theta, not tables")


def export_checkpoint(mf: ModelFile, directory: str | os.PathLike, force: bool = False) -> Path:
    """Write config.json and model.safetensors into `directory`, atomically: both are written
    into a temporary directory beside it, which then takes its place. A non-empty directory
    is replaced only with `force`. Returns the weights file."""
    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise _missing_safetensors() from None
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise XValidError(f"{directory}: exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise XValidError(f"{directory}: directory is not empty (--force replaces it)")
    check_rope_tables(mf)
    parent = directory.parent
    if not parent.is_dir():
        raise XValidError(f"{directory}: directory {parent} does not exist")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise XValidError(f"{directory}: cannot write ({exc.strerror})") from None
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config(mf), indent=2) + "\n")
        state = {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in hf_state(mf).items()}
        save_file(state, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        os.chmod(tmp, 0o755)
        _replace_directory(tmp, directory)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise XValidError(f"{directory}: cannot write ({exc.strerror or exc})") from None
        raise
    return directory / SINGLE_FILE


def _replace_directory(new: Path, target: Path) -> None:
    """Put `new` at `target`: a rename when target is absent, else target is renamed aside
    first and removed after, so target is at all times the old directory or the new one."""
    if not target.exists():
        os.rename(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
