"""Reduced-precision storage of the weights: float16, bfloat16 and int8 (docs/model-format.md,
"Storage dtypes").

The stored weights define the model. A ModelFile keeps every weight as a float32 array, the
exact upcast or dequantisation of what the file stores, so every consumer (the reference,
the metrics, the writers of float32 files) works unchanged; ModelFile.storage keeps the
stored form (a StoredTensor) of each weight that is not float32, which the writers write.

    float16   IEEE half, numpy "<f2"; float32 -> float16 rounds to nearest even
    bfloat16  the top 16 bits of a float32, kept as numpy "<u2"; rounds to nearest even
    int8      symmetric blocks along the last (input) dimension, llama.cpp's Q8_0:
              value[r, c] = float32(q[r, c] * scales[r, c // block_size]),
              scales float32 (R, ceil(C / block_size)), block_size 32 by default, C for one
              scale per output row

Only numpy: reading a file never needs torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import ConfigError
from .formatspec import INT8, MATRIX_ONLY_DTYPES, WEIGHT_DTYPES, WEIGHT_MATRICES

if TYPE_CHECKING:
    from .modelfile import ModelFile

DEFAULT_BLOCK_SIZE: int = INT8["default_block_size"]  # 32, llama.cpp's Q8_0
Q8_MAX = 127  # symmetric: q in [-127, 127]; -128 is never written (a reader accepts it)


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as a file stores it. data: the raw values in the tensor's shape (float16 "<f2";
    bfloat16 bits "<u2"; int8 "i1"); int8 only: scales float32 (R, ceil(C / block_size)) and
    block_size."""

    dtype: str
    data: np.ndarray
    scales: np.ndarray | None = None
    block_size: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def nbytes(self) -> int:
        """Bytes as stored: the values and, for int8, the scales."""
        return self.data.nbytes + (self.scales.nbytes if self.scales is not None else 0)

    def to_float32(self) -> np.ndarray:
        """The float32 values the stored tensor means (exact: every float16 and bfloat16 is a
        float32, and an int8 value is q * scale rounded once to float32)."""
        if self.dtype == "float16":
            return self.data.astype(np.float32)
        if self.dtype == "bfloat16":
            return bfloat16_to_float32(self.data)
        if self.dtype == "int8":
            return dequantize_q8(self.data, self.scales, self.block_size)
        raise ValueError(f"not a reduced storage dtype: {self.dtype}")


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32: the bits become the float32's upper half."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def dequantize_q8(q: np.ndarray, scales: np.ndarray, block_size: int) -> np.ndarray:
    """q (R, C) int8, scales (R, ceil(C / block_size)) float32 -> (R, C) float32 q * scale."""
    columns = q.shape[-1]
    per_column = np.repeat(scales, block_size, axis=-1)[..., :columns]  # (R, C)
    return q.astype(np.float32) * per_column


def _finite_input(array: np.ndarray, what: str) -> None:
    if not np.isfinite(array).all():
        raise ValueError(f"{what}: cannot convert non-finite values")


def to_float16(array: np.ndarray, key: str = "tensor") -> StoredTensor:
    """float32 -> float16, round to nearest even (numpy's conversion); a value beyond float16's
    range (|x| > 65504) is refused rather than stored as infinity."""
    _finite_input(array, key)
    with np.errstate(over="ignore"):  # an overflow is reported below, by key and value
        half = np.asarray(array, np.float32).astype("<f2")
    if not np.isfinite(half).all():
        big = np.flatnonzero(~np.isfinite(half))[0]
        raise ConfigError(f"{key}: value {array.reshape(-1)[big]:g} does not fit in float16 "
                          f"(largest 65504)")
    return StoredTensor("float16", half)


