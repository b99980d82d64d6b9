#include "ops.h"

#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace xvalid {

// 0 = not set: use OpenMP's default (OMP_NUM_THREADS or the core count). Every parallel
// region passes this count explicitly, so torch (which shares libgomp) changing the
// process-wide OpenMP setting does not change ours.
static std::atomic<int> requested_threads{0};

void set_num_threads(int n) {
    if (n < 1) throw InputError("number of threads must be >= 1, got " + std::to_string(n));
    requested_threads = n;
}

int get_num_threads() {
#ifdef _OPENMP
    int n = requested_threads;
    return n > 0 ? n : omp_get_max_threads();
#else
    return 1;
#endif
}

bool openmp_enabled() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
}

void embedding_forward(float* out, const int64_t* ids, const WeightMatrix& table, int rows) {
    int H = table.cols;
    for (int r = 0; r < rows; r++) dequantize_row(table, (int)ids[r], 0, H, out + (size_t)r * H);
}

void rmsnorm_forward(float* out, const float* x, const float* weight, int rows, int n, float eps) {
    for (int r = 0; r < rows; r++) {
        const float* xr = x + (size_t)r * n;
        float* o = out + (size_t)r * n;
        double sum_sq = 0.0;
        for (int i = 0; i < n; i++) sum_sq += (double)xr[i] * xr[i];
        float mean_sq = (float)(sum_sq / n);
        float inv_rms = 1.0f / std::sqrt(mean_sq + eps);  // fp32 like the reference
        for (int i = 0; i < n; i++) o[i] = (xr[i] * inv_rms) * weight[i];
    }
}

// Most of the time is spent in this function: the seven projections and the
// vocabulary head. Naive on purpose: one double-accumulated dot product per output. Each
// weight row is first converted to the float32 values it stores (dequantize_row: float16/
// bfloat16 upcast, int8 times its block's scale), once for all token rows; threads split
// the output features, so each thread streams its own rows of W.
void matmul_forward(float* out, const float* x, const WeightMatrix& w, int rows) {
    int n = w.cols, d = w.rows;
#pragma omp parallel num_threads(get_num_threads())
    {
        std::vector<float> wo(n);  // row o of W as float32
#pragma omp for
        for (int o = 0; o < d; o++) {
            dequantize_row(w, o, 0, n, wo.data());
            for (int r = 0; r < rows; r++) {
                const float* xr = x + (size_t)r * n;
                double sum = 0.0;
                for (int i = 0; i < n; i++) sum += (double)wo[i] * xr[i];
                out[(size_t)r * d + o] = (float)sum;
            }
        }
    }
}

void rope_forward(float* x, int B, int T, int n_heads, int hd, int p0,
                  const float* cos_table, const float* sin_table) {
    int half = hd / 2;
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            const float* c = cos_table + (size_t)(p0 + t) * hd;
            const float* s = sin_table + (size_t)(p0 + t) * hd;
            for (int h = 0; h < n_heads; h++) {
                float* v = x + (((size_t)b * T + t) * n_heads + h) * hd;
                // x*cos + rotate_half(x)*sin, rotate_half(x) = (-x[half:], x[:half])
                for (int j = 0; j < half; j++) {
                    float x1 = v[j], x2 = v[j + half];
                    v[j] = x1 * c[j] - x2 * s[j];
                    v[j + half] = x2 * c[j + half] + x1 * s[j + half];
                }
            }
        }
    }
}

void rope_append_kv_forward(float* q, float* k, const float* v, float* key_cache, float* value_cache,
                            int B, int T, int NH, int KVH, int hd, int p0, int capacity,
                            const float* cos_table, const float* sin_table) {
    rope_forward(q, B, T, NH, hd, p0, cos_table, sin_table);
    rope_forward(k, B, T, KVH, hd, p0, cos_table, sin_table);
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            for (int g = 0; g < KVH; g++) {
                size_t from = (((size_t)b * T + t) * KVH + g) * hd;
                size_t to = (((size_t)b * KVH + g) * capacity + p0 + t) * hd;
                std::memcpy(key_cache + to, k + from, sizeof(float) * hd);
                std::memcpy(value_cache + to, v + from, sizeof(float) * hd);
            }
        }
    }
}

