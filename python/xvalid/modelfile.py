"""The model file, format version 2: one JSON object with base64 tensors.

Layout (docs/model-format.md has every key, dtype, shape and byte order):
  format, format_version        xvalid's additions; readers never require them
  meta     {seed, B, S, head_dim, reference: {...logit statistics...}, ...}
  config   {hidden_size, num_hidden_layers, ..., rms_norm_eps, rope_theta}
  inputs   {input_ids int32 (B,S), attention_mask uint8 (B,S)}
  rope     {cos float32 (max_pos, hd), sin float32 (max_pos, hd)}
  weights  {tok_embedding (V,H), final_rms (H), lm_head (V,H), layers: [{...}, ...]}
           float32, float16 or bfloat16; the matrices also int8 (+ block_size, scales)
  source   optional {weight_dtype, logits (B,S,V)}: the model's logits before its weights
           were converted (the quantisation cost's baseline)
  tensor   {name, shape, dtype, encoding: "base64", data, preview}

Reading validates everything against the config and names the first problem
("weights.layers[1].wk: shape expected [16, 64], found [64, 64]").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import mmap
import os
import re
import secrets
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pybase64

from .config import ModelConfig
from .dtypes import StoredTensor, weight_dtype_of
from .errors import ConfigError, InputError, ModelFileError, brief, cut
from .files import atomic_write
from .memory import check_forward_memory
from .st_container import RawTensor, is_safetensors

from .formatspec import (FORMAT_NAME, FORMAT_VERSION, INT8, MATRIX_ONLY_DTYPES,  # noqa: F401
                         MAX_JSON_DEPTH, RESERVED_DTYPES, REQUIRED_CONFIG, REQUIRED_SECTIONS,
                         SOURCE, STORAGE_DTYPES_SPEC, WEIGHT_DTYPES, WEIGHT_MATRICES,
                         WRITTEN_VERSION_PLAIN)

PREVIEW_LEN = 16
# MAX_JSON_DEPTH: arrays and objects may be nested at most this deep (the C++ loader's limit
# too). A model file needs 6 levels; deeper text is refused before it is parsed.

# Storage dtypes: the `dtype` field names how the raw little-endian bytes are laid out
# (bfloat16 as its raw bits, "<u2"). The reserved names (RESERVED_DTYPES) let later versions
# add other types without changing how today's files are read.
STORAGE_DTYPES: dict[str, np.dtype] = {name: np.dtype(d["numpy"])
                                       for name, d in STORAGE_DTYPES_SPEC.items()}
DTYPE_NAMES: dict[np.dtype, str] = {dt: name for name, dt in STORAGE_DTYPES.items()}
assert len(DTYPE_NAMES) == len(STORAGE_DTYPES), "each storage dtype needs its own numpy dtype"
# What a weights.* tensor may be stored as: vectors (the norms) every weight dtype but int8
MATRIX_DTYPES = WEIGHT_DTYPES
VECTOR_DTYPES = tuple(d for d in WEIGHT_DTYPES if d not in MATRIX_ONLY_DTYPES)


@dataclass
class LayerWeights:
    rms_attn: np.ndarray  # (H,)  input_layernorm
    rms_ffn: np.ndarray  # (H,)  post_attention_layernorm
    wq: np.ndarray  # (NH*hd, H)
    wk: np.ndarray  # (KVH*hd, H)
    wv: np.ndarray  # (KVH*hd, H)
    wo: np.ndarray  # (H, NH*hd)
    w_gate: np.ndarray  # (I, H)
    w_up: np.ndarray  # (I, H)
    w_down: np.ndarray  # (H, I)


@dataclass
class Weights:
    tok_embedding: np.ndarray  # (V, H)
    final_rms: np.ndarray  # (H,)
    lm_head: np.ndarray  # (V, H), tied: equal to tok_embedding
    layers: list[LayerWeights]


@dataclass
class ModelFile:
    config: ModelConfig
    weights: Weights
    input_ids: np.ndarray  # (B, S) int32
    attention_mask: np.ndarray  # (B, S) uint8, 1 = keep, 0 = pad
    rope_cos: np.ndarray  # (max_pos, hd) float32
    rope_sin: np.ndarray  # (max_pos, hd) float32
    meta: dict = field(default_factory=dict)
    source_format: str = f"{FORMAT_NAME} v{FORMAT_VERSION}"  # or "seed layout" for other writers
    # The stored form of every weight that is not float32, keyed as named_tensors() keys
    # them ("weights.layers[0].wq"); the float32 arrays above are their exact values.
    storage: dict[str, StoredTensor] = field(default_factory=dict)
    # The quantisation record: float32 (B, S, V) logits of the model before its weights were
    # converted, on these inputs, and that model's weight dtype ("float32").
    source_logits: np.ndarray | None = None
    source_weight_dtype: str | None = None

    @property
    def weight_dtype(self) -> str:
        """The weight matrices' storage dtype ("float32", "int8", ...) or "mixed"."""
        return weight_dtype_of(self) if self.storage else "float32"

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Expected shape of every per-layer tensor, in file order."""
    H, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return {"rms_attn": (H,), "rms_ffn": (H,), "wq": (q_out, H), "wk": (kv_out, H),
            "wv": (kv_out, H), "wo": (H, q_out), "w_gate": (I, H), "w_up": (I, H),
            "w_down": (H, I)}


# ---------------------------------------------------------------------------------------------
# tensors


def encode_tensor(name: str, array: np.ndarray, stored: StoredTensor | None = None
                  ) -> Iterator[bytes]:
    """A tensor object of the layout as JSON text, in chunks: raw C-order little-endian bytes,
    base64. The data chunk is written as-is (base64 needs no JSON escaping), which keeps
    writing a 100M-parameter model to a few seconds. With `stored`, the stored form is
    written (int8: with block_size and its scales tensor); the preview shows `array`, the
    values it means."""
    raw = stored.data if stored is not None else array
    dtype_name = DTYPE_NAMES.get(raw.dtype)
    if dtype_name is None or (stored is not None and stored.dtype != dtype_name):
        raise TypeError(f"{name}: cannot store dtype {raw.dtype}")
    raw = np.ascontiguousarray(raw, dtype=STORAGE_DTYPES[dtype_name])
    head = {"name": name, "shape": list(raw.shape), "dtype": dtype_name, "encoding": "base64"}
    yield json.dumps(head)[:-1].encode() + b', "data": "'
    yield base64.b64encode(raw.tobytes())
    preview = array.reshape(-1)[:PREVIEW_LEN].tolist()
    yield b'", "preview": ' + json.dumps(preview).encode()
    if stored is not None and stored.scales is not None:
        yield f', "{INT8["block_size_key"]}": {stored.block_size}, "{INT8["scales_key"]}": '.encode()
        yield from encode_tensor(f"{name}.{INT8['scales_key']}", stored.scales)
    yield b"}"


class DecodedText:
    """A tensor's "data" string that load_json decoded while reading the file (it is valid
    base64): its length in characters, as len() of the string, and its bytes."""

    __slots__ = ("chars", "raw")

    def __init__(self, chars: int, raw: bytes):
        self.chars, self.raw = chars, raw

    def __len__(self) -> int:
        return self.chars


def decode_tensor(obj: Any, key: str, expected_shape: tuple[int, ...] | None,
                  dtype: str | tuple[str, ...]) -> np.ndarray:
    """Decode and check one tensor object (or a safetensors RawTensor); every failure names `key`.
    `dtype`: the dtype expected there, or the dtypes allowed; the array comes back in the
    stored numpy dtype (STORAGE_DTYPES; DTYPE_NAMES names it).
    Its "data" is a base64 string, or a DecodedText standing for one (_base64_bytes takes both)."""
    if isinstance(obj, RawTensor):
        return _raw_tensor(obj, key, expected_shape, dtype)
    if not isinstance(obj, dict):
        raise ModelFileError(f"{key}: expected a tensor object, found {type(obj).__name__}")
    for required in ("shape", "dtype", "data"):
        if required not in obj:
            raise ModelFileError(f"{key}: tensor object has no '{required}'")
    encoding = obj.get("encoding")
    if encoding is not None and encoding != "base64":  # absent (or null) means base64
        raise ModelFileError(f"{key}: encoding expected 'base64', found {encoding!r}")
    shape = obj["shape"]
    dtype = _check_dtype_and_shape(key, obj["dtype"], dtype, shape, expected_shape)
    data = obj["data"]
    if not isinstance(data, (str, DecodedText)):
        raise ModelFileError(f"{key}: data must be a base64 string, found {type(data).__name__}")
    np_dtype = STORAGE_DTYPES[dtype]
    expected_bytes = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
    if len(data) != 4 * ((expected_bytes + 2) // 3):  # checked before decoding anything
        raise ModelFileError(f"{key}: data holds {len(data)} base64 characters, expected "
                             f"{4 * ((expected_bytes + 2) // 3)} for shape {shape} {dtype}")
    raw = _base64_bytes(data, key)
    if len(raw) != expected_bytes:
        raise ModelFileError(f"{key}: data decodes to {len(raw)} bytes, expected {expected_bytes}")
    return _finite(np.frombuffer(raw, dtype=np_dtype).reshape(shape), key)


def _base64_bytes(data: str | DecodedText, key: str) -> bytes:
    """The bytes of a tensor's base64 "data"; ModelFileError naming `key` if it is not valid."""
    if isinstance(data, DecodedText):
        return data.raw
    raw = _fast_b64decode(data)
    if raw is not None:
        return raw
    try:  # for the message
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ModelFileError(f"{key}: bad base64 data ({exc})") from None


