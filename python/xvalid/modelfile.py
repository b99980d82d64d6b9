"""The model file, format version 1: one JSON object with base64 tensors.

Layout (docs/model-format.md has every key, dtype, shape and byte order):
  format, format_version        xvalid's additions; readers never require them
  meta     {seed, B, S, head_dim, reference: {...logit statistics...}, ...}
  config   {hidden_size, num_hidden_layers, ..., rms_norm_eps, rope_theta}
  inputs   {input_ids int32 (B,S), attention_mask uint8 (B,S)}
  rope     {cos float32 (max_pos, hd), sin float32 (max_pos, hd)}
  weights  {tok_embedding (V,H), final_rms (H), lm_head (V,H), layers: [{...}, ...]}
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
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .config import ModelConfig
from .errors import ConfigError, InputError, ModelFileError, brief, cut
from .files import atomic_write
from .memory import check_forward_memory
from .st_container import RawTensor, is_safetensors

from .formatspec import (FORMAT_NAME, FORMAT_VERSION, MAX_JSON_DEPTH,  # noqa: F401
                         RESERVED_DTYPES, REQUIRED_CONFIG, REQUIRED_SECTIONS,
                         STORAGE_DTYPES_SPEC, WRITTEN_VERSION_PLAIN)

PREVIEW_LEN = 16
# MAX_JSON_DEPTH: arrays and objects may be nested at most this deep (the C++ loader's limit
# too). A model file needs 6 levels; deeper text is refused before it is parsed.

# Storage dtypes: the `dtype` field names how the raw little-endian bytes are laid out.
# Version 1 computes in float32; the reserved names (RESERVED_DTYPES) let later versions add
# other float and quantised types without changing how version-1 files are read.
STORAGE_DTYPES: dict[str, np.dtype] = {name: np.dtype(d["numpy"])
                                       for name, d in STORAGE_DTYPES_SPEC.items()}


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


def encode_tensor(name: str, array: np.ndarray) -> Iterator[bytes]:
    """A tensor object of the layout as JSON text, in chunks: raw C-order little-endian bytes,
    base64. The data chunk is written as-is (base64 needs no JSON escaping), which keeps
    writing a 100M-parameter model to a few seconds."""
    dtype_name = next((k for k, v in STORAGE_DTYPES.items() if v == array.dtype), None)
    if dtype_name is None:
        raise TypeError(f"{name}: cannot store dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=STORAGE_DTYPES[dtype_name])
    head = {"name": name, "shape": list(array.shape), "dtype": dtype_name, "encoding": "base64"}
    yield json.dumps(head)[:-1].encode() + b', "data": "'
    yield base64.b64encode(array.tobytes())
    yield b'", "preview": ' + json.dumps(array.reshape(-1)[:PREVIEW_LEN].tolist()).encode() + b"}"


def decode_tensor(obj: Any, key: str, expected_shape: tuple[int, ...] | None,
                  dtype: str) -> np.ndarray:
    """Decode and check one tensor object (or a safetensors RawTensor); every failure names `key`."""
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
    _check_dtype_and_shape(key, obj["dtype"], dtype, shape, expected_shape)
    data = obj["data"]
    if not isinstance(data, str):
        raise ModelFileError(f"{key}: data must be a base64 string, found {type(data).__name__}")
    np_dtype = STORAGE_DTYPES[dtype]
    expected_bytes = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
    if len(data) != 4 * ((expected_bytes + 2) // 3):  # checked before decoding anything
        raise ModelFileError(f"{key}: data holds {len(data)} base64 characters, expected "
                             f"{4 * ((expected_bytes + 2) // 3)} for shape {shape} {dtype}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ModelFileError(f"{key}: bad base64 data ({exc})") from None
    if len(raw) != expected_bytes:
        raise ModelFileError(f"{key}: data decodes to {len(raw)} bytes, expected {expected_bytes}")
    return _finite(np.frombuffer(raw, dtype=np_dtype).reshape(shape), key)


def _check_dtype_and_shape(key: str, found_dtype: Any, dtype: str, shape: Any,
                           expected_shape: tuple[int, ...] | None) -> None:
    if found_dtype != dtype:
        if found_dtype in RESERVED_DTYPES:
            raise ModelFileError(f"{key}: dtype {found_dtype} is not supported yet "
                                 f"(format version {FORMAT_VERSION} reads {dtype} here)")
        raise ModelFileError(f"{key}: dtype expected {dtype}, found {found_dtype!r}")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ModelFileError(f"{key}: shape must be a list of non-negative integers, found {shape!r}")
    if expected_shape is not None and tuple(shape) != tuple(expected_shape):
        raise ModelFileError(f"{key}: shape expected {list(expected_shape)}, found {shape}")


def _raw_tensor(t: RawTensor, key: str, expected_shape: tuple[int, ...] | None,
                dtype: str) -> np.ndarray:
    """A safetensors tensor (offsets and byte length checked by st_container), copied out of
    the mapped file."""
    _check_dtype_and_shape(key, t.dtype, dtype, t.shape, expected_shape)
    return _finite(np.frombuffer(t.data, dtype=STORAGE_DTYPES[dtype]).reshape(t.shape).copy(), key)


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


def tensor_checksum(array: np.ndarray) -> str:
    """sha256 of the raw bytes as stored (first 16 hex digits): equal bytes, equal checksum."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# reading


def _require(parent: dict, name: str, where: str = ""):
    """parent[name]; a missing (or null) key is the file's first problem."""
    value = parent.get(name)
    if value is None:
        raise ModelFileError(f"missing key '{where}{name}'")
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


