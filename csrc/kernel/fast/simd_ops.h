// The fast kernel's ops other than the matrix multiply (that is matmul.h), written as plain
// loops the compiler vectorises: simd_ops.cpp (element-wise) and simd_attention.cpp. Each is
// compiled once per instruction set, each copy in its own namespace (XVALID_SIMD_NS: avx2,
// portable); fast_kernel.cpp picks one at run time.
#pragma once

#include <cstdint>

namespace xvalid {
namespace fast {

#define XVALID_DECLARE_SIMD_OPS(ns)                                                                \
    namespace ns {                                                                                 \
    void residual_rmsnorm(float* x, const float* delta, const float* weight, float* out, int rows, \
                          int n, float eps);                                                       \
    void rope_append_kv(float* q, float* k, const float* v, float* key_cache, float* value_cache,  \
                        int B, int T, int NH, int KVH, int hd, int p0, int capacity,               \
                        const float* cos_table, const float* sin_table);                           \
    void attention(float* out, const float* q, const float* key_cache, const float* value_cache,   \
                   const int64_t* mask, int B, int T, int p0, int NH, int KVH, int hd,            \
                   int capacity);                                                                  \
    }

XVALID_DECLARE_SIMD_OPS(avx2)
XVALID_DECLARE_SIMD_OPS(portable)

}  // namespace fast
}  // namespace xvalid
