"""The safetensors container of the model file (docs/model-format.md, "The safetensors
container"): the same model as the JSON container, in one `.safetensors` file.

    8 bytes        N, the header's length, unsigned little-endian
    N bytes        the header: JSON {"<tensor key>": {"dtype", "shape", "data_offsets": [b, e]},
                   ..., "__metadata__": {"format", "format_version", "config", "meta",
                   "quantization", "source"}} (metadata values are strings; config, meta,
                   quantization and source are JSON text)
    the rest       the tensors' raw little-endian bytes, C order, at [b, e) of this buffer

Tensor keys are the JSON container's message keys ("rope.cos", "weights.layers[1].wk"), so
both containers name a problem the same way. An int8 tensor's scales are the tensor
"<key>.scales", its block size __metadata__.quantization's {"<key>": {"block_size": n}};
the quantisation record is the tensor "source.logits" and __metadata__.source
{"weight_dtype": ...}. Reading turns the header into the JSON
container's document, tensors as RawTensor, and modelfile.parse_model checks it all: the two
containers share every check after this module's own (header bounds, offsets, overlaps).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelFileError, brief, cut
from .files import atomic_write
from .formatspec import (INT8, MAX_DIM, MAX_JSON_DEPTH, MAX_SAFETENSORS_HEADER_BYTES,
                         RESERVED_DTYPES, SOURCE, STORAGE_DTYPES_SPEC)

# safetensors dtype name -> the format's dtype name (storage dtypes and reserved ones)
ST_TO_DTYPE = {d["safetensors"]: name for name, d in STORAGE_DTYPES_SPEC.items()}
ST_TO_DTYPE.update({"F8_E4M3": "float8_e4m3", "F8_E5M2": "float8_e5m2"})
assert set(ST_TO_DTYPE.values()) <= set(STORAGE_DTYPES_SPEC) | set(RESERVED_DTYPES)
DTYPE_TO_ST = {name: d["safetensors"] for name, d in STORAGE_DTYPES_SPEC.items()}
_LAYER_KEY = re.compile(r"weights\.layers\[(\d+)\]\.(\w+)")


class RawTensor:
    """A tensor of the safetensors container: dtype (the format's name, or the safetensors
    name when it has none), shape, and its bytes (a view of the file). An int8 tensor also
    gets its scales (the RawTensor "<key>.scales", None if the file has none) and its block
    size from __metadata__.quantization (None if it has none), which modelfile checks."""

    def __init__(self, dtype: str, shape: list, data: memoryview):
        self.dtype, self.shape, self.data = dtype, shape, data
        self.scales: RawTensor | None = None
        self.block_size: Any = None


def is_safetensors(head: bytes) -> bool:
    """A file's first bytes: safetensors when the 8-byte header length's top byte is 0 (no
    header is 2^56 bytes long; JSON text never holds a NUL byte, so this is no JSON file)."""
    return len(head) >= 8 and head[7] == 0


def _header(buffer: memoryview, size: int) -> tuple[dict, int]:
    """The parsed header and where the data starts; the checks the C++ loader makes too."""
    (length,) = struct.unpack("<Q", buffer[:8])
    if length > MAX_SAFETENSORS_HEADER_BYTES:
        raise ModelFileError(f"safetensors header: {length} bytes is more than the limit of "
                             f"{MAX_SAFETENSORS_HEADER_BYTES}")
    if 8 + length > size:
        raise ModelFileError(f"safetensors header: {length} bytes run past the end of the file "
                             f"({size} bytes)")
    text = bytes(buffer[8:8 + length])
    from .modelfile import _too_deep_at
    too_deep = _too_deep_at(text)
    if too_deep is not None:
        raise ModelFileError(f"safetensors header: nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        header = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise ModelFileError("safetensors header: not valid JSON") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"safetensors header: expected a JSON object, found {brief(header)}")
    return header, 8 + length


def _int_list(value: Any, length: int | None) -> bool:
    return isinstance(value, list) and (length is None or len(value) == length) and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v for v in value)


def _tensors(header: dict, data: memoryview) -> dict[str, RawTensor]:
    """Every tensor entry, its offsets checked: inside the data, matching dtype x shape, and
    together covering the data exactly once (no overlaps, no holes)."""
    tensors, spans = {}, []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise ModelFileError(f"{cut(key)}: expected a tensor {{dtype, shape, data_offsets}}, "
                                 f"found {brief(entry)}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise ModelFileError(f"{cut(key)}: dtype must be a string, found {brief(dtype)}")
        if not _int_list(shape, None) or any(d > MAX_DIM for d in shape):
            raise ModelFileError(f"{cut(key)}: shape must hold integers in [0, {MAX_DIM}], "
                                 f"found {brief(shape)}")
        if not _int_list(offsets, 2) or offsets[0] > offsets[1] or offsets[1] > len(data):
            raise ModelFileError(f"{cut(key)}: data_offsets {brief(offsets)} are not [begin, end] "
                                 f"within the {len(data)} data bytes")
        name = ST_TO_DTYPE.get(dtype, dtype)
        if name in STORAGE_DTYPES_SPEC:
            needed = math.prod(shape) * STORAGE_DTYPES_SPEC[name]["itemsize"]
            if offsets[1] - offsets[0] != needed:
                raise ModelFileError(f"{cut(key)}: data_offsets {offsets} hold "
                                     f"{offsets[1] - offsets[0]} bytes, shape {shape} {dtype} "
                                     f"needs {needed}")
        tensors[key] = RawTensor(name, shape, data[offsets[0]:offsets[1]])
        spans.append((offsets[0], offsets[1], key))
    end = 0
    for begin, stop, key in sorted(spans):
        if begin < end:
            raise ModelFileError(f"{cut(key)}: data_offsets [{begin}, {stop}] overlap another "
                                 f"tensor's bytes")
        if begin > end:
            raise ModelFileError(f"safetensors data: bytes [{end}, {begin}) belong to no tensor")
        end = stop
    if end != len(data):
        raise ModelFileError(f"safetensors data: bytes [{end}, {len(data)}) belong to no tensor")
    return tensors


def _metadata_json(metadata: dict, name: str, required: bool) -> Any:
    text = metadata.get(name)
    if text is None and not required:
        return None
    if not isinstance(text, str):
        raise ModelFileError(f"__metadata__.{name}: expected JSON text, found {brief(text)}")
    try:
        return json.loads(text)
    except ValueError:
        raise ModelFileError(f"__metadata__.{name}: not valid JSON") from None


def document(buffer: memoryview) -> dict:
    """The JSON container's document for a safetensors file's bytes, tensors as RawTensor."""
    header, start = _header(buffer, len(buffer))
    tensors = _tensors(header, buffer[start:])
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict):
        raise ModelFileError(f"__metadata__: expected an object, found {brief(metadata)}")
    doc: dict[str, Any] = {"format": metadata.get("format")}
    version = metadata.get("format_version")
    if version is not None:
        if not (isinstance(version, str) and version.isdigit()):
            raise ModelFileError(f"format_version: must be a positive integer, found {brief(version)}")
        doc["format_version"] = int(version)
    doc["config"] = _metadata_json(metadata, "config", required=True)
    doc["meta"] = _metadata_json(metadata, "meta", required=False) or {}
    _attach_quantization(tensors, metadata)
    source = _metadata_json(metadata, SOURCE["key"], required=False)
    if source is not None:
        if not isinstance(source, dict):
            raise ModelFileError(f"__metadata__.{SOURCE['key']}: expected an object, found "
                                 f"{brief(source)}")
        doc[SOURCE["key"]] = dict(source)
    layers: dict[int, dict] = {}
    for key, tensor in tensors.items():
        match = _LAYER_KEY.fullmatch(key)
        if match:
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
        elif key.count(".") == 1:
            section, name = key.split(".")
            if section in ("inputs", "rope", "weights", SOURCE["key"]):
                doc.setdefault(section, {})[name] = tensor
    if layers:
        count = max(layers) + 1
        if count > MAX_DIM:
            raise ModelFileError(f"weights.layers[{count - 1}]: layer index beyond {MAX_DIM}")
        doc.setdefault("weights", {})["layers"] = [layers.get(i) for i in range(count)]
    elif "weights" in doc:
        doc["weights"]["layers"] = []
    return doc


def _attach_quantization(tensors: dict[str, RawTensor], metadata: dict) -> None:
    """Give every int8 tensor its "<key>.scales" tensor and its block size from
    __metadata__.quantization (absent ones stay None: modelfile names what is missing).
    A scales tensor belongs to its tensor, whatever that tensor's dtype: it is no stray data."""
    name = INT8["safetensors_metadata"]
    blocks = _metadata_json(metadata, name, required=False)
    if blocks is None:
        blocks = {}
    if not isinstance(blocks, dict):
        raise ModelFileError(f"__metadata__.{name}: expected an object, found {brief(blocks)}")
    suffix = INT8["safetensors_scales_suffix"]
    for key, tensor in tensors.items():
        if tensor.dtype != "int8":
            continue
        tensor.scales = tensors.get(key + suffix)
        entry = blocks.get(key)
        if entry is not None:
            if not isinstance(entry, dict):
                raise ModelFileError(f"__metadata__.{name}: {cut(key)}: expected an object "
                                     f"{{\"{INT8['block_size_key']}\": n}}, found {brief(entry)}")
            tensor.block_size = entry.get(INT8["block_size_key"])