def _read_weights(section: dict, cfg: ModelConfig) -> Weights:
    H, V = cfg.hidden_size, cfg.vocab_size
    tok_embedding = decode_tensor(_require(section, "tok_embedding", "weights."),
                                  "weights.tok_embedding", (V, H), "float32")
    final_rms = decode_tensor(_require(section, "final_rms", "weights."), "weights.final_rms",
                              (H,), "float32")
    # The head is tied; a writer that omits lm_head means "same as the embedding".
    lm_head = (decode_tensor(section["lm_head"], "weights.lm_head", (V, H), "float32")
               if section.get("lm_head") is not None else tok_embedding)
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
            name: decode_tensor(_require(layer, name, f"{prefix}."), f"{prefix}.{name}", shape,
                                "float32")
            for name, shape in shapes.items()}))
    return Weights(tok_embedding, final_rms, lm_head, decoded)


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
    weights = _read_weights(_section(doc, "weights"), cfg)
    check_forward_memory(cfg, *ids.shape, intermediates=False)
    meta = doc.get("meta") if isinstance(doc.get("meta"), dict) else {}
    source = (f"{doc['format']} v{version}" if isinstance(doc.get("format"), str)
              else "seed layout")
    return ModelFile(cfg, weights, ids, mask, cos, sin, dict(meta), source[:60])


_BRACKETS = re.compile(rb"[][{}]")


def _too_deep_at(text: bytes) -> int | None:
    """The byte offset of the first '[' or '{' that opens a level deeper than MAX_JSON_DEPTH,
    strings skipped; None if there is none. The C++ loader scans the same way (model_file.cpp
    too_deep_at), so both refuse the same files; on text that is not JSON the count may be
    off, and the parser then reports the syntax error."""
    depth, pos, n = 0, 0, len(text)
    while pos < n:
        quote = text.find(b'"', pos)
        for bracket in _BRACKETS.finditer(text, pos, n if quote < 0 else quote):
            if bracket.group() in b"[{":
                depth += 1
                if depth > MAX_JSON_DEPTH:
                    return bracket.start()
            else:
                depth -= 1
        if quote < 0:
            return None
        end = quote  # to the closing quote: one after an even number of backslashes
        while True:
            end = text.find(b'"', end + 1)
            if end < 0:
                return None  # unterminated: the parser says so
            start = end
            while start > quote + 1 and text[start - 1] == 0x5C:  # backslash
                start -= 1
            if (end - start) % 2 == 0:
                break
        pos = end + 1
    return None


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
    MAX_JSON_DEPTH, a number beyond a double."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ModelFileError(f"{path}: is a directory, expected a model file") from None
    except PermissionError:
        raise ModelFileError(f"{path}: permission denied") from None
    nul = text.find(b"\0")
    if nul >= 0:
        raise ModelFileError(f"{path}: not valid JSON: NUL byte at offset {nul}")
    too_deep = _too_deep_at(text)
    if too_deep is not None:
        raise ModelFileError(f"{path}: not valid JSON: arrays and objects nested deeper than "
                             f"{MAX_JSON_DEPTH} levels (at byte offset {too_deep})")
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
    """A tensor in a document being written: name and array."""

    def __init__(self, name: str, array: np.ndarray):
        self.name, self.array = name, array


def _document(mf: ModelFile) -> dict:
    """The file's object tree, in layout order, with tensors as _Leaf."""
    w = mf.weights
    meta = {"seed": None, "B": mf.batch_size, "S": mf.seq_len, "head_dim": mf.config.head_dim}
    meta.update(mf.meta)
    layers = []
    for index, layer in enumerate(w.layers):
        layers.append({f.name: _Leaf(f"layer{index}_{f.name}", getattr(layer, f.name))
                       for f in fields(LayerWeights)})
    return {
        "format": FORMAT_NAME,
        "format_version": WRITTEN_VERSION_PLAIN,  # every tensor float32/int32/uint8
        "meta": meta,
        "config": mf.config.to_json(),
        "inputs": {"input_ids": _Leaf("input_ids", mf.input_ids),
                   "attention_mask": _Leaf("attention_mask", mf.attention_mask)},
        "rope": {"cos": _Leaf("rope_cos", mf.rope_cos), "sin": _Leaf("rope_sin", mf.rope_sin)},
        "weights": {"tok_embedding": _Leaf("tok_embedding", w.tok_embedding),
                    "final_rms": _Leaf("final_rms", w.final_rms),
                    "lm_head": _Leaf("lm_head", w.lm_head),
                    "layers": layers},
    }


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
        for chunk in encode_tensor(obj.name, obj.array):
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
    total = sum(leaf.array.nbytes for leaf in _leaves(doc))
    with byte_progress("writing " + Path(path).name, total, enabled=progress) as advance:
        def write(fp):
            _serialize(doc, fp.write, lambda leaf: advance(leaf.array.nbytes))
            fp.write(b"\n")
        atomic_write(path, write, binary=True)


def write_model_safetensors(mf: ModelFile, path: str | os.PathLike) -> None:
    """The safetensors container (st_container): every tensor under its message key, config
    and meta as JSON text in the header's __metadata__."""
    from .st_container import write_safetensors
    doc = _document(mf)
    metadata = {"format": FORMAT_NAME, "format_version": str(WRITTEN_VERSION_PLAIN),
                "config": json.dumps(doc["config"], allow_nan=False),
                "meta": json.dumps(doc["meta"], allow_nan=False)}
    write_safetensors(list(named_tensors(mf)), metadata, path)
