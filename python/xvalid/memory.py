"""What a forward pass will need, estimated from the config and the input's shape before
anything is allocated: a file declaring a batch of four million rows is refused with a figure
instead of taking the machine's memory. The C++ loader computes the same numbers with the same
formula (csrc/io/forward_memory.cpp), so both print the same message."""

from __future__ import annotations

import math
import os

from .config import ModelConfig
from .errors import ConfigError, ModelFileError, cut

MIB = 1024 * 1024
LIMIT_VARIABLE = "XVALID_MEMORY_LIMIT_MB"
LIMIT_WITHOUT_SYSCONF_MIB = 16384.0  # when the machine's memory is unknown


def forward_memory_bytes(cfg: ModelConfig, B: int, T: int, P: int, intermediates: bool) -> float:
    """Bytes of working memory (beyond the weights) for B sequences of T new tokens with P
    positions in all (cached + new), in float32: the activation buffers and the logits handed
    back, the KV cache, the attention scores (B, NH, T, P) as the reference holds them, and
    with `intermediates` every captured intermediate. Float arithmetic in the C++ loader's
    order, so both give the same figure."""
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    L, NH = cfg.num_hidden_layers, cfg.num_attention_heads
    q_dim, kv_dim = NH * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    rows = float(B) * float(T)
    # per row: x, xb, proj (H); q, heads (q_dim); k, v (kv_dim); gate, up (I); logits and
    # the copy handed back (V)
    floats = rows * float(3 * H + 2 * q_dim + 2 * kv_dim + 2 * I + 2 * V)
    floats += 2.0 * L * B * P * kv_dim  # keys and values of every layer and position
    floats += float(B) * NH * T * P  # attention scores
    if intermediates:  # embedding, final_norm (H), logits (V); per layer 6 of width H, ...
        floats += rows * float(2 * H + V + L * (6 * H + 2 * q_dim + 2 * kv_dim + 2 * I))
    return 4.0 * floats


def _limit_from_environment() -> float:
    """XVALID_MEMORY_LIMIT_MB's value, 0 when unset or empty."""
    text = os.environ.get(LIMIT_VARIABLE, "")
    if not text:
        return 0.0
    digits = len(text) <= 15 and all(ch in "0123456789" for ch in text)
    mib = float(text) if digits else 0.0
    if mib < 1:
        raise ConfigError(f"{LIMIT_VARIABLE}: expected a whole number of MiB (1 or more), "
                          f"found '{cut(text)}'")
    return mib


def _half_the_machine_mib() -> float:
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return LIMIT_WITHOUT_SYSCONF_MIB
    if pages <= 0 or page_size <= 0:
        return LIMIT_WITHOUT_SYSCONF_MIB
    return float(math.floor(float(pages) * float(page_size) / 2 / MIB))


def memory_limit_mib() -> float:
    """XVALID_MEMORY_LIMIT_MB when set (a whole number >= 1, else ConfigError), else half the
    machine's physical memory."""
    return _limit_from_environment() or _half_the_machine_mib()


def forward_memory_problem(cfg: ModelConfig, B: int, T: int, P: int,
                           intermediates: bool = False) -> str | None:
    """None when such a forward fits the limit, else the reason ("needs about N MiB ... above
    the limit of M MiB (...)"); callers put the key and the shape in front."""
    needed_mib = math.ceil(forward_memory_bytes(cfg, B, T, P, intermediates) / MIB)
    limit = _limit_from_environment()
    source = f"set by {LIMIT_VARIABLE}"
    if not limit:
        limit = _half_the_machine_mib()
        source = f"half of this machine's memory; {LIMIT_VARIABLE} sets another"
    if needed_mib <= limit:
        return None
    return (f"needs about {needed_mib} MiB of working memory (activations, KV cache, attention "
            f"scores, logits{', intermediates' if intermediates else ''}), above the limit of "
            f"{limit:.0f} MiB ({source})")


def check_forward_memory(cfg: ModelConfig, B: int, S: int, intermediates: bool,
                         where: str = "") -> None:
    """ModelFileError naming {where}inputs.input_ids when a forward over the file's B x S
    tokens needs more than the limit (the C++ loader's message, word for word)."""
    problem = forward_memory_problem(cfg, B, S, S, intermediates)
    if problem:
        raise ModelFileError(f"{where}inputs.input_ids: a forward over B={B} x S={S} tokens "
                             f"{problem}")
