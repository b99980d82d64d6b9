"""Model files whose weights are stored as float16, bfloat16 or int8 (Q8 blocks), for the
bench's --weight-dtype axis and the C++ dtype tests: the one place that converts a float32
ModelFile's weights and writes them in the layout docs/model-format.md gives.

The stored weights define the model: convert() returns the ModelFile whose float32 weights
are the exact upcast / dequantised values (what the reference computes with), and the stored
form of each converted weight (StoredTensor) that write_stored() writes. int8 applies to
the 2-D weight matrices; the norm vectors of an int8 model stay float32.

    float16   IEEE half, round to nearest even (numpy's conversion)
    bfloat16  the top 16 bits of the float32, round to nearest even (raw bits, "<u2")
    int8      value[r, c] = q[r, c] * scales[r, c // block_size]; scale = absmax / 127 of
              each block of a row, q = round-half-even(x / scale) in [-127, 127]

(This stands in for the format's own dtype module, xvalid.dtypes store_weights() and the
writers' support for ModelFile.storage, until that lands; then convert() and write_stored()
become those calls.)
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
from dataclasses import dataclass, fields

import numpy as np

from ..files import atomic_write
from ..formatspec import FORMAT_NAME, FORMAT_VERSION, INT8, WEIGHT_DTYPES, WRITTEN_VERSION_PLAIN
from ..modelfile import STORAGE_DTYPES, LayerWeights, ModelFile, Weights, _document, named_tensors

DEFAULT_BLOCK_SIZE: int = INT8["default_block_size"]
Q8_MAX = 127


@dataclass(frozen=True)
class StoredTensor:
    """A weight as the file stores it: data (float16 "<f2", bfloat16 bits "<u2", int8 "i1");
    int8 also scales float32 (R, ceil(C / block_size)) and block_size."""

    dtype: str
    data: np.ndarray
    scales: np.ndarray | None = None
    block_size: int | None = None

    def to_float32(self) -> np.ndarray:
        if self.dtype == "float16":
            return self.data.astype(np.float32)
        if self.dtype == "bfloat16":
            return (self.data.astype(np.uint32) << 16).view(np.float32)
        per_column = np.repeat(self.scales, self.block_size, axis=-1)[:, :self.data.shape[1]]
        return self.data.astype(np.float32) * per_column


def to_float16(array: np.ndarray) -> StoredTensor:
    return StoredTensor("float16", np.asarray(array, np.float32).astype("<f2"))


def to_bfloat16(array: np.ndarray) -> StoredTensor:
    """Round to nearest even on the 16 dropped bits: add 0x7FFF plus the lowest kept bit."""
    bits = np.ascontiguousarray(array, np.float32).view(np.uint32).astype(np.uint64)
    return StoredTensor("bfloat16", ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2"))


def quantize_q8(array: np.ndarray, block_size: int = DEFAULT_BLOCK_SIZE) -> StoredTensor:
    """(R, C) float32 -> int8 and one float32 scale per block of block_size values of a row
    (the last block may be partial)."""
    array = np.asarray(array, np.float32)
    rows, columns = array.shape
    blocks = math.ceil(columns / block_size)
    padded = np.zeros((rows, blocks * block_size), np.float32)
    padded[:, :columns] = array
    grouped = padded.reshape(rows, blocks, block_size)
    scales = (np.abs(grouped).max(axis=-1) / np.float32(Q8_MAX)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1)).astype(np.float64)[..., None]
    q = np.clip(np.rint(grouped.astype(np.float64) / safe), -Q8_MAX, Q8_MAX).reshape(rows, -1)[:, :columns]
    return StoredTensor("int8", q.astype("i1"), scales, block_size)


def convert_one(array: np.ndarray, weight_dtype: str, block_size: int) -> StoredTensor | None:
    """The stored form of one weight (None: it stays float32)."""
    if weight_dtype == "float32" or (weight_dtype == "int8" and array.ndim != 2):
        return None
    if weight_dtype == "float16":
        return to_float16(array)
    if weight_dtype == "bfloat16":
        return to_bfloat16(array)
    return quantize_q8(array, min(block_size, array.shape[1]))


def convert(mf: ModelFile, weight_dtype: str, block_size: int = DEFAULT_BLOCK_SIZE
            ) -> tuple[ModelFile, dict[str, StoredTensor]]:
    """(the model with its weights as stored, i.e. their exact float32 values; the stored
    form by key, "weights.layers[0].wq"). A tied head stays the embedding."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight dtype {weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    stored: dict[str, StoredTensor] = {}

    def value(key: str, array: np.ndarray) -> np.ndarray:
        form = convert_one(array, weight_dtype, block_size)
        if form is None:
            return array
        stored[key] = form
        return form.to_float32()

    w = mf.weights
    embedding = value("weights.tok_embedding", w.tok_embedding)
    layers = [LayerWeights(**{f.name: value(f"weights.layers[{i}].{f.name}", getattr(layer, f.name))
                              for f in fields(LayerWeights)}) for i, layer in enumerate(w.layers)]
    tied = w.lm_head is w.tok_embedding or np.array_equal(w.lm_head, w.tok_embedding)
    head = embedding if tied else value("weights.lm_head", w.lm_head)
    weights = Weights(embedding, value("weights.final_rms", w.final_rms), head, layers)
    if tied and "weights.tok_embedding" in stored:
        stored["weights.lm_head"] = stored["weights.tok_embedding"]
    meta = dict(mf.meta)
    if stored:
        meta["quantization"] = {"weight_dtype": weight_dtype, "from": "float32"} | (
            {"scheme": "q8_0" if block_size == 32 else "q8", "block_size": block_size}
            if weight_dtype == "int8" else {})
    return dataclasses.replace(mf, weights=weights, meta=meta), stored


