// The fast kernel's attention (declared in simd_ops.h), compiled like simd_ops.cpp once per
// instruction set. Per (sequence, kv head, tile of queries), the query heads that share the
// kv head read its keys and values in place (no copies), online (streaming) softmax over key
// blocks so no (T, p0+T) score matrix exists, key blocks past the causal limit skipped.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "simd_ops.h"
#include "simd_parallel.h"

namespace xvalid {
namespace fast {
namespace XVALID_SIMD_NS {

// Eight floats as one value: GCC/Clang vector extensions, so the same source becomes AVX
// instructions in the avx2 build and SSE or NEON pairs in the portable one.
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8 splat(float x) { return v8{} + x; }
static inline v8 load8(const float* p) {
    v8 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
static inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
static inline v8 max8(v8 a, v8 b) { return a > b ? a : b; }
static inline float hmax8(v8 v) {
    float m = v[0];
    for (int i = 1; i < 8; i++) m = std::max(m, v[i]);
    return m;
}
static inline float hsum8(v8 v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

// exp(x) for x <= 0, eight at a time: the Cephes single-precision method (x = n ln2 + r,
// |r| <= ln2/2, a degree-6 polynomial for e^r, times 2^n), within 2 ulp of std::exp;
// x < -87 gives exactly 0, as float32 exp underflows there.
static inline v8 exp8_nonpositive(v8 x) {
    v8 clamped = max8(x, splat(-87.0f));
    v8 t = clamped * 1.44269504088896341f + 0.5f;
    v8i n = __builtin_convertvector(t, v8i);                 // truncates toward zero
    n -= (__builtin_convertvector(n, v8) > t) ? v8i{} + 1 : v8i{};  // floor
    v8 fn = __builtin_convertvector(n, v8);
    v8 r = clamped - fn * 0.693359375f - fn * -2.12194440e-4f;
    v8 y = splat(1.9875691500e-4f);
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    v8i bits = (n + 127) << 23;  // 2^n as a float's exponent field
    v8 pow2n;
    std::memcpy(&pow2n, &bits, sizeof pow2n);
    return x < -87.0f ? v8{} : y * pow2n;
}

// Attention tiles: kQueryTile queries of every query head that shares one kv head, against
// kKeyBlock keys at a time. The block's keys are transposed once into (hd, kKeyBlock), so a
// query's 64 scores are hd broadcast-multiply-adds into eight 8-lane accumulators; every
// query head that shares the kv head (n_rep of them) reuses the transposed block.
static constexpr int kQueryTile = 16;
static constexpr int kKeyBlock = 64;
static constexpr int kLanes = kKeyBlock / 8;

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

// Scores of one query against the block: s[l] = (q . k_j) / scale for the keys j of the
// first `lanes` 8-key lanes. A whole block keeps all eight accumulators in registers; a short
// block (a short sequence, the causal edge) computes only the lanes it needs.
static inline void block_scores(const float* q, const float* keys_t, int hd, float scale, int lanes, v8* s) {
    v8 acc[kLanes] = {};
    if (lanes == kLanes) {
        for (int e = 0; e < hd; e++) {
            v8 qe = splat(q[e]);
            const float* row = keys_t + (size_t)e * kKeyBlock;
#pragma GCC unroll 8
            for (int l = 0; l < kLanes; l++) acc[l] += qe * load8(row + 8 * l);
        }
    } else {
        for (int e = 0; e < hd; e++) {
            v8 qe = splat(q[e]);
            const float* row = keys_t + (size_t)e * kKeyBlock;
            for (int l = 0; l < lanes; l++) acc[l] += qe * load8(row + 8 * l);
        }
    }
    for (int l = 0; l < lanes; l++) s[l] = acc[l] / scale;  // divided, as the reference does
}

// acc[0 .. 8*NV) = acc * correction + sum_j p[j] * values[j][0 .. 8*NV), values rows hd apart:
// NV independent 8-lane accumulators in registers, so consecutive keys' multiply-adds do not
// wait on each other.
template <int NV>
static inline void accumulate_values(float* acc, const float* p, const float* values, int n, int hd,
                                     float correction) {
    v8 a[NV];
    for (int v = 0; v < NV; v++) a[v] = load8(acc + 8 * v) * correction;
    for (int j = 0; j < n; j++) {
        v8 pj = splat(p[j]);
        const float* row = values + (size_t)j * hd;
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) a[v] += pj * load8(row + 8 * v);
    }
    for (int v = 0; v < NV; v++) store8(acc + 8 * v, a[v]);
}

// Online softmax step for one query over one block: n valid scores (the rest are ignored);
// rescales acc (hd) by exp(old max - new max) and adds exp(s_j - new max) * v_j.
static inline void online_softmax_block(v8* s, int n, const float* values, int hd, float* acc,
                                        float& running_max, float& running_sum) {
    alignas(32) float p[kKeyBlock];
    int lanes = (n + 7) / 8;
    v8 lane_max = splat(-INFINITY);
    for (int l = 0; l < lanes; l++) {
        v8 index = v8{0, 1, 2, 3, 4, 5, 6, 7} + (float)(8 * l);
        s[l] = index < (float)n ? s[l] : splat(-INFINITY);  // lanes past the causal limit
        lane_max = max8(lane_max, s[l]);
    }
    float new_max = std::max(running_max, hmax8(lane_max));
    float correction = running_max == -INFINITY ? 0.0f : std::exp(running_max - new_max);
    v8 lane_sum = {};
    for (int l = 0; l < lanes; l++) {
        v8 e = exp8_nonpositive(s[l] - new_max);
        lane_sum += e;
        store8(p + 8 * l, e);
    }
    running_sum = running_sum * correction + hsum8(lane_sum);
    running_max = new_max;
    int e0 = 0;
    for (; e0 + 64 <= hd; e0 += 64) accumulate_values<8>(acc + e0, p, values + e0, n, hd, correction);
    for (; e0 + 32 <= hd; e0 += 32) accumulate_values<4>(acc + e0, p, values + e0, n, hd, correction);
    for (; e0 + 8 <= hd; e0 += 8) accumulate_values<1>(acc + e0, p, values + e0, n, hd, correction);
    for (; e0 < hd; e0++) {  // head sizes that are not a multiple of 8
        float a = acc[e0] * correction;
        for (int j = 0; j < n; j++) a += p[j] * values[(size_t)j * hd + e0];
        acc[e0] = a;
    }
}

// One task of attention: queries i0 .. i1-1 of sequence b, for the n_rep query heads that
// share kv head g, over every key they may see.
static void attention_tile(float* out, const float* q, const float* key_cache, const float* value_cache,
                           const int64_t* mask, int T, int p0, int NH, int KVH, int hd, int capacity,
                           int b, int g, int i0, int i1) {
    int n_rep = NH / KVH;  // query heads per kv head
    int mask_len = p0 + T;
    float scale = (float)std::sqrt((double)hd);
    int nq = i1 - i0;
    static thread_local AttentionScratch scratch;
    scratch.reserve(n_rep, hd);
    size_t slab = ((size_t)b * KVH + g) * capacity * hd;
    const float* keys = key_cache + slab;      // (capacity, hd), contiguous
    const float* values = value_cache + slab;  // (capacity, hd)
    const int64_t* key_mask = mask ? mask + (size_t)b * mask_len : nullptr;
    std::fill(scratch.acc.begin(), scratch.acc.begin() + (size_t)n_rep * nq * hd, 0.0f);
    std::fill(scratch.max.begin(), scratch.max.begin() + n_rep * nq, -INFINITY);
    std::fill(scratch.sum.begin(), scratch.sum.begin() + n_rep * nq, 0.0f);
    int key_end = p0 + i1;  // causal: the tile's last query sees keys < p0 + i1
    for (int j0 = 0; j0 < key_end; j0 += kKeyBlock) {
        int nk = std::min(kKeyBlock, key_end - j0);
        float* kt = scratch.keys_t.data();
        for (int j = 0; j < nk; j++)
            for (int e = 0; e < hd; e++) kt[(size_t)e * kKeyBlock + j] = keys[(size_t)(j0 + j) * hd + e];
        bool block_has_padding = false;
        for (int j = 0; key_mask && j < nk; j++) block_has_padding |= key_mask[j0 + j] == 0;
        for (int r = 0; r < n_rep; r++) {
            int h = g * n_rep + r;
            for (int i = i0; i < i1; i++) {
                int n = std::min(nk, p0 + i + 1 - j0);  // causal: keys j <= p0 + i
                if (n <= 0) continue;
                v8 s[kLanes];
                block_scores(q + (((size_t)b * T + i) * NH + h) * hd, kt, hd, scale, (n + 7) / 8, s);
                if (block_has_padding) {
                    for (int j = 0; j < n; j++)
                        if (key_mask[j0 + j] == 0) s[j / 8][j % 8] += -1e9f;  // padding key
                }
                size_t row = (size_t)r * nq + (i - i0);
                online_softmax_block(s, n, values + (size_t)j0 * hd, hd, scratch.acc.data() + row * hd,
                                     scratch.max[row], scratch.sum[row]);
            }
        }
    }
    for (int r = 0; r < n_rep; r++) {
        for (int i = i0; i < i1; i++) {
            size_t row = (size_t)r * nq + (i - i0);
            float inv = 1.0f / scratch.sum[row];
            const float* acc = scratch.acc.data() + row * hd;
            float* o = out + (((size_t)b * T + i) * NH + g * n_rep + r) * hd;
            for (int e = 0; e < hd; e++) o[e] = acc[e] * inv;
        }
    }
}

void attention(float* out, const float* q, const float* key_cache, const float* value_cache,
               const int64_t* mask, int B, int T, int p0, int NH, int KVH, int hd, int capacity) {
    int tiles = (T + kQueryTile - 1) / kQueryTile;
    int64_t work = (int64_t)B * NH * T * (p0 + T) * hd;
    parallel_for<true>((int64_t)B * KVH * tiles, threads_for(work), [&](int64_t task) {
        int b = (int)(task / ((int64_t)KVH * tiles)), g = (int)(task / tiles % KVH), tile = (int)(task % tiles);
        attention_tile(out, q, key_cache, value_cache, mask, T, p0, NH, KVH, hd, capacity, b, g,
                       tile * kQueryTile, std::min(T, (tile + 1) * kQueryTile));
    });
}

}  // namespace XVALID_SIMD_NS
}  // namespace fast
}  // namespace xvalid
