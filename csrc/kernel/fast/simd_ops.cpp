// The fast kernel's element-wise ops (declared in simd_ops.h; attention is in
// simd_attention.cpp, a file of its own so that an edit to one recompiles only that one).
// Plain loops written so the compiler vectorises them; CMake compiles this file once with
// -mavx2 -mfma (namespace avx2, x86-64 only) and once without (namespace portable).
//
// How these differ from the clear ops (ops.cpp):
//   - sums in float32 with several partial sums (vector lanes), not in double;
//   - residual_rmsnorm: the residual add and the norm in one pass over each row;
//   - rope_append_kv: q and k rotated and k, v written to the cache in one pass.
#include "simd_ops.h"

#include <cmath>
#include <cstring>

#include "simd_parallel.h"

namespace xvalid {
namespace fast {
namespace XVALID_SIMD_NS {

void residual_rmsnorm(float* x, const float* delta, const float* weight, float* out, int rows, int n,
                      float eps) {
    parallel_for(rows, threads_for((int64_t)rows * n), [&](int64_t r) {
        float* xr = x + (size_t)r * n;
        float sum_sq = 0.0f;
        if (delta) {
            const float* dr = delta + (size_t)r * n;
#pragma omp simd reduction(+ : sum_sq)
            for (int i = 0; i < n; i++) {
                float v = xr[i] + dr[i];
                xr[i] = v;
                sum_sq += v * v;
            }
        } else {
#pragma omp simd reduction(+ : sum_sq)
            for (int i = 0; i < n; i++) sum_sq += xr[i] * xr[i];
        }
        float inv_rms = 1.0f / std::sqrt(sum_sq / (float)n + eps);  // fp32 like the reference
        float* o = out + (size_t)r * n;
#pragma omp simd
        for (int i = 0; i < n; i++) o[i] = (xr[i] * inv_rms) * weight[i];
    });
}

// One head vector (hd) rotated in place: out[j] = x[j] c[j] - x[j+half] s[j],
// out[j+half] = x[j+half] c[j+half] + x[j] s[j+half].
static inline void rotate_half(float* v, const float* c, const float* s, int half) {
#pragma omp simd
    for (int j = 0; j < half; j++) {
        float x1 = v[j], x2 = v[j + half];
        v[j] = x1 * c[j] - x2 * s[j];
        v[j + half] = x2 * c[j + half] + x1 * s[j + half];
    }
}

void rope_append_kv(float* q, float* k, const float* v, float* key_cache, float* value_cache, int B,
                    int T, int NH, int KVH, int hd, int p0, int capacity, const float* cos_table,
                    const float* sin_table) {
    int half = hd / 2;
    parallel_for((int64_t)B * T, threads_for((int64_t)B * T * (NH + KVH) * hd), [&](int64_t row) {
        int b = (int)(row / T), t = (int)(row % T);
        const float* c = cos_table + (size_t)(p0 + t) * hd;
        const float* s = sin_table + (size_t)(p0 + t) * hd;
        for (int h = 0; h < NH; h++) rotate_half(q + ((size_t)row * NH + h) * hd, c, s, half);
        for (int g = 0; g < KVH; g++) {
            float* kg = k + ((size_t)row * KVH + g) * hd;
            rotate_half(kg, c, s, half);
            size_t slot = (((size_t)b * KVH + g) * capacity + p0 + t) * hd;
            std::memcpy(key_cache + slot, kg, sizeof(float) * hd);
            std::memcpy(value_cache + slot, v + ((size_t)row * KVH + g) * hd, sizeof(float) * hd);
        }
    });
}

}  // namespace XVALID_SIMD_NS
}  // namespace fast
}  // namespace xvalid
