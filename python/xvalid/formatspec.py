"""The model file's format as data: schemas/model-format.json, the one description that both
loaders take their dtypes, limits, required keys and format version from (CMake turns the
same file into the C++ loader's header io/format_spec.h)."""

from __future__ import annotations

import json
from pathlib import Path

SPEC_PATH = Path(__file__).parent / "schemas" / "model-format.json"
SPEC: dict = json.loads(SPEC_PATH.read_text())

FORMAT_NAME: str = SPEC["format"]
FORMAT_VERSION: int = SPEC["format_version"]  # the newest version this reader reads
# The version written when every tensor has a plain dtype (older readers read such files).
WRITTEN_VERSION_PLAIN: int = SPEC["written_version_plain"]
MAX_DIM: int = SPEC["max_dim"]
MAX_JSON_DEPTH: int = SPEC["max_json_depth"]
MAX_SAFETENSORS_HEADER_BYTES: int = SPEC["max_safetensors_header_bytes"]
# name -> {"itemsize", "numpy", "safetensors"}
STORAGE_DTYPES_SPEC: dict[str, dict] = SPEC["storage_dtypes"]
PLAIN_DTYPES: tuple[str, ...] = tuple(SPEC["plain_dtypes"])
RESERVED_DTYPES: tuple[str, ...] = tuple(SPEC["reserved_dtypes"])
# The dtypes a weights.* tensor may have; MATRIX_ONLY_DTYPES only on the WEIGHT_MATRICES.
WEIGHT_DTYPES: tuple[str, ...] = tuple(SPEC["weight_dtypes"])
MATRIX_ONLY_DTYPES: tuple[str, ...] = tuple(SPEC["matrix_only_dtypes"])
WEIGHT_MATRICES: tuple[str, ...] = tuple(SPEC["weight_matrices"])
# int8 block quantisation: {"scales_dtype", "scales_key", "block_size_key",
# "default_block_size", "safetensors_scales_suffix", "safetensors_metadata"}
INT8: dict = SPEC["int8"]
# the quantisation record: {"key", "logits_key", "safetensors_logits", "logits_dtype"}
SOURCE: dict = SPEC["source"]
REQUIRED_SECTIONS: tuple[str, ...] = tuple(SPEC["required_sections"])
REQUIRED_CONFIG: tuple[str, ...] = tuple(SPEC["required_config"])
# name -> {"default", "low", "high", "low_included", "high_included", "text"}
FLOAT_CONFIG: dict[str, dict] = SPEC["float_config"]
