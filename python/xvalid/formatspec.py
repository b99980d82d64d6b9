"""The model file's format as data: schemas/model-format.json, the one description that both
loaders take their dtypes, limits, required keys and format version from (CMake turns the
same file into the C++ loader's header io/format_spec.h)."""

from __future__ import annotations

import json
from pathlib import Path

SPEC_PATH = Path(__file__).parent / "schemas" / "model-format.json"
SPEC: dict = json.loads(SPEC_PATH.read_text())

FORMAT_NAME: str = SPEC["format"]
FORMAT_VERSION: int = SPEC["format_version"]
MAX_DIM: int = SPEC["max_dim"]
MAX_JSON_DEPTH: int = SPEC["max_json_depth"]
MAX_SAFETENSORS_HEADER_BYTES: int = SPEC["max_safetensors_header_bytes"]
# name -> {"itemsize", "numpy", "safetensors"}
STORAGE_DTYPES_SPEC: dict[str, dict] = SPEC["storage_dtypes"]
RESERVED_DTYPES: tuple[str, ...] = tuple(SPEC["reserved_dtypes"])
REQUIRED_SECTIONS: tuple[str, ...] = tuple(SPEC["required_sections"])
REQUIRED_CONFIG: tuple[str, ...] = tuple(SPEC["required_config"])
# name -> {"default", "low", "high", "low_included", "high_included", "text"}
FLOAT_CONFIG: dict[str, dict] = SPEC["float_config"]
