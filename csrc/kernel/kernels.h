// The kernels a Transformer can run: each is a table of ops (KernelOps), chosen by name when
// the Transformer is built. transformer_forward (transformer.cpp) is written once against this
// table, so the architecture lives in one readable function whatever the kernel.
//
//   "clear": ops.cpp, one naive, double-accumulated function per op; the reference to read.
//   "fast":  fast/, packed AVX2/FMA matrix multiply (portable fallback), streaming-softmax
//            attention, the residual add fused into the next RMSNorm, SwiGLU fused into the
//            gate/up projection. Same results to float32 rounding (docs/performance.md).
//
// A new kernel (a CUDA one, a half-precision one) is one more table and one line in
// find_kernel(). Dimensions as in transformer.h.
//
// Weight matrices come as WeightMatrix views (dtype.h: float32, float16, bfloat16, int8 with
// block scales); every op computes in float32 and converts the weights as it reads them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dtype.h"

namespace xvalid {

struct KernelOps {
    const char* name;
    const char* description;

    // out (rows, H) = E[ids] with E (V, H) = table, each row converted to float32; ids are
    // already checked to be in [0, V).
    void (*embedding)(float* out, const int64_t* ids, const WeightMatrix& table, int rows);

    // The residual add fused with the RMSNorm that follows it:
    //   x (rows, n) += delta (skipped when delta is nullptr), then
    //   out (rows, n) = x * (1 / sqrt(mean(x^2) + eps)) * weight.
    void (*residual_rmsnorm)(float* x, const float* delta, const float* weight, float* out,
                             int rows, int n, float eps);

    // out (rows, d) = x (rows, n) W^T with W (d, n) = (w.rows, w.cols), like nn.Linear
    // without bias.
    void (*matmul)(float* out, const float* x, const WeightMatrix& w, int rows);

    // The feed-forward's first half, SwiGLU fused in:
    //   out (rows, d) = silu(x W_gate^T) * (x W_up^T), silu(z) = z * sigmoid(z),
    // W_gate and W_up (d, n), of the same shape (their dtypes may differ).
    // When gate and up are not nullptr (capture), the two products are stored there too,
    // each exactly as matmul computes it, and out is the same as without them.
    void (*matmul_swiglu)(float* out, const float* x, const WeightMatrix& w_gate,
                          const WeightMatrix& w_up, int rows, float* gate, float* up);

    // RoPE on q (B, T, NH, hd) and k (B, T, KVH, hd) in place (rotate-half, token t at
    // absolute position p0 + t, rows of the (max_pos, hd) tables), then k and v (B, T, KVH, hd)
    // appended to the caches (B, KVH, capacity, hd) at positions p0 .. p0+T-1.
    void (*rope_append_kv)(float* q, float* k, const float* v, float* key_cache, float* value_cache,
                           int B, int T, int NH, int KVH, int hd, int p0, int capacity,
                           const float* cos_table, const float* sin_table);

    // Causal attention of T new queries per sequence over the p0 cached keys plus the T new:
    //   out         (B, T, NH, hd)          per-head outputs, head-major like concat_heads
    //   q           (B, T, NH, hd)          queries, after RoPE
    //   key_cache   (B, KVH, capacity, hd)  keys of positions 0 .. p0+T-1, after RoPE
    //   value_cache (B, KVH, capacity, hd)
    //   mask        (B, p0+T)               1 = attend, 0 = padding key; nullptr = all ones
    // Query head h reads key/value head h / (NH/KVH) (grouped-query attention).
    void (*attention)(float* out, const float* q, const float* key_cache, const float* value_cache,
                      const int64_t* mask, int B, int T, int p0, int NH, int KVH, int hd,
                      int capacity);
};

extern const KernelOps clear_kernel;  // ops.cpp
extern const KernelOps fast_kernel;   // fast/fast_ops.cpp

// The kernel called `name`; InputError (naming the choices) for any other name.
const KernelOps& find_kernel(const std::string& name);
std::vector<std::string> kernel_names();  // "fast" first: the default
const char* default_kernel_name();

// Which instruction set the fast kernel's matrix multiply chose at run time
// ("avx2+fma" or "portable"; XVALID_ISA=portable forces the fallback).
const char* fast_kernel_isa();

}  // namespace xvalid
