"""Model configuration: the hyperparameters of one MiniMind2 / Llama decoder.

Field names are the model file's `config` keys (HF names), so a config round-trips through
JSON unchanged. Derived sizes (head_dim, n_rep) are computed in __post_init__.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import ConfigError, brief
from .formatspec import FLOAT_CONFIG, MAX_DIM  # noqa: F401  (MAX_DIM: the limit, imported from here)

# The limits come from the format description (schemas/model-format.json), which the C++
# loader reads too; docs/model-format.md lists them.

# MAX_DIM, upper bound on any single dimension: far above real models, low enough that a typo
# such as --hidden 1000000000 is refused before anything is allocated.


@dataclass(frozen=True)
class FloatRange:
    """The values a float hyperparameter may take; `text` is how messages write the interval."""

    low: float
    high: float
    low_included: bool
    high_included: bool
    text: str

    def __contains__(self, x: float) -> bool:  # False for NaN
        return ((x >= self.low) if self.low_included else (x > self.low)) and \
            ((x <= self.high) if self.high_included else (x < self.high))


# rms_norm_eps is added to mean(x^2) in float32: below 1e-30 it is on its way to rounding to 0
# (then an all-zero row divides 0 by 0); 1 or more swamps the normalisation. rope_theta is
# RoPE's base: <= 1 makes the frequencies grow with the dimension; real models use 1e4..1e9.
FLOAT_RANGES = {name: FloatRange(r["low"], r["high"], r["low_included"], r["high_included"], r["text"])
                for name, r in FLOAT_CONFIG.items()}


def minimind_intermediate(hidden_size: int) -> int:
    """MiniMind's FFN size rule: 8/3 * H rounded up to a multiple of 64 (512 -> 1408)."""
    return 64 * ((int(hidden_size * 8 / 3) + 63) // 64)


@dataclass
class ModelConfig:
    hidden_size: int = 64  # H, the residual stream width
    num_hidden_layers: int = 2  # L
    num_attention_heads: int = 8  # NH query heads
    num_key_value_heads: int = 2  # KVH key/value heads (GQA: NH % KVH == 0)
    vocab_size: int = 128  # V, rows of the (tied) embedding
    intermediate_size: int = 0  # I, SwiGLU width; 0 means the MiniMind rule
    max_position_embeddings: int = 128  # rows of the RoPE tables
    rms_norm_eps: float = FLOAT_CONFIG["rms_norm_eps"]["default"]
    rope_theta: float = FLOAT_CONFIG["rope_theta"]["default"]
    head_dim: int = field(init=False)  # hd = H / NH
    n_rep: int = field(init=False)  # query heads per kv head

    def __post_init__(self) -> None:
        if not self.intermediate_size:
            self.intermediate_size = minimind_intermediate(self.hidden_size)
        self.validate()
        self.head_dim = self.hidden_size // self.num_attention_heads
        self.n_rep = self.num_attention_heads // self.num_key_value_heads

    def validate(self) -> None:
        """Refuse impossible configs with a one-line reason."""
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "vocab_size", "intermediate_size",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"config.{name} must be an integer, got {value!r}")
            if value <= 0:
                raise ConfigError(f"config.{name} must be positive, got {value}")
            if value > MAX_DIM:
                raise ConfigError(f"config.{name} = {value} is absurdly large (limit {MAX_DIM})")
        H, NH, KVH = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        if H % NH:
            raise ConfigError(f"num_attention_heads {NH} does not divide hidden_size {H}")
        if NH % KVH:
            raise ConfigError(f"num_key_value_heads {KVH} does not divide num_attention_heads {NH}")
        if (H // NH) % 2:
            raise ConfigError(f"head_dim {H // NH} (hidden {H} / heads {NH}) must be even for RoPE")
        for name, allowed in FLOAT_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"config.{name}: must be a number, found {brief(value)}")
            if value not in allowed:
                raise ConfigError(f"config.{name}: must be a number in {allowed.text}, "
                                  f"found {brief(value)}")

    @property
    def num_parameters(self) -> int:
        """Weights counted once (the lm_head is tied to the embedding)."""
        H, I, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q_out, kv_out = self.num_attention_heads * hd, self.num_key_value_heads * hd
        per_layer = 2 * H + H * q_out + 2 * H * kv_out + q_out * H + 3 * H * I
        return self.vocab_size * H + H + self.num_hidden_layers * per_layer

    def to_json(self) -> dict:
        """The model file's `config` object (derived fields included for other readers)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "ModelConfig":
        init_names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in obj.items() if k in init_names})


# Named configs: test sizes next to the released MiniMind2 models.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    "small": ModelConfig(hidden_size=256, num_hidden_layers=4, vocab_size=1024,
                         max_position_embeddings=512),
    "minimind2-small": ModelConfig(hidden_size=512, num_hidden_layers=8, vocab_size=6400,
                                   max_position_embeddings=32768),
    "minimind2": ModelConfig(hidden_size=768, num_hidden_layers=16, vocab_size=6400,
                             max_position_embeddings=32768),
}