void attention_forward(float* out, const float* q, const float* key_cache, const float* value_cache,
                       const int64_t* mask, int B, int T, int p0, int NH, int KVH, int hd,
                       int capacity) {
    int kv_mul = NH / KVH;                   // query heads per key/value head
    int mask_len = p0 + T;                   // keys this call can see: cached + new
    float scale = (float)std::sqrt((double)hd);
#pragma omp parallel for collapse(2) num_threads(get_num_threads())
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            static thread_local std::vector<float> att;  // (p0+T) scores; grows, never per call
            if ((int)att.size() < mask_len) att.resize(mask_len);
            size_t slab = ((size_t)b * KVH + h / kv_mul) * capacity * hd;  // this kv head's cache
            const float* keys = key_cache + slab;
            const float* values = value_cache + slab;
            const int64_t* key_mask = mask ? mask + (size_t)b * mask_len : nullptr;
            for (int i = 0; i < T; i++) {
                const float* qi = q + (((size_t)b * T + i) * NH + h) * hd;
                int n_keys = p0 + i + 1;     // causal: keys j > p0 + i get -inf, i.e. weight 0
                // scores, divided by sqrt(hd) as written in the reference; padding keys get -1e9
                float max_score = -INFINITY;
                for (int j = 0; j < n_keys; j++) {
                    const float* kj = keys + (size_t)j * hd;
                    double dot = 0.0;
                    for (int e = 0; e < hd; e++) dot += (double)qi[e] * kj[e];
                    float s = (float)dot / scale;
                    if (key_mask && key_mask[j] == 0) s += -1e9f;
                    att[j] = s;
                    if (s > max_score) max_score = s;
                }
                // softmax in fp32, max subtracted
                double sum = 0.0;
                for (int j = 0; j < n_keys; j++) {
                    att[j] = std::exp(att[j] - max_score);
                    sum += att[j];
                }
                for (int j = 0; j < n_keys; j++) att[j] = (float)(att[j] / sum);
                // weighted sum of the values
                float* oi = out + (((size_t)b * T + i) * NH + h) * hd;
                for (int e = 0; e < hd; e++) {
                    double acc = 0.0;
                    for (int j = 0; j < n_keys; j++) acc += (double)att[j] * values[(size_t)j * hd + e];
                    oi[e] = (float)acc;
                }
            }
        }
    }
}

void swiglu_forward(float* out, const float* gate, const float* up, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float z = gate[i];
        out[i] = (z / (1.0f + std::exp(-z))) * up[i];
    }
}

void residual_forward(float* x, const float* delta, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += delta[i];
}

void residual_rmsnorm_forward(float* x, const float* delta, const float* weight, float* out,
                              int rows, int n, float eps) {
    if (delta) residual_forward(x, delta, (int64_t)rows * n);
    rmsnorm_forward(out, x, weight, rows, n, eps);
}

void matmul_swiglu_forward(float* out, const float* x, const WeightMatrix& w_gate,
                           const WeightMatrix& w_up, int rows, float* gate, float* up) {
    int d = w_gate.rows;
    static thread_local std::vector<float> scratch;  // gate and up when the caller keeps neither
    size_t size = (size_t)rows * d;
    if (!gate || !up) {
        if (scratch.size() < 2 * size) scratch.resize(2 * size);
        gate = scratch.data();
        up = scratch.data() + size;
    }
    matmul_forward(gate, x, w_gate, rows);
    matmul_forward(up, x, w_up, rows);
    swiglu_forward(out, gate, up, (int64_t)size);
}

const KernelOps clear_kernel = {
    "clear",
    "naive ops, dot products accumulated in double (csrc/kernel/ops.cpp)",
    embedding_forward,
    residual_rmsnorm_forward,
    matmul_forward,
    matmul_swiglu_forward,
    rope_append_kv_forward,
    attention_forward,
};

}  // namespace xvalid
