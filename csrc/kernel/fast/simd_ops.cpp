// The fast kernel's element-wise ops and attention (declared in simd_ops.h). Plain loops
// written so the compiler vectorises them; CMake compiles this file once with -mavx2 -mfma
// (namespace avx2, x86-64 only) and once without (namespace portable).
//
// How these differ from the clear ops (ops.cpp):
//   - sums in float32 with several partial sums (vector lanes), not in double;
//   - residual_rmsnorm: the residual add and the norm in one pass over each row;
//   - rope_append_kv: q and k rotated and k, v written to the cache in one pass;
//   - attention: per (sequence, kv head, tile of queries), the query heads that share the kv
//     head read its keys and values in place (no copies), online (streaming) softmax over key
//     blocks so no (T, p0+T) score matrix exists, key blocks past the causal limit skipped.
#include "simd_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../ops.h"  // get_num_threads

#ifndef XVALID_SIMD_NS
#error "compile with -DXVALID_SIMD_NS=avx2 or -DXVALID_SIMD_NS=portable"
#endif

namespace xvalid {
namespace fast {
namespace XVALID_SIMD_NS {

// Below this many floats an op runs on one thread: waking the others costs more.
static constexpr int64_t kParallelMin = 1 << 14;

static int threads_for(int64_t work) { return work < kParallelMin ? 1 : get_num_threads(); }

void residual_rmsnorm(float* x, const float* delta, const float* weight, float* out, int rows, int n,
                      float eps) {
#pragma omp parallel for num_threads(threads_for((int64_t)rows * n))
    for (int r = 0; r < rows; r++) {
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
    }
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
#pragma omp parallel for collapse(2) num_threads(threads_for((int64_t)B * T * (NH + KVH) * hd))
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            const float* c = cos_table + (size_t)(p0 + t) * hd;
            const float* s = sin_table + (size_t)(p0 + t) * hd;
            size_t row = (size_t)b * T + t;
            for (int h = 0; h < NH; h++) rotate_half(q + (row * NH + h) * hd, c, s, half);
            for (int g = 0; g < KVH; g++) {
                float* kg = k + (row * KVH + g) * hd;
                rotate_half(kg, c, s, half);
                size_t slot = (((size_t)b * KVH + g) * capacity + p0 + t) * hd;
                std::memcpy(key_cache + slot, kg, sizeof(float) * hd);
                std::memcpy(value_cache + slot, v + (row * KVH + g) * hd, sizeof(float) * hd);
            }
        }
    }
}

void swiglu(float* out, const float* gate, const float* up, int64_t n) {
#pragma omp parallel for num_threads(threads_for(n))
    for (int64_t i = 0; i < n; i++) {
        float z = gate[i];
        out[i] = (z / (1.0f + std::exp(-z))) * up[i];
    }
}

// Attention tiles: kQueryTile queries of one query head against kKeyBlock keys at a time.
// The block's keys are transposed once into (hd, kKeyBlock) so that a query's scores are
// hd broadcast-multiply-adds over a contiguous row of kKeyBlock lanes; every query head that
// shares the kv head reuses the transposed block (n_rep times).
static constexpr int kQueryTile = 16;
static constexpr int kKeyBlock = 64;

// Per-thread scratch, grown on demand (never per call in steady state).
struct AttentionScratch {
    std::vector<float> keys_t;  // (hd, kKeyBlock) this block's keys, transposed
    std::vector<float> acc;     // (n_rep, kQueryTile, hd) unnormalised outputs
    std::vector<float> max;     // (n_rep, kQueryTile) running max score
    std::vector<float> sum;     // (n_rep, kQueryTile) running sum of exp(score - max)
    void reserve(int n_rep, int hd) {
        size_t rows = (size_t)n_rep * kQueryTile;
        if (keys_t.size() < (size_t)hd * kKeyBlock) keys_t.resize((size_t)hd * kKeyBlock);
        if (acc.size() < rows * hd) acc.resize(rows * hd);
        if (max.size() < rows) max.resize(rows), sum.resize(rows);
    }
};

// Online softmax step for one query over one key block: scores (n) already scaled and
// masked; folds exp(score - new max) times the block's values into acc (hd).
static inline void online_softmax_block(float* scores, int n, const float* values, int hd, float* acc,
                                        float& running_max, float& running_sum) {
    float block_max = -INFINITY;
    for (int j = 0; j < n; j++) block_max = std::max(block_max, scores[j]);
    float new_max = std::max(running_max, block_max);
    float correction = std::exp(running_max - new_max);  // 0 for the first block (-inf)
    float block_sum = 0.0f;
    for (int j = 0; j < n; j++) {
        scores[j] = std::exp(scores[j] - new_max);
        block_sum += scores[j];
    }
    running_sum = running_sum * correction + block_sum;
    running_max = new_max;
#pragma omp simd
    for (int e = 0; e < hd; e++) acc[e] *= correction;
    for (int j = 0; j < n; j++) {
        float p = scores[j];
        const float* vj = values + (size_t)j * hd;
#pragma omp simd
        for (int e = 0; e < hd; e++) acc[e] += p * vj[e];
    }
}

void attention(float* out, const float* q, const float* key_cache, const float* value_cache,
               const int64_t* mask, int B, int T, int p0, int NH, int KVH, int hd, int capacity) {
    int n_rep = NH / KVH;  // query heads per kv head
    int mask_len = p0 + T;
    float scale = (float)std::sqrt((double)hd);  // divided by, as the reference does
    int query_tiles = (T + kQueryTile - 1) / kQueryTile;
    int64_t work = (int64_t)B * NH * T * mask_len * hd;
#pragma omp parallel for collapse(3) schedule(dynamic) num_threads(threads_for(work))
    for (int b = 0; b < B; b++) {
        for (int g = 0; g < KVH; g++) {
            for (int tile = 0; tile < query_tiles; tile++) {
                static thread_local AttentionScratch scratch;
                scratch.reserve(n_rep, hd);
                int i0 = tile * kQueryTile, i1 = std::min(T, i0 + kQueryTile);
                size_t slab = ((size_t)b * KVH + g) * capacity * hd;
                const float* keys = key_cache + slab;      // (capacity, hd), contiguous
                const float* values = value_cache + slab;  // (capacity, hd)
                const int64_t* key_mask = mask ? mask + (size_t)b * mask_len : nullptr;
                int rows = n_rep * (i1 - i0);
                std::fill(scratch.acc.begin(), scratch.acc.begin() + (size_t)rows * hd, 0.0f);
                std::fill(scratch.max.begin(), scratch.max.begin() + rows, -INFINITY);
                std::fill(scratch.sum.begin(), scratch.sum.begin() + rows, 0.0f);
                int key_end = p0 + i1;  // the tile's last query sees keys < p0 + i1
                for (int j0 = 0; j0 < key_end; j0 += kKeyBlock) {
                    int nk = std::min(kKeyBlock, key_end - j0);
                    float* kt = scratch.keys_t.data();
                    for (int j = 0; j < nk; j++)
                        for (int e = 0; e < hd; e++) kt[(size_t)e * kKeyBlock + j] = keys[(size_t)(j0 + j) * hd + e];
                    for (int r = 0; r < n_rep; r++) {
                        int h = g * n_rep + r;
                        for (int i = i0; i < i1; i++) {
                            int n = std::min(nk, p0 + i + 1 - j0);  // causal: keys j <= p0 + i
                            if (n <= 0) continue;
                            const float* qi = q + (((size_t)b * T + i) * NH + h) * hd;
                            alignas(64) float scores[kKeyBlock] = {};
                            for (int e = 0; e < hd; e++) {
                                float qe = qi[e];
                                const float* kte = kt + (size_t)e * kKeyBlock;
#pragma omp simd
                                for (int j = 0; j < kKeyBlock; j++) scores[j] += qe * kte[j];
                            }
                            for (int j = 0; j < n; j++) {
                                scores[j] /= scale;
                                if (key_mask && key_mask[j0 + j] == 0) scores[j] += -1e9f;  // padding
                            }
                            size_t row = (size_t)r * (i1 - i0) + (i - i0);
                            online_softmax_block(scores, n, values + (size_t)j0 * hd, hd,
                                                 scratch.acc.data() + row * hd, scratch.max[row],
                                                 scratch.sum[row]);
                        }
                    }
                }
                for (int r = 0; r < n_rep; r++) {
                    for (int i = i0; i < i1; i++) {
                        size_t row = (size_t)r * (i1 - i0) + (i - i0);
                        float inv = 1.0f / scratch.sum[row];
                        const float* acc = scratch.acc.data() + row * hd;
                        float* o = out + (((size_t)b * T + i) * NH + g * n_rep + r) * hd;
#pragma omp simd
                        for (int e = 0; e < hd; e++) o[e] = acc[e] * inv;
                    }
                }
            }
        }
    }
}

}  // namespace XVALID_SIMD_NS
}  // namespace fast
}  // namespace xvalid