def to_bfloat16(array: np.ndarray, key: str = "tensor") -> StoredTensor:
    """float32 -> bfloat16 bits, round to nearest even on the 16 dropped bits: add 0x7FFF plus
    the lowest kept bit, then shift (ties go to the even upper half)."""
    _finite_input(array, key)
    bits = np.ascontiguousarray(array, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    overflow = (rounded & 0x7F80) == 0x7F80  # exponent all ones: rounded up to infinity
    if overflow.any():
        big = np.flatnonzero(overflow)[0]
        raise ConfigError(f"{key}: value {array.reshape(-1)[big]:g} does not fit in bfloat16")
    return StoredTensor("bfloat16", rounded.astype("<u2"))


def quantize_q8(array: np.ndarray, block_size: int | None = DEFAULT_BLOCK_SIZE,
                key: str = "tensor") -> StoredTensor:
    """(R, C) float32 -> int8 with one float32 scale per block of `block_size` consecutive
    values of a row (None: one block per row, a per-output-channel scale). The last block of a
    row may be partial. scale = absmax / 127 (0 for an all-zero block); q = x / scale rounded
    half to even, within [-127, 127]; so |x - q * scale| <= scale / 2 wherever the scale is a
    normal float32 (absmax >= 127 * 2^-126, about 1.5e-36; a block below that keeps an error
    below 1.5e-36)."""
    array = np.asarray(array, np.float32)
    if array.ndim != 2:
        raise ValueError(f"{key}: int8 quantises 2-D matrices, found shape {list(array.shape)}")
    _finite_input(array, key)
    rows, columns = array.shape
    block = columns if block_size is None else block_size
    if not 1 <= block <= max(columns, 1):
        raise ConfigError(f"{key}: block size {block} must be in [1, {columns}] (the row length)")
    blocks = math.ceil(columns / block)
    padded = np.zeros((rows, blocks * block), np.float32)
    padded[:, :columns] = array
    grouped = padded.reshape(rows, blocks, block)
    scales = (np.abs(grouped).max(axis=-1) / np.float32(Q8_MAX)).astype(np.float32)  # (R, nb)
    safe = np.where(scales > 0, scales, np.float32(1)).astype(np.float64)[..., None]
    q = np.clip(np.rint(grouped.astype(np.float64) / safe), -Q8_MAX, Q8_MAX)
    q = q.reshape(rows, blocks * block)[:, :columns].astype("i1")
    return StoredTensor("int8", q, scales, block)


def storage_form(array: np.ndarray, weight_dtype: str, block_size: int | None,
                 key: str) -> StoredTensor | None:
    """The stored form of one weight in `weight_dtype` (None: it stays float32). int8 applies
    to the 2-D weight matrices; the norm vectors of an int8 model stay float32."""
    if weight_dtype == "float32" or (weight_dtype in MATRIX_ONLY_DTYPES and array.ndim != 2):
        return None
    if weight_dtype == "float16":
        return to_float16(array, key)
    if weight_dtype == "bfloat16":
        return to_bfloat16(array, key)
    if weight_dtype == "int8":
        return quantize_q8(array, block_size, key)
    raise ConfigError(f"weight dtype {weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")


def weight_dtype_of(mf: "ModelFile") -> str:
    """The model's storage dtype in one word: the dtype of its weight matrices ("float32",
    "float16", "bfloat16", "int8"), or "mixed"."""
    from .modelfile import named_tensors
    found = {mf.storage[key].dtype if key in mf.storage else "float32"
             for key, array in named_tensors(mf)
             if key.startswith("weights.") and key.rsplit(".", 1)[-1] in WEIGHT_MATRICES}
    return found.pop() if len(found) == 1 else "mixed"


def quantization_meta(weight_dtype: str, block_size: int | None, source_dtype: str) -> dict:
    """meta.quantization, informational: {"weight_dtype", "scheme", "block_size", "from"}."""
    meta: dict = {"weight_dtype": weight_dtype}
    if weight_dtype == "int8":
        meta["scheme"] = ("q8_0" if block_size == DEFAULT_BLOCK_SIZE else
                          "q8_row" if block_size is None else f"q8_block{block_size}")
        meta["block_size"] = "row" if block_size is None else block_size
    meta["from"] = source_dtype
    return meta


def store_weights(mf: "ModelFile", weight_dtype: str,
                  block_size: int | None = DEFAULT_BLOCK_SIZE) -> "ModelFile":
    """A copy of `mf` whose weights are stored in `weight_dtype` (block_size: int8 only; None
    for one scale per row). Its float32 weights become the stored values' exact float32
    meaning, so the copy is the model its file defines. "float32" gives a plain file with the
    same float32 values (a reduced file converted back keeps its stored values exactly).
    The tied head is stored once and shared with the embedding."""
    from .modelfile import LayerWeights, Weights

    if weight_dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"weight dtype {weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    if weight_dtype == "int8" and block_size is not None:
        shortest = min(mf.config.hidden_size, mf.config.intermediate_size,
                       mf.config.num_attention_heads * mf.config.head_dim)  # the rows' lengths
        if not 1 <= block_size <= shortest:
            raise ConfigError(f"int8 block size {block_size} must be in [1, {shortest}] (the "
                              f"shortest weight row has {shortest} values; 'row' gives one scale "
                              f"per row)")
    storage: dict[str, StoredTensor] = {}
    done: dict[int, tuple[StoredTensor | None, np.ndarray]] = {}  # id(array) -> result (tied head)

    def convert(key: str, array: np.ndarray) -> np.ndarray:
        if id(array) not in done:
            stored = storage_form(array, weight_dtype, block_size, key)
            done[id(array)] = (stored, stored.to_float32() if stored is not None else array)
        stored, values = done[id(array)]
        if stored is not None:
            storage[key] = stored
        return values

    w = mf.weights
    layers = [LayerWeights(**{f.name: convert(f"weights.layers[{i}].{f.name}", getattr(layer, f.name))
                              for f in dataclasses.fields(LayerWeights)})
              for i, layer in enumerate(w.layers)]
    weights = Weights(tok_embedding=convert("weights.tok_embedding", w.tok_embedding),
                      final_rms=convert("weights.final_rms", w.final_rms),
                      lm_head=convert("weights.lm_head", w.lm_head), layers=layers)
    return dataclasses.replace(mf, weights=weights, storage=storage)
