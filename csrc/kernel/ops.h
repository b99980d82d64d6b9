// The clear kernel's building blocks, llm.c style: each <op>_forward works on whole
// (rows, width) row-major float arrays, naive on purpose: the reference a reader opens
// first, and the one the fast kernel (fast/) is tested against. clear_kernel (kernels.h)
// is the table of these ops; where the table asks for a fused op, the clear version
// composes the plain ones.
//
// Dimensions: rows = B*T token rows, H = hidden, NH/KVH = query/key-value heads,
// hd = head_dim, I = intermediate size.
//
// Sums of products are accumulated in double and rounded once: the results are
// compared with PyTorch's fp32 at about 1e-6 relative, so this kernel should add
// as little rounding error of its own as possible. Weights of any storage dtype are read
// through weight_at() / dequantize_row() (dtype.h): the float32 values the reference uses.
#pragma once

#include <cstdint>

#include "dtype.h"
#include "errors.h"

namespace xvalid {

// Threads used by the parallel ops (OpenMP); always 1 in a build without OpenMP.
void set_num_threads(int n);  // InputError unless n >= 1; a build without OpenMP ignores it
int get_num_threads();
bool openmp_enabled();

// out (rows, H) = E[ids], the plain lookup, each row converted to float32 (H = table.cols);
// ids are already checked to be in [0, V).
void embedding_forward(float* out, const int64_t* ids, const WeightMatrix& table, int rows);

// out (rows, n) = x * (1 / sqrt(mean(x^2) + eps)) * weight, per row; out may alias x.
void rmsnorm_forward(float* out, const float* x, const float* weight, int rows, int n, float eps);

// out (rows, d) = x (rows, n) W^T with W (d, n) = (w.rows, w.cols), like nn.Linear without bias.
void matmul_forward(float* out, const float* x, const WeightMatrix& w, int rows);

// out (rows, d) = silu(x W_gate^T) * (x W_up^T): two matmul_forward calls, then swiglu_forward.
// gate and up (rows, d) receive the two products; nullptr = internal scratch.
void matmul_swiglu_forward(float* out, const float* x, const WeightMatrix& w_gate,
                           const WeightMatrix& w_up, int rows, float* gate, float* up);

// x (B, T, n_heads, hd) rotated in place, rotate-half layout; token t of every
// sequence sits at absolute position p0 + t and uses row p0 + t of the (max_pos, hd) tables.
void rope_forward(float* x, int B, int T, int n_heads, int hd, int p0,
                  const float* cos_table, const float* sin_table);

// rope_forward on q and k, then k and v (B, T, KVH, hd) copied into the caches
// (B, KVH, capacity, hd) at positions p0 .. p0+T-1.
void rope_append_kv_forward(float* q, float* k, const float* v, float* key_cache, float* value_cache,
                            int B, int T, int NH, int KVH, int hd, int p0, int capacity,
                            const float* cos_table, const float* sin_table);

// Causal attention of T new queries per sequence over the p0 cached keys plus the T new ones.
//   out         (B, T, NH, hd)          per-head outputs, head-major like concat_heads
//   q           (B, T, NH, hd)          queries, after RoPE
//   key_cache   (B, KVH, capacity, hd)  keys of positions 0 .. p0+T-1 (this layer), after RoPE
//   value_cache (B, KVH, capacity, hd)
//   mask        (B, p0+T)               1 = attend, 0 = padding key; nullptr = all ones
// Query head h reads key/value head h / (NH/KVH) (grouped-query attention). Scores are
// computed for all keys, then softmax-ed: the textbook two-pass form.
void attention_forward(float* out, const float* q, const float* key_cache, const float* value_cache,
                       const int64_t* mask, int B, int T, int p0, int NH, int KVH, int hd,
                       int capacity);

// out (n) = silu(gate) * up with silu(z) = z * sigmoid(z); out may alias gate or up.
void swiglu_forward(float* out, const float* gate, const float* up, int64_t n);

// x (n) += delta, the residual connection.
void residual_forward(float* x, const float* delta, int64_t n);

// residual_forward (when delta is not nullptr), then rmsnorm_forward into out.
void residual_rmsnorm_forward(float* x, const float* delta, const float* weight, float* out,
                              int rows, int n, float eps);

}  // namespace xvalid