def write_safetensors(named: list[tuple[str, np.ndarray]], metadata: dict[str, str],
                      path: str | os.PathLike) -> None:
    """Write tensors (key, array) atomically. The header is padded with spaces to a multiple of
    8 bytes and the tensors are laid out widest dtype first (the uint8 mask last), so every
    float32 tensor starts 4-byte aligned and a reader can use it in place; tensors cover the
    data without gaps, as safetensors readers demand."""
    tensors = []
    for key, array in named:
        dtype_name = next((k for k, d in STORAGE_DTYPES_SPEC.items()
                           if np.dtype(d["numpy"]) == array.dtype), None)
        if dtype_name is None:
            raise TypeError(f"{key}: cannot store dtype {array.dtype}")
        tensors.append((key, dtype_name, np.ascontiguousarray(array)))
    tensors.sort(key=lambda t: -t[2].itemsize)  # stable: file order within a width
    entries, offset = {}, 0
    for key, dtype_name, array in tensors:
        entries[key] = {"dtype": DTYPE_TO_ST[dtype_name], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def write(fp):
        fp.write(struct.pack("<Q", len(text)))
        fp.write(text)
        for _, _, array in tensors:
            fp.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    atomic_write(path, write, binary=True)


def read_buffer(path: Path) -> memoryview:
    """The file's bytes, memory-mapped (read-only)."""
    import mmap
    with open(path, "rb") as fp:
        size = os.fstat(fp.fileno()).st_size
        if size == 0:
            return memoryview(b"")
        return memoryview(mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ))