def _fast_b64decode(text: Any) -> bytes | None:
    """base64.b64decode(text, validate=True) at several GB/s (pybase64, SIMD), or None for a
    text it refuses: pybase64 accepts a subset of what base64 does (it refuses "AAAA===="),
    with the same bytes, so a None sends the text to base64 for its verdict and message.
    `text`: str, bytes, or a memoryview of the file."""
    try:
        return pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _dtype_list(names: tuple[str, ...]) -> str:
    """('float32', 'float16', 'bfloat16') -> 'float32, float16 or bfloat16'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _check_dtype_and_shape(key: str, found_dtype: Any, dtype: str | tuple[str, ...], shape: Any,
                           expected_shape: tuple[int, ...] | None) -> str:
    """The tensor's dtype (one of `dtype`), after checking it and the shape."""
    allowed = (dtype,) if isinstance(dtype, str) else dtype
    if found_dtype not in allowed:
        if found_dtype in RESERVED_DTYPES:
            raise ModelFileError(f"{key}: dtype {found_dtype} is not supported yet "
                                 f"(format version {FORMAT_VERSION} reads {_dtype_list(allowed)} here)")
        if found_dtype in MATRIX_ONLY_DTYPES and allowed == VECTOR_DTYPES:
            raise ModelFileError(f"{key}: dtype {found_dtype} is only allowed for 2-D weight matrices")
        raise ModelFileError(f"{key}: dtype expected {_dtype_list(allowed)}, found {found_dtype!r}")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ModelFileError(f"{key}: shape must be a list of non-negative integers, found {shape!r}")
    if expected_shape is not None and tuple(shape) != tuple(expected_shape):
        raise ModelFileError(f"{key}: shape expected {list(expected_shape)}, found {shape}")
    return found_dtype


