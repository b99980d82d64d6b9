"""The seed's JSON model-file layout (docs/model-format.md), stdlib + numpy only.

A tensor is stored as
    {"name", "shape", "dtype": float32|int32|uint8, "encoding": "base64",
     "data": <base64 of raw C-order little-endian bytes>, "preview": [first 16 values]}
and may sit anywhere in the JSON tree (weights.layers is a list of dicts of tensors).
Weights may also be stored (format version 2) as float16, bfloat16 (the upper 16 bits of a
float32) or int8 with "block_size" and a float32 "scales" tensor (R, ceil(C / block_size)):
value[r, c] = q[r, c] * scales[r, c // block_size], in float32. Reading gives their float32
values; writing covers the three plain dtypes only.

Shared by numpy_engine.py (reads) and write_seed_model.py (writes); neither imports xvalid.
"""

import base64
import json

import numpy as np

# dtype name in the file -> explicit little-endian numpy dtype
DTYPES = {"float32": np.dtype("<f4"), "int32": np.dtype("<i4"), "uint8": np.dtype("u1")}


def encode_tensor(name, array):
    """numpy array -> tensor dict. The array's dtype must be one of DTYPES."""
    array = np.asarray(array)
    dtype_name = next((k for k, dt in DTYPES.items() if array.dtype == dt), None)
    if dtype_name is None:
        raise TypeError(f"{name}: dtype {array.dtype} is not one of {sorted(DTYPES)}")
    raw = np.ascontiguousarray(array, dtype=DTYPES[dtype_name]).tobytes()
    return {
        "name": name,
        "shape": list(array.shape),
        "dtype": dtype_name,
        "encoding": "base64",
        "data": base64.b64encode(raw).decode("ascii"),
        "preview": array.reshape(-1)[:16].tolist(),
    }


# reduced-precision weights: dtype name -> how its raw bytes are read
STORED = {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "int8": np.dtype("i1")}


def to_float32(stored, t):
    """The float32 values of a float16 / bfloat16 / int8 tensor read as STORED[dtype]."""
    kind = t["dtype"]
    if kind == "float16":
        return stored.astype(np.float32)
    if kind == "bfloat16":  # the bits are a float32's upper half
        widened = stored.astype(np.uint32) * np.uint32(65536)
        return np.frombuffer(widened.tobytes(), dtype="<f4").reshape(stored.shape)
    scales = decode_tensor(t["scales"])          # (R, blocks) float32
    block = int(t["block_size"])
    column_block = np.arange(stored.shape[1]) // block      # the scale index of each column
    if scales.shape != (stored.shape[0], -(-stored.shape[1] // block)):
        raise ValueError(f"tensor {t.get('name', '?')}: scales shape {list(scales.shape)} does "
                         f"not fit {list(stored.shape)} in blocks of {block}")
    return (stored.astype(np.float32) * scales[:, column_block]).astype(np.float32)


def decode_tensor(t):
    """tensor dict -> read-only numpy array of its shape and dtype (float32 for a weight stored
    as float16, bfloat16 or int8)."""
    name = t.get("name", "?")
    if t.get("encoding") != "base64":
        raise ValueError(f"tensor {name}: encoding {t.get('encoding')!r}, expected 'base64'")
    if t.get("dtype") not in DTYPES and t.get("dtype") not in STORED:
        raise ValueError(f"tensor {name}: dtype {t.get('dtype')!r}, expected one of "
                         f"{sorted(DTYPES) + sorted(STORED)}")
    raw = base64.b64decode(t["data"])
    dtype, shape = {**DTYPES, **STORED}[t["dtype"]], tuple(t["shape"])
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) != count * dtype.itemsize:
        raise ValueError(f"tensor {name}: {len(raw)} bytes of data, shape {list(shape)} "
                         f"of {t['dtype']} needs {count * dtype.itemsize}")
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return to_float32(array, t) if t["dtype"] in STORED else array


def _decode_tree(node):
    if isinstance(node, dict):
        if "encoding" in node and "data" in node:
            return decode_tensor(node)
        return {k: _decode_tree(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_decode_tree(v) for v in node]
    return node


def read_model(path):
    """Load a seed-layout model file; every tensor dict becomes a numpy array, the rest
    (meta, config, any extra keys) is returned as plain JSON values."""
    with open(path, "r", encoding="utf-8") as f:
        return _decode_tree(json.load(f))
