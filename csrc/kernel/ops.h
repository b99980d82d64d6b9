// The decoder's building blocks, llm.c style: each <op>_forward works on whole
// (rows, width) row-major float arrays and allocates nothing.
//
// Dimensions: rows = B*T token rows, H = hidden, NH/KVH = query/key-value heads,
// hd = head_dim, I = intermediate size.
//
// Sums of products are accumulated in double and rounded once: the results are
// compared with PyTorch's fp32 at about 1e-6 relative, so this kernel should add
// as little rounding error of its own as possible.
#pragma once

#include <cstdint>

#include "errors.h"

namespace xvalid {

// Threads used by the parallel ops (OpenMP); always 1 in a build without OpenMP.
void set_num_threads(int n);  // InputError unless n >= 1; a build without OpenMP ignores it
int get_num_threads();
bool openmp_enabled();

// out (rows, H) = E[ids], the plain lookup; ids are already checked to be in [0, V).
void embedding_forward(float* out, const int64_t* ids, const float* embedding, int rows, int H);

// out (rows, n) = x * (1 / sqrt(mean(x^2) + eps)) * weight, per row; out may alias x.
void rmsnorm_forward(float* out, const float* x, const float* weight, int rows, int n, float eps);

// out (rows, d) = x (rows, n) W^T with W (d, n), like nn.Linear without bias.
void matmul_forward(float* out, const float* x, const float* w, int rows, int n, int d);

// x (B, T, n_heads, hd) rotated in place, rotate-half layout; token t of every
// sequence sits at absolute position p0 + t and uses row p0 + t of the (max_pos, hd) tables.
void rope_forward(float* x, int B, int T, int n_heads, int hd, int p0,
                  const float* cos_table, const float* sin_table);

// Causal attention of T new queries per sequence over the p0 cached keys plus the T new ones.
//   out         (B, T, NH, hd)          per-head outputs, head-major like concat_heads
//   q           (B, T, NH, hd)          queries, after RoPE
//   key_cache   (B, capacity, KVH, hd)  keys of positions 0 .. p0+T-1 (this layer), after RoPE
//   value_cache (B, capacity, KVH, hd)
//   mask        (B, p0+T)               1 = attend, 0 = padding key; nullptr = all ones
//   scores      (B*NH, capacity)        scratch
// Query head h reads key/value head h / (NH/KVH) (grouped-query attention).
void attention_forward(float* out, const float* q, const float* key_cache, const float* value_cache,
                       const int64_t* mask, float* scores, int B, int T, int p0, int NH, int KVH,
                       int hd, int capacity);

// out (n) = silu(gate) * up with silu(z) = z * sigmoid(z); out may alias gate or up.
void swiglu_forward(float* out, const float* gate, const float* up, int64_t n);

// x (n) += delta, the residual connection.
void residual_forward(float* x, const float* delta, int64_t n);

}  // namespace xvalid
