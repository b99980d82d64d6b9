// What a forward pass will need, estimated from the config and the input's shape before
// anything is allocated: a file declaring a batch of four million rows is refused with a
// figure instead of taking the machine's memory. python/xvalid/memory.py computes the same
// numbers with the same formula (docs/cpp.md, "Memory limit").
#pragma once

#include <cstdint>
#include <string>

#include "kernel/transformer.h"

namespace xvalid {

// Bytes of working memory (beyond the weights) for B sequences of T new tokens with P
// positions in all (cached + new), in float32: the activation buffers and the logits
// handed back, the KV cache, the attention scores (B, NH, T, P) as the PyTorch reference
// holds them, and with `intermediates` every captured intermediate. Computed in double, so
// absurd sizes cannot overflow.
double forward_memory_bytes(const Config& c, int64_t B, int64_t T, int64_t P, bool intermediates);

// The limit in MiB: XVALID_MEMORY_LIMIT_MB when set (a whole number >= 1; anything else
// throws ModelFileError), else half the machine's physical memory.
double memory_limit_mib();

// "" when such a forward fits the limit, else the reason, e.g. "needs about 16385 MiB of
// working memory (...), above the limit of 11774 MiB (...)". Callers put the key and the
// shape in front.
std::string forward_memory_problem(const Config& c, int64_t B, int64_t T, int64_t P, bool intermediates);

}  // namespace xvalid