# ---------------------------------------------------------------------------------------------
# writing


def _tensor_object(name: str, array: np.ndarray) -> dict:
    dtype = next(k for k, v in STORAGE_DTYPES.items() if v == array.dtype)
    array = np.ascontiguousarray(array)
    return {"name": name, "shape": list(array.shape), "dtype": dtype, "encoding": "base64",
            "data": base64.b64encode(array.tobytes()).decode()}


def write_stored(mf: ModelFile, stored: dict[str, StoredTensor], path: str | os.PathLike,
                 container: str = "json") -> None:
    """Write mf with the weights in `stored` in their stored form (JSON or safetensors)."""
    version = FORMAT_VERSION if stored else WRITTEN_VERSION_PLAIN
    if container == "safetensors":
        from ..st_container import write_safetensors
        named, quantization = [], {}
        for key, array in named_tensors(mf):
            form = stored.get(key)
            named.append((key, array if form is None else form.data))
            if form is not None and form.dtype == "int8":
                named.append((key + INT8["safetensors_scales_suffix"], form.scales))
                quantization[key] = {INT8["block_size_key"]: form.block_size}
        doc = _document(mf)
        metadata = {"format": FORMAT_NAME, "format_version": str(version),
                    "config": json.dumps(doc["config"]), "meta": json.dumps(doc["meta"])}
        if quantization:
            metadata[INT8["safetensors_metadata"]] = json.dumps(quantization)
        write_safetensors(named, metadata, path)
        return

    doc = _document(mf)
    doc["format_version"] = version

    def objects(node, key: str):  # the document's tensors as JSON tensor objects
        if isinstance(node, dict):
            return {k: objects(v, f"{key}.{k}" if key else k) for k, v in node.items()}
        if isinstance(node, list):
            return [objects(v, f"{key}[{i}]") for i, v in enumerate(node)]
        if not hasattr(node, "array"):
            return node
        form = stored.get(key)
        if form is None:
            return _tensor_object(node.name, node.array)
        obj = _tensor_object(node.name, form.data)
        if form.dtype == "int8":
            obj[INT8["block_size_key"]] = form.block_size
            obj[INT8["scales_key"]] = _tensor_object(node.name + "_scales", form.scales)
        return obj

    text = json.dumps(objects(doc, ""), allow_nan=False)
    atomic_write(path, lambda fp: fp.write(text.encode() + b"\n"), binary=True)