def _raw_tensor(t: RawTensor, key: str, expected_shape: tuple[int, ...] | None,
                dtype: str | tuple[str, ...]) -> np.ndarray:
    """A safetensors tensor (offsets and byte length checked by st_container), copied out of
    the mapped file."""
    dtype = _check_dtype_and_shape(key, t.dtype, dtype, t.shape, expected_shape)
    return _finite(np.frombuffer(t.data, dtype=STORAGE_DTYPES[dtype]).reshape(t.shape).copy(), key)


def decode_weight(obj: Any, key: str, expected_shape: tuple[int, ...],
                  storage: dict[str, StoredTensor]) -> np.ndarray:
    """A weights.* tensor as float32: float32 as stored; float16, bfloat16 and int8 (2-D
    matrices only) upcast or dequantised exactly, their stored form put in storage[key].
    Non-finite values are refused in every dtype, scales included."""
    allowed = MATRIX_DTYPES if len(expected_shape) == 2 else VECTOR_DTYPES
    raw = decode_tensor(obj, key, expected_shape, allowed)
    dtype = DTYPE_NAMES[raw.dtype]
    if dtype == "float32":
        return raw
    if dtype == "int8":
        scales, block_size = _int8_parts(obj, key, expected_shape)
        stored = StoredTensor(dtype, raw, scales, block_size)
    else:
        stored = StoredTensor(dtype, raw)
    values = stored.to_float32()
    if dtype == "bfloat16":  # float16 was checked as stored (decode_tensor)
        _finite(values, key)
    storage[key] = stored
    return values


def _int8_parts(obj: Any, key: str, shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """An int8 tensor's scales (R, ceil(C / block_size)) float32 and its block size; the JSON
    object's keys, or what st_container attached to a RawTensor (the `.scales` tensor and
    __metadata__.quantization's block size): the same checks and messages for both."""
    if isinstance(obj, RawTensor):
        scales, block_size = obj.scales, obj.block_size
    else:
        scales, block_size = obj.get(INT8["scales_key"]), obj.get(INT8["block_size_key"])
    if scales is None:
        raise ModelFileError(f"{key}: int8 tensor has no '{INT8['scales_key']}'")
    if block_size is None:
        raise ModelFileError(f"{key}: int8 tensor has no '{INT8['block_size_key']}'")
    rows, columns = shape
    if not (isinstance(block_size, int) and not isinstance(block_size, bool)
            and 1 <= block_size <= columns):
        raise ModelFileError(f"{key}: {INT8['block_size_key']} must be an integer in "
                             f"[1, {columns}], found {brief(block_size)}")
    blocks = -(-columns // block_size)
    scales = decode_tensor(scales, f"{key}.{INT8['scales_key']}", (rows, blocks),
                           INT8["scales_dtype"])
    return scales, block_size


def _finite(array: np.ndarray, key: str) -> np.ndarray:
    if array.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(array))
        if bad.size:
            index = np.unravel_index(bad[0], array.shape)
            raise ModelFileError(f"{key}: non-finite value {array[index]} at index "
                                 f"{list(map(int, index))} ({bad.size} in all)")
    return array


def named_tensors(mf: ModelFile) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of a model file with its key, in file order ("weights.layers[1].wk": the
    keys the reader's error messages use)."""
    w = mf.weights
    yield "inputs.input_ids", mf.input_ids
    yield "inputs.attention_mask", mf.attention_mask
    yield "rope.cos", mf.rope_cos
    yield "rope.sin", mf.rope_sin
    yield "weights.tok_embedding", w.tok_embedding
    yield "weights.final_rms", w.final_rms
    yield "weights.lm_head", w.lm_head
    for index, layer in enumerate(w.layers):
        for f in fields(LayerWeights):
            yield f"weights.layers[{index}].{f.name}", getattr(layer, f.name)


def tensor_checksum(tensor: np.ndarray | StoredTensor) -> str:
    """sha256 of the raw bytes as stored (first 16 hex digits): equal bytes, equal checksum.
    A stored tensor: its values' bytes, then its scales' (int8)."""
    digest = hashlib.sha256()
    arrays = ([tensor.data] + ([tensor.scales] if tensor.scales is not None else [])
              if isinstance(tensor, StoredTensor) else [tensor])
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# reading


def _require(parent: dict, name: str, where: str = ""):
    """parent[name]; a missing (or null) key is the file's first problem."""
    value = parent.get(name)
    if value is None:
        raise ModelFileError(f"{where}{name}: missing from the model file")
    return value


def _section(doc: dict, key: str) -> dict:
    value = _require(doc, key)
    if not isinstance(value, dict):
        raise ModelFileError(f"{key}: expected an object, found {type(value).__name__}")
    return value


def _read_config(doc: dict) -> ModelConfig:
    raw = _section(doc, "config")
    for required in REQUIRED_CONFIG:
        if raw.get(required) is None:
            raise ModelFileError(f"config.{required}: missing")
    raw = {k: v for k, v in raw.items() if v is not None}  # null means absent (as in HF configs)
    if "max_position_embeddings" not in raw:  # older writers: take it from the RoPE table
        cos = doc.get("rope", {}).get("cos", {}) if isinstance(doc.get("rope"), dict) else {}
        shape = cos.get("shape") if isinstance(cos, dict) else None
        if not (isinstance(shape, list) and shape and isinstance(shape[0], int)):
            raise ModelFileError("config.max_position_embeddings: missing (and no rope.cos shape)")
        raw["max_position_embeddings"] = shape[0]
    try:
        cfg = ModelConfig.from_json(raw)
    except ConfigError as exc:
        raise ModelFileError(str(exc)) from None
    except TypeError as exc:
        raise ModelFileError(f"config: {exc}") from None
    for where, section in (("config", raw), ("meta", doc.get("meta") or {})):
        head_dim = section.get("head_dim") if isinstance(section, dict) else None
        if head_dim is not None and head_dim != cfg.head_dim:
            raise ModelFileError(f"{where}.head_dim: expected {cfg.head_dim} "
                                 f"(hidden_size / num_attention_heads), found {head_dim}")
    return cfg


def _read_weights(section: dict, cfg: ModelConfig) -> tuple[Weights, dict[str, StoredTensor]]:
    """The weights as float32 and the stored form of those that are not (decode_weight)."""
    H, V = cfg.hidden_size, cfg.vocab_size
    storage: dict[str, StoredTensor] = {}
    tok_embedding = decode_weight(_require(section, "tok_embedding", "weights."),
                                  "weights.tok_embedding", (V, H), storage)
    final_rms = decode_weight(_require(section, "final_rms", "weights."), "weights.final_rms",
                              (H,), storage)
    # The head is tied; a writer that omits lm_head means "same as the embedding".
    if section.get("lm_head") is not None:
        lm_head = decode_weight(section["lm_head"], "weights.lm_head", (V, H), storage)
    else:
        lm_head = tok_embedding
        if "weights.tok_embedding" in storage:
            storage["weights.lm_head"] = storage["weights.tok_embedding"]
    layers = _require(section, "layers", "weights.")
    if not isinstance(layers, list):
        raise ModelFileError(f"weights.layers: expected a list, found {type(layers).__name__}")
    if len(layers) != cfg.num_hidden_layers:
        raise ModelFileError(f"weights.layers: expected {cfg.num_hidden_layers} layers "
                             f"(config.num_hidden_layers), found {len(layers)}")
    shapes = layer_shapes(cfg)
    decoded = []
    for index, layer in enumerate(layers):
        prefix = f"weights.layers[{index}]"
        if not isinstance(layer, dict):
            raise ModelFileError(f"{prefix}: expected an object, found {type(layer).__name__}")
        decoded.append(LayerWeights(**{
            name: decode_weight(_require(layer, name, f"{prefix}."), f"{prefix}.{name}", shape,
                                storage)
            for name, shape in shapes.items()}))
    return Weights(tok_embedding, final_rms, lm_head, decoded), storage


def _read_source(doc: dict, shape: tuple[int, int, int]) -> tuple[np.ndarray, str] | tuple[None, None]:
    """The optional quantisation record: (logits (B, S, V) float32, weight_dtype)."""
    key = SOURCE["key"]
    if doc.get(key) is None:
        return None, None
    section = _section(doc, key)
    weight_dtype = _require(section, "weight_dtype", f"{key}.")
    if not isinstance(weight_dtype, str):
        raise ModelFileError(f"{key}.weight_dtype: expected a string, found {brief(weight_dtype)}")
    name = SOURCE["logits_key"]
    logits = decode_tensor(_require(section, name, f"{key}."), f"{key}.{name}", shape,
                           SOURCE["logits_dtype"])
    return logits, weight_dtype


def _read_inputs(section: dict, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    ids = decode_tensor(_require(section, "input_ids", "inputs."), "inputs.input_ids", None, "int32")
    if ids.ndim != 2 or 0 in ids.shape:
        raise ModelFileError(f"inputs.input_ids: shape expected [B, S] with B, S >= 1, "
                             f"found {list(ids.shape)}")
    mask = decode_tensor(_require(section, "attention_mask", "inputs."), "inputs.attention_mask",
                         ids.shape, "uint8")
    check_inputs(ids, mask, cfg, where="inputs.")
    return ids, mask


def check_inputs(ids: np.ndarray, mask: np.ndarray, cfg: ModelConfig, where: str = "",
                 past_len: int = 0) -> None:
    """Token ids within the vocabulary, a 0/1 mask covering past + new tokens, positions in range."""
    error = ModelFileError if where else InputError
    if ids.ndim != 2:
        raise error(f"{where}input_ids: expected 2 dims (B, S), found shape {list(ids.shape)}")
    B, S = ids.shape
    if mask.shape != (B, past_len + S):
        raise error(f"{where}attention_mask: shape expected {[B, past_len + S]}, "
                    f"found {list(mask.shape)}")
    bad = np.argwhere((ids < 0) | (ids >= cfg.vocab_size))
    if bad.size:
        b, s = map(int, bad[0])
        raise error(f"{where}input_ids: id {int(ids[b, s])} at batch {b}, position {s} is outside "
                    f"the vocabulary [0, {cfg.vocab_size})")
    bad = np.argwhere((mask != 0) & (mask != 1))
    if bad.size:
        b, s = map(int, bad[0])
        raise error(f"{where}attention_mask: value {int(mask[b, s])} at batch {b}, position {s} "
                    f"(expected 0 or 1)")
    if past_len + S > cfg.max_position_embeddings:
        raise error(f"{where}input_ids: {past_len + S} positions exceed "
                    f"max_position_embeddings {cfg.max_position_embeddings}")


def parse_model(doc: Any) -> ModelFile:
    """Validate a parsed JSON document and decode its tensors."""
    if not isinstance(doc, dict):
        raise ModelFileError(f"top level: expected a JSON object, found {type(doc).__name__}")
    version = doc.get("format_version")
    if version is None:  # absent (or null): files from before versioning, version 1
        version = FORMAT_VERSION
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelFileError(f"format_version: must be a positive integer, found {brief(version)}")
    if version > FORMAT_VERSION:
        raise ModelFileError(f"format_version: {version} is newer than this reader supports "
                             f"({FORMAT_VERSION}); update xvalid")
    for section in REQUIRED_SECTIONS:
        _section(doc, section)
    cfg = _read_config(doc)
    rope = _section(doc, "rope")
    table = (cfg.max_position_embeddings, cfg.head_dim)
    cos = decode_tensor(_require(rope, "cos", "rope."), "rope.cos", table, "float32")
    sin = decode_tensor(_require(rope, "sin", "rope."), "rope.sin", table, "float32")
    ids, mask = _read_inputs(_section(doc, "inputs"), cfg)
    weights, storage = _read_weights(_section(doc, "weights"), cfg)
    check_forward_memory(cfg, *ids.shape, intermediates=False)
    source_logits, source_weight_dtype = _read_source(doc, (*ids.shape, cfg.vocab_size))
    meta = doc.get("meta") if isinstance(doc.get("meta"), dict) else {}
    source = (f"{doc['format']} v{version}" if isinstance(doc.get("format"), str)
              else "seed layout")
    return ModelFile(cfg, weights, ids, mask, cos, sin, dict(meta), source[:60], storage,
                     source_logits, source_weight_dtype)


_BRACKETS = re.compile(rb"[][{}]")
_COLON = re.compile(rb"[ \t\n\r]*:[ \t\n\r]*")  # between a key and its value
# A "data" string at least this long is decoded while the file is read (the C++ loader's
# kDecodeWhileParsing); shorter ones when their tensor is read.
DECODE_EARLY_CHARS = 4096


def _too_deep_at(text: bytes) -> int | None:
    """The byte offset of the first '[' or '{' that opens a level deeper than MAX_JSON_DEPTH,
    strings skipped; None if there is none (see _scan_text)."""
    return _scan_text(text)[0]


def _scan_text(text: bytes | mmap.mmap) -> tuple[int | None, list[tuple[int, int]]]:
    """One pass over the raw text, strings skipped: (the byte offset of the first '[' or '{'
    that opens a level deeper than MAX_JSON_DEPTH, or None; the content [begin, end) of every
    string of at least DECODE_EARLY_CHARS bytes written as the value of a "data" member:
    `"data"`, whitespace, ':', whitespace, the string). The C++ loader scans the same way
    (model_file.cpp TextScan), so both refuse the same files; on text that is not JSON the
    count may be off, and the parser then reports the syntax error."""
    depth, pos, n = 0, 0, len(text)
    data_strings = []
    data_key_end = -1  # the closing quote of the last string if that string was "data"
    while pos < n:
        quote = text.find(b'"', pos)
        for bracket in _BRACKETS.finditer(text, pos, n if quote < 0 else quote):
            if bracket.group() in b"[{":
                depth += 1
                if depth > MAX_JSON_DEPTH:
                    return bracket.start(), data_strings
            else:
                depth -= 1
        if quote < 0:
            break
        end = quote  # to the closing quote: one after an even number of backslashes
        while True:
            end = text.find(b'"', end + 1)
            if end < 0:
                return None, data_strings  # unterminated: the parser says so
            start = end
            while start > quote + 1 and text[start - 1] == 0x5C:  # backslash
                start -= 1
            if (end - start) % 2 == 0:
                break
        if (end - quote > DECODE_EARLY_CHARS and data_key_end >= 0
                and _COLON.fullmatch(text, data_key_end + 1, quote)):
            data_strings.append((quote + 1, end))
        data_key_end = end if end - quote == 5 and text[quote + 1:end] == b"data" else -1
        pos = end + 1
    return None, data_strings


class _Overflow:
    """A number beyond a double's range (1e999, a 400-digit integer), kept in the parsed
    document until its key is known: the C++ parser refuses it, and so does this reader."""

    def __init__(self, text: str):
        self.text = text


class _Numbers:
    """json.loads's parse_float and parse_int: numbers as the C++ parser keeps them (int64 or
    uint64, else a double), an _Overflow for one beyond a double."""

    def __init__(self):
        self.overflowed = False

    def parse_float(self, text: str) -> float | _Overflow:
        value = float(text)
        if math.isinf(value):
            self.overflowed = True
            return _Overflow(text)
        return value

    def parse_int(self, text: str) -> int | float | _Overflow:
        if len(text) <= 20:
            value = int(text)
            if -(1 << 63) <= value < (1 << 64):
                return value
        return self.parse_float(text)


def _not_a_json_number(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _first_overflow(doc: Any) -> tuple[str, _Overflow] | None:
    """The key ("config.hidden_size", "weights.layers[1]", "(top level)") and value of the
    first _Overflow in `doc` in file order, which is where the C++ parser stops, named as the
    C++ loader names it. (`doc` is at most MAX_JSON_DEPTH deep.)"""
    stack = [("", doc)]
    while stack:
        key, value = stack.pop()
        if isinstance(value, _Overflow):
            return key or "(top level)", value
        if isinstance(value, dict):
            children = [(f"{key}.{cut(k)}" if key else cut(k), v) for k, v in value.items()]
        elif isinstance(value, list):
            children = [(f"{key}[{i}]", v) for i, v in enumerate(value)]
        else:
            continue
        stack.extend(reversed(children))
    return None


def load_json(path: str | os.PathLike) -> Any:
    """The parsed document, or ModelFileError "{path}: ...". The checks before and after the
    parse are the C++ loader's, with the same messages: a NUL byte, nesting deeper than
    MAX_JSON_DEPTH, a number beyond a double. The file is memory-mapped; its long "data"
    strings are decoded straight from it, and only the rest goes through json (see
    _parse_skipping): the document then holds a DecodedText for each of them."""
    path = Path(path)
    try:
        with open(path, "rb") as fp:
            try:
                text = mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ)
            except (ValueError, OSError):  # empty, or not a regular file
                text = fp.read()
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ModelFileError(f"{path}: is a directory, expected a model file") from None
    except PermissionError:
        raise ModelFileError(f"{path}: permission denied") from None
    try:
        return _parse_text(text, path)
    finally:
        if isinstance(text, mmap.mmap):
            text.close()


def _parse_text(text: bytes | mmap.mmap, path: Path, skipping: bool = True) -> Any:
    """load_json's checks and parse of the file's text. skipping=False parses it all with json,
    every "data" string a str: the plain way, which the tests hold the fast one to."""
    nul = text.find(b"\0")
    if nul >= 0:
        raise ModelFileError(f"{path}: not valid JSON: NUL byte at offset {nul}")
    too_deep, data_strings = _scan_text(text)
    if too_deep is not None:
        raise ModelFileError(f"{path}: not valid JSON: arrays and objects nested deeper than "
                             f"{MAX_JSON_DEPTH} levels (at byte offset {too_deep})")
    doc = _parse_skipping(text, data_strings) if skipping else None
    return doc if doc is not None else _parse_whole(bytes(text), path)


def _parse_whole(text: bytes, path: Path) -> Any:
    """json.loads of the whole text, with the C++ parser's number limits and its messages."""
    numbers = _Numbers()
    try:
        doc = json.loads(text, parse_float=numbers.parse_float, parse_int=numbers.parse_int,
                         parse_constant=_not_a_json_number)
    except json.JSONDecodeError as exc:
        # exc.msg may end in "at" itself ("Unterminated string starting at"): hence the colon
        raise ModelFileError(f"{path}: not valid JSON ({exc.msg}: line {exc.lineno}, "
                             f"column {exc.colno}; truncated file?)") from None
    except UnicodeDecodeError as exc:
        raise ModelFileError(f"{path}: not valid JSON (bad UTF-8 at byte {exc.start})") from None
    except ValueError as exc:  # NaN, Infinity: Python's extensions of JSON
        raise ModelFileError(f"{path}: not valid JSON: {exc}") from None
    overflow = _first_overflow(doc) if numbers.overflowed else None
    if overflow:
        key, number = overflow
        raise ModelFileError(f"{path}: {key}: number {cut(number.text)} does not fit in a double")
    return doc


def _parse_skipping(text: bytes | mmap.mmap, data_strings: list[tuple[int, int]]) -> Any:
    """The document with each of `data_strings` that is valid base64 decoded straight from the
    text (a DecodedText in its place), the rest of the text parsed by json; None when that is
    not the document _parse_whole would give, so the caller parses it all (and gets its
    message). In the text json reads, each decoded string's content is a marker naming it, with
    a random part no file holds; each marker must come back as the "data" of an object in the
    inputs, rope or weights sections (where tensors are read), or the result is not used. (A
    valid base64 string holds no quote, backslash or control character, so the text with the
    marker in its place is valid JSON exactly when the file is.)"""
    if not data_strings or json.detect_encoding(text[:4]) != "utf-8":
        return None
    marker = f"xvalid-decoded-{secrets.token_hex(16)}-"
    decoded: list[DecodedText] = []
    pieces, pos = [], 0
    with memoryview(text) as view:
        for begin, end in data_strings:
            raw = _fast_b64decode(view[begin:end])
            if raw is not None:
                pieces += [text[pos:begin], f"{marker}{len(decoded)}".encode()]
                decoded.append(DecodedText(end - begin, raw))
                pos = end
    if not decoded:
        return None
    pieces.append(text[pos:])
    numbers = _Numbers()
    try:
        doc = json.loads(b"".join(pieces), parse_float=numbers.parse_float,
                         parse_int=numbers.parse_int, parse_constant=_not_a_json_number)
    except ValueError:  # not JSON (UnicodeDecodeError and JSONDecodeError included)
        return None
    if numbers.overflowed or _put_decoded(doc, marker, decoded) != len(decoded):
        return None
    return doc


def _put_decoded(doc: Any, marker: str, decoded: list[DecodedText]) -> int:
    """Replaces each marker string (see _parse_skipping) that is the "data" of an object in
    doc's inputs, rope or weights section by its DecodedText; the number of distinct ones
    replaced."""
    if not isinstance(doc, dict):
        return 0
    stack = [doc.get(section) for section in ("inputs", "rope", "weights")]
    seen = set()
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            data = value.get("data")
            if isinstance(data, str) and data.startswith(marker):
                index = int(data[len(marker):])
                value["data"] = decoded[index]
                seen.add(index)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return len(seen)


CONTAINERS = ("json", "safetensors")


def container_of(path: str | os.PathLike) -> str:
    """'safetensors' or 'json', by the file's first bytes (st_container.is_safetensors), not
    its name; 'json' for anything unreadable, which load_json then reports."""
    try:
        with open(path, "rb") as fp:
            return "safetensors" if is_safetensors(fp.read(8)) else "json"
    except OSError:
        return "json"


def read_model(path: str | os.PathLike) -> ModelFile:
    """Read and validate a model file of either container; ModelFileError "{path}: {key}: ..."
    names the first problem."""
    if container_of(path) == "safetensors":
        from .st_container import document, read_buffer
        try:
            mf = parse_model(document(read_buffer(Path(path))))
        except ModelFileError as exc:
            raise ModelFileError(f"{path}: {exc}") from None
        mf.source_format += " (safetensors)"
        return mf
    doc = load_json(path)
    try:
        return parse_model(doc)
    except ModelFileError as exc:
        raise ModelFileError(f"{path}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# writing


class _Leaf:
    """A tensor in a document being written: name, array (the float32 values for a weight)
    and, for a weight stored in another dtype, its stored form."""

    def __init__(self, name: str, array: np.ndarray, stored: StoredTensor | None = None):
        self.name, self.array, self.stored = name, array, stored

    @property
    def nbytes(self) -> int:
        return self.stored.nbytes if self.stored is not None else self.array.nbytes


def written_version(mf: ModelFile) -> int:
    """The format version a file of `mf` declares: the plain version when every tensor is
    float32/int32/uint8 (older readers read it), else the current one."""
    return FORMAT_VERSION if mf.storage else WRITTEN_VERSION_PLAIN


def _document(mf: ModelFile) -> dict:
    """The file's object tree, in layout order, with tensors as _Leaf."""
    w = mf.weights
    meta = {"seed": None, "B": mf.batch_size, "S": mf.seq_len, "head_dim": mf.config.head_dim}
    meta.update(mf.meta)

    def weight(name: str, key: str, array: np.ndarray) -> _Leaf:
        return _Leaf(name, array, mf.storage.get(key))

    layers = []
    for index, layer in enumerate(w.layers):
        layers.append({f.name: weight(f"layer{index}_{f.name}", f"weights.layers[{index}].{f.name}",
                                      getattr(layer, f.name))
                       for f in fields(LayerWeights)})
    doc = {
        "format": FORMAT_NAME,
        "format_version": written_version(mf),
        "meta": meta,
        "config": mf.config.to_json(),
        "inputs": {"input_ids": _Leaf("input_ids", mf.input_ids),
                   "attention_mask": _Leaf("attention_mask", mf.attention_mask)},
        "rope": {"cos": _Leaf("rope_cos", mf.rope_cos), "sin": _Leaf("rope_sin", mf.rope_sin)},
        "weights": {"tok_embedding": weight("tok_embedding", "weights.tok_embedding", w.tok_embedding),
                    "final_rms": weight("final_rms", "weights.final_rms", w.final_rms),
                    "lm_head": weight("lm_head", "weights.lm_head", w.lm_head),
                    "layers": layers},
    }
    if mf.source_logits is not None:
        doc[SOURCE["key"]] = {"weight_dtype": mf.source_weight_dtype,
                              SOURCE["logits_key"]: _Leaf("source_logits", mf.source_logits)}
    return doc


def _leaves(obj: Any) -> Iterator[_Leaf]:
    if isinstance(obj, _Leaf):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _leaves(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _leaves(value)


def _serialize(obj: Any, out: Callable[[bytes], None], on_leaf: Callable[[_Leaf], None]) -> None:
    """Stream JSON: tensors are encoded one at a time, so memory stays at one tensor's text."""
    if isinstance(obj, _Leaf):
        out(b"\n")
        for chunk in encode_tensor(obj.name, obj.array, obj.stored):
            out(chunk)
        on_leaf(obj)
    elif isinstance(obj, dict):
        out(b"{")
        for index, (key, value) in enumerate(obj.items()):
            out(("," if index else "").encode() + json.dumps(key).encode() + b":")
            _serialize(value, out, on_leaf)
        out(b"}")
    elif isinstance(obj, list):
        out(b"[")
        for index, value in enumerate(obj):
            out(b"," if index else b"")
            _serialize(value, out, on_leaf)
        out(b"]")
    else:
        out(json.dumps(obj, allow_nan=False).encode())


def write_model(mf: ModelFile, path: str | os.PathLike, progress: bool = True,
                container: str = "json") -> None:
    """Write `mf` atomically in the container "json" or "safetensors"; the JSON writer shows a
    progress bar on stderr for large models."""
    if container == "safetensors":
        return write_model_safetensors(mf, path)
    from .progress import byte_progress
    doc = _document(mf)
    total = sum(leaf.nbytes for leaf in _leaves(doc))
    with byte_progress("writing " + Path(path).name, total, enabled=progress) as advance:
        def write(fp):
            _serialize(doc, fp.write, lambda leaf: advance(leaf.nbytes))
            fp.write(b"\n")
        atomic_write(path, write, binary=True)


def write_model_safetensors(mf: ModelFile, path: str | os.PathLike) -> None:
    """The safetensors container (st_container): every tensor under its message key, config
    and meta as JSON text in the header's __metadata__; int8 scales as the tensor
    "<key>.scales" and block sizes in __metadata__.quantization; the quantisation record as
    the tensor "source.logits" and __metadata__.source."""
    from .st_container import write_safetensors
    doc = _document(mf)
    metadata = {"format": FORMAT_NAME, "format_version": str(doc["format_version"]),
                "config": json.dumps(doc["config"], allow_nan=False),
                "meta": json.dumps(doc["meta"], allow_nan=False)}
    tensors, blocks = [], {}
    for key, array in named_tensors(mf):
        stored = mf.storage.get(key)
        tensors.append((key, array if stored is None else stored.data))
        if stored is not None and stored.scales is not None:
            tensors.append((key + INT8["safetensors_scales_suffix"], stored.scales))
            blocks[key] = {INT8["block_size_key"]: stored.block_size}
    if blocks:
        metadata[INT8["safetensors_metadata"]] = json.dumps(blocks)
    if mf.source_logits is not None:
        tensors.append((SOURCE["safetensors_logits"], mf.source_logits))
        metadata[SOURCE["key"]] = json.dumps({"weight_dtype": mf.source_weight_dtype})
    write_safetensors(tensors, metadata, path)
