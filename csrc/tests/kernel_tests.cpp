// xvalid-kernel-tests: every op of every kernel against the clear kernel, over shapes chosen to
// hit tile edges (sizes that are not multiples of the SIMD width or of a tile), grouped-query
// ratios, padding masks, a KV cache already holding positions, and 1 to 3 threads; then whole
// Transformers on random weights: fast against clear, prefill + decode against one forward,
// capture against no capture. Weight storage dtypes (dtype.h): the float16/bfloat16
// conversions against independent definitions, int8 dequantisation, every kernel's matmul per
// dtype against a double-accumulated reference, and whole Transformers on typed weights.
// Run by ctest, and under ASan + UBSan by scripts/sanitize.sh.
// XVALID_ISA=portable tests the portable fallback. Exit status 0 when every check passes.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernel/kernels.h"
#include "kernel/ops.h"
#include "kernel/transformer.h"

using namespace xvalid;

static int g_checks = 0, g_failures = 0;
static std::mt19937 g_rng(1234);

static std::vector<float> randn(size_t n, float scale = 1.0f) {
    std::normal_distribution<float> dist(0.0f, scale);
    std::vector<float> v(n);
    for (float& x : v) x = dist(g_rng);
    return v;
}

// max |a - b| <= tol * max(1, max |b|): relative to the values' scale, as compare judges.
static void expect_close(const std::string& what, const float* a, const float* b, size_t n, double tol) {
    double err = 0, scale = 1;
    for (size_t i = 0; i < n; i++) {
        double d = std::fabs((double)a[i] - b[i]);
        if (!(d <= err)) err = std::isnan(d) ? INFINITY : d;
        scale = std::max(scale, std::fabs((double)b[i]));
    }
    g_checks++;
    if (!(err <= tol * scale)) {
        g_failures++;
        std::printf("FAIL %s: max abs error %.3g > %.3g (scale %.3g)\n", what.c_str(), err, tol * scale, scale);
    }
}

static void expect_equal(const std::string& what, const float* a, const float* b, size_t n) {
    g_checks++;
    for (size_t i = 0; i < n; i++) {
        if (a[i] != b[i]) {
            g_failures++;
            std::printf("FAIL %s: element %zu differs (%.9g vs %.9g)\n", what.c_str(), i, a[i], b[i]);
            return;
        }
    }
}

static std::string shape(std::initializer_list<int> dims) {
    std::string s = "(";
    for (int d : dims) s += (s.size() > 1 ? "," : "") + std::to_string(d);
    return s + ")";
}

static void test_matmul(const KernelOps& k, int threads) {
    for (int M : {1, 2, 3, 5, 7, 13, 33, 130})
        for (int N : {1, 3, 8, 17, 24, 131})
            for (int K : {1, 6, 17, 72, 513}) {
                auto x = randn((size_t)M * K), w = randn((size_t)N * K), wu = randn((size_t)N * K);
                std::vector<float> want(M * N), got(M * N, NAN), want_f(M * N), got_f(M * N, NAN);
                std::vector<float> gate(M * N), up(M * N);
                double tol = 2e-6 * std::sqrt((double)K);
                std::string where = std::string(k.name) + " " + shape({M, N, K}) + " threads " + std::to_string(threads);
                WeightMatrix W = WeightMatrix::f32(w.data(), N, K), Wu = WeightMatrix::f32(wu.data(), N, K);
                clear_kernel.matmul(want.data(), x.data(), W, M);
                k.matmul(got.data(), x.data(), W, M);
                expect_close("matmul " + where, got.data(), want.data(), want.size(), tol);
                clear_kernel.matmul_swiglu(want_f.data(), x.data(), W, Wu, M, nullptr, nullptr);
                k.matmul_swiglu(got_f.data(), x.data(), W, Wu, M, nullptr, nullptr);
                expect_close("matmul_swiglu " + where, got_f.data(), want_f.data(), want_f.size(), 2 * tol);
                // with capture: gate and up as matmul computes them, the same SwiGLU output
                k.matmul_swiglu(want_f.data(), x.data(), W, Wu, M, gate.data(), up.data());
                expect_equal("matmul_swiglu gate " + where, gate.data(), got.data(), got.size());
                expect_equal("matmul_swiglu captured " + where, want_f.data(), got_f.data(), got_f.size());
            }
}

static void test_residual_rmsnorm(const KernelOps& k) {
    for (int rows : {1, 3, 33})
        for (int n : {6, 72, 131, 512})
            for (bool with_delta : {false, true}) {
                auto x = randn((size_t)rows * n), delta = randn((size_t)rows * n), w = randn(n);
                auto x_clear = x, x_k = x;
                std::vector<float> want(rows * n), got(rows * n, NAN);
                const float* d = with_delta ? delta.data() : nullptr;
                clear_kernel.residual_rmsnorm(x_clear.data(), d, w.data(), want.data(), rows, n, 1e-5f);
                k.residual_rmsnorm(x_k.data(), d, w.data(), got.data(), rows, n, 1e-5f);
                std::string where = std::string(k.name) + " " + shape({rows, n}) + (with_delta ? " +delta" : "");
                expect_equal("residual " + where, x_k.data(), x_clear.data(), x.size());
                expect_close("rmsnorm " + where, got.data(), want.data(), want.size(), 2e-6);
            }
}

// ---- storage dtypes ---------------------------------------------------------------------

// The value of half h by the IEEE 754 definition, computed apart from dtype.h's bit tricks.
static double half_value(uint16_t h) {
    int sign = h >> 15, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    double magnitude = exponent == 0 ? std::ldexp((double)mantissa, -24)
                                     : std::ldexp(1024.0 + mantissa, exponent - 25);
    return sign ? -magnitude : magnitude;
}

// x rounded to the nearest of `candidates` (two neighbours), ties to the one with an even
// last bit: round-to-nearest-even stated directly.
static uint16_t nearest_even(double x, uint16_t lo, double lo_value, uint16_t hi, double hi_value) {
    double d_lo = std::fabs(x - lo_value), d_hi = std::fabs(hi_value - x);
    if (d_lo != d_hi) return d_lo < d_hi ? lo : hi;
    return (lo & 1) == 0 ? lo : hi;
}

static void test_half_conversions() {
    // every finite half: its float32 value is exact, and converting back gives the same bits
    int round_trip_failures = 0, value_failures = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        if (((h >> 10) & 0x1f) == 0x1f) continue;  // inf, NaN: model files refuse them
        float f = half_to_float((uint16_t)h);
        if ((double)f != half_value((uint16_t)h) || std::signbit(f) != (h >> 15 == 1)) value_failures++;
        if (float_to_half(f) != h) round_trip_failures++;
    }
    g_checks += 2;
    if (value_failures) g_failures++, std::printf("FAIL half_to_float: %d halves have a wrong value\n", value_failures);
    if (round_trip_failures) g_failures++, std::printf("FAIL float16 round trip: %d halves\n", round_trip_failures);
    g_checks++;
    if (!std::isinf(half_to_float(0x7c00)) || !std::isnan(half_to_float(0x7e00)) || half_to_float(0xfc00) > 0) {
        g_failures++, std::printf("FAIL half_to_float of inf/NaN\n");
    }

    // float32 -> float16 against the nearest half found by search, ties to even: random floats
    // over the whole half range (normals, subnormals, the rounding edges near 65504 and 2^-25)
    // values of the positive finite halves, increasing, and 65536 for 0x7c00 (inf): the next
    // step up from 65504, where rounding puts the boundary
    std::vector<double> positive(0x7c01);
    for (uint32_t h = 0; h < 0x7c00; h++) positive[h] = half_value((uint16_t)h);
    positive[0x7c00] = 65536.0;
    std::uniform_real_distribution<double> exponent(-27.0, 16.0);
    std::uniform_int_distribution<int> coin(0, 1);
    int rounding_failures = 0;
    std::vector<float> samples = {65504.0f, 65519.99f, 0x1p-25f, 0x1.8p-25f, 0x1p-24f, 0x1p-14f,
                                  1.0f + 0x1p-11f, 1.0f + 3 * 0x1p-11f, 0x1.ffcp-15f, 0x1.ffep-15f};
    for (int i = 0; i < 200000; i++) {
        float f = (float)std::exp2(exponent(g_rng));
        samples.push_back(coin(g_rng) ? -f : f);
    }
    for (float f : samples) {
        double a = std::fabs((double)f);
        uint16_t want;
        if (a >= 65520.0) {
            want = 0x7c00;  // past 65504 + half an ulp: inf
        } else {
            size_t hi = std::lower_bound(positive.begin(), positive.end(), a) - positive.begin();
            want = hi == 0 ? 0 : positive[hi] == a ? (uint16_t)hi
                              : nearest_even(a, (uint16_t)(hi - 1), positive[hi - 1], (uint16_t)hi, positive[hi]);
        }
        if (std::signbit(f)) want |= 0x8000;
        if (float_to_half(f) != want) {
            if (rounding_failures++ < 3) std::printf("FAIL float_to_half(%a) = 0x%04x, want 0x%04x\n", f, float_to_half(f), want);
        }
    }
    g_checks++;
    if (rounding_failures) g_failures++;
}

static void test_bf16_conversions() {
    int round_trip_failures = 0;
    for (uint32_t b = 0; b < 65536; b++) {
        if (((b >> 7) & 0xff) == 0xff) continue;  // inf, NaN
        float f = bf16_to_float((uint16_t)b);
        uint32_t bits;
        std::memcpy(&bits, &f, 4);
        if (bits != b << 16 || float_to_bf16(f) != b) round_trip_failures++;
    }
    g_checks++;
    if (round_trip_failures) g_failures++, std::printf("FAIL bfloat16 round trip: %d values\n", round_trip_failures);
    // float32 -> bfloat16 against the nearer of the two neighbours, ties to even
    std::uniform_int_distribution<uint32_t> any_bits(0, 0x7f7fffffu);  // finite positives
    int rounding_failures = 0;
    for (int i = 0; i < 200000; i++) {
        uint32_t bits = any_bits(g_rng);
        if (i < 1000) bits = (bits & 0xffff0000u) | 0x8000u;  // exact ties
        float f;
        std::memcpy(&f, &bits, 4);
        uint16_t lo = (uint16_t)(bits >> 16), hi = (uint16_t)(lo + 1);
        // (past the largest bfloat16, the next step up is inf: rounding treats it as 2^128)
        uint16_t want = nearest_even(f, lo, bf16_to_float(lo), hi, hi == 0x7f80 ? std::ldexp(1.0, 128) : bf16_to_float(hi));
        if (float_to_bf16(f) != want || float_to_bf16(-f) != (want | 0x8000)) rounding_failures++;
    }
    g_checks++;
    if (rounding_failures) g_failures++, std::printf("FAIL float_to_bf16 rounding: %d values\n", rounding_failures);
}

// A weight matrix in a storage dtype, owning its bytes, and the float32 values it means,
// computed here without dtype.h's conversions (half_value, bf16 bits, q * scale).
struct TypedMatrix {
    DType dtype;
    int rows, cols, block_size = 0;
    std::vector<float> f32, scales, values;
    std::vector<uint16_t> halves;
    std::vector<int8_t> q;

    TypedMatrix(const std::vector<float>& src, int rows_, int cols_, DType dtype_, int block_size_ = 32)
        : dtype(dtype_), rows(rows_), cols(cols_), values(src.size()) {
        size_t n = (size_t)rows * cols;
        switch (dtype) {
            case DType::f32:
                f32 = values = src;
                break;
            case DType::f16:
            case DType::bf16:
                halves.resize(n);
                for (size_t i = 0; i < n; i++) {
                    halves[i] = dtype == DType::f16 ? float_to_half(src[i]) : float_to_bf16(src[i]);
                    uint32_t bits = (uint32_t)halves[i] << 16;
                    float bf;
                    std::memcpy(&bf, &bits, 4);
                    values[i] = dtype == DType::f16 ? (float)half_value(halves[i]) : bf;
                }
                break;
            case DType::q8: {  // Q8: scale = absmax / 127, q = round-half-even(x / scale)
                block_size = block_size_;
                int blocks = (cols + block_size - 1) / block_size;
                q.resize(n);
                scales.resize((size_t)rows * blocks);
                for (int r = 0; r < rows; r++)
                    for (int b = 0; b < blocks; b++) {
                        int c0 = b * block_size, c1 = std::min(cols, c0 + block_size);
                        float absmax = 0;
                        for (int c = c0; c < c1; c++) absmax = std::max(absmax, std::fabs(src[(size_t)r * cols + c]));
                        float scale = absmax / 127.0f;
                        scales[(size_t)r * blocks + b] = scale;
                        for (int c = c0; c < c1; c++) {
                            size_t i = (size_t)r * cols + c;
                            float level = scale > 0 ? std::nearbyint(src[i] / scale) : 0.0f;
                            q[i] = (int8_t)std::max(-127.0f, std::min(127.0f, level));
                            values[i] = (float)q[i] * scale;
                        }
                    }
                break;
            }
        }
    }
    TypedMatrix(const TypedMatrix&) = delete;
    TypedMatrix(TypedMatrix&&) = default;

    WeightMatrix view() const {
        WeightMatrix w;
        w.dtype = dtype, w.rows = rows, w.cols = cols, w.block_size = block_size;
        w.data = dtype == DType::f32 ? (const void*)f32.data() : dtype == DType::q8 ? (const void*)q.data() : halves.data();
        w.scales = dtype == DType::q8 ? scales.data() : nullptr;
        return w;
    }
};

struct StorageCase {
    DType dtype;
    int block_size;  // int8 only; 0 = per output channel (block_size = cols)
};
static const StorageCase kStorageCases[] = {{DType::f32, 0}, {DType::f16, 0}, {DType::bf16, 0},
                                            {DType::q8, 32}, {DType::q8, 5}, {DType::q8, 8}, {DType::q8, 0}};

static std::string storage_name(const StorageCase& sc) {
    std::string name = dtype_name(sc.dtype);
    if (sc.dtype == DType::q8) name += sc.block_size ? "/" + std::to_string(sc.block_size) : "/per-row";
    return name;
}

// int8 dequantisation: weight_at and dequantize_row (every start and length) against q * scale,
// a last block that is partial (70 = 32 + 32 + 6 columns); and the embedding op per dtype.
static void test_dequantize() {
    const int rows = 3, cols = 70;
    for (const StorageCase& sc : kStorageCases) {
        TypedMatrix m(randn((size_t)rows * cols), rows, cols, sc.dtype, sc.block_size ? sc.block_size : cols);
        WeightMatrix w = m.view();
        int wrong = 0;
        std::vector<float> out(cols);
        for (int r = 0; r < rows; r++)
            for (int c0 = 0; c0 < cols; c0++) {
                if (weight_at(w, r, c0) != m.values[(size_t)r * cols + c0]) wrong++;
                for (int n = 1; c0 + n <= cols; n += 7) {
                    dequantize_row(w, r, c0, n, out.data());
                    for (int i = 0; i < n; i++) wrong += out[i] != m.values[(size_t)r * cols + c0 + i];
                }
            }
        g_checks++;
        if (wrong) g_failures++, std::printf("FAIL dequantize %s: %d values differ\n", storage_name(sc).c_str(), wrong);
        // the embedding lookup converts one row per token, in every kernel
        std::vector<int64_t> ids = {2, 0, 2, 1};
        std::vector<float> want(ids.size() * cols), got(want.size(), NAN);
        for (size_t t = 0; t < ids.size(); t++)
            std::copy_n(m.values.begin() + ids[t] * cols, cols, want.begin() + t * cols);
        for (const std::string& name : kernel_names()) {
            find_kernel(name).embedding(got.data(), ids.data(), w, (int)ids.size());
            expect_equal("embedding " + name + " " + storage_name(sc), got.data(), want.data(), want.size());
        }
    }
}

// Every kernel's matmul and matmul_swiglu per storage dtype against a double-accumulated
// product of x and the values the weights mean: M from 1 (decode) past the tile height,
// K not a multiple of 32 (a partial int8 block), N odd; SwiGLU with gate and up alike and
// of two dtypes.
static void test_typed_matmul(const KernelOps& k, int threads) {
    for (const StorageCase& sc : kStorageCases)
        for (int M : {1, 2, 3, 4, 5, 6, 7, 8, 9, 17})
            for (int K : {40, 100, 513})
                for (int N : {1, 3, 17, 37}) {
                    int bs = sc.block_size ? sc.block_size : K;
                    TypedMatrix W(randn((size_t)N * K, 0.5f), N, K, sc.dtype, bs);
                    // the up projection in another dtype every other shape: mixed files are allowed
                    DType up_dtype = (N + M) % 2 ? sc.dtype : DType::f16;
                    TypedMatrix Wu(randn((size_t)N * K, 0.5f), N, K, up_dtype, bs);
                    auto x = randn((size_t)M * K);
                    std::vector<float> want(M * N), want_f(M * N), got(M * N, NAN), got_f(M * N, NAN);
                    for (int m = 0; m < M; m++)
                        for (int n = 0; n < N; n++) {
                            double gate = 0, up = 0;
                            for (int i = 0; i < K; i++) {
                                gate += (double)x[(size_t)m * K + i] * W.values[(size_t)n * K + i];
                                up += (double)x[(size_t)m * K + i] * Wu.values[(size_t)n * K + i];
                            }
                            want[(size_t)m * N + n] = (float)gate;
                            want_f[(size_t)m * N + n] = (float)(gate / (1 + std::exp(-gate)) * up);
                        }
                    std::string where = std::string(k.name) + " " + storage_name(sc) + " " + shape({M, N, K}) +
                                        " threads " + std::to_string(threads);
                    double tol = 2e-6 * std::sqrt((double)K);
                    k.matmul(got.data(), x.data(), W.view(), M);
                    expect_close("typed matmul " + where, got.data(), want.data(), want.size(), tol);
                    k.matmul_swiglu(got_f.data(), x.data(), W.view(), Wu.view(), M, nullptr, nullptr);
                    expect_close("typed matmul_swiglu " + where + (up_dtype != sc.dtype ? " (up float16)" : ""),
                                 got_f.data(), want_f.data(), want_f.size(), 4 * tol);
                }
}

struct AttentionCase {
    int B, T, p0, NH, KVH, hd;
};

static void test_rope_and_attention(const KernelOps& k, int threads) {
    std::vector<AttentionCase> cases;
    for (int T : {1, 3, 17, 33})
        for (int p0 : {0, 5, 70})
            for (auto heads : {std::pair<int, int>{8, 8}, {8, 2}, {8, 1}, {6, 3}})
                for (int hd : {6, 8, 64}) cases.push_back({3, T, p0, heads.first, heads.second, hd});
    cases.push_back({1, 130, 0, 8, 2, 64});  // several key blocks and query tiles
    for (const AttentionCase& c : cases) {
        int capacity = c.p0 + c.T + 3, max_pos = capacity;
        auto q = randn((size_t)c.B * c.T * c.NH * c.hd), kk = randn((size_t)c.B * c.T * c.KVH * c.hd);
        auto v = randn((size_t)c.B * c.T * c.KVH * c.hd);
        auto cos_t = randn((size_t)max_pos * c.hd), sin_t = randn((size_t)max_pos * c.hd);
        size_t cache_size = (size_t)c.B * c.KVH * capacity * c.hd;
        auto kc = randn(cache_size), vc = randn(cache_size);  // positions < p0: earlier calls
        // padding: sequence 1 masks its first keys, sequence 2 its last cached ones
        std::vector<int64_t> mask((size_t)c.B * (c.p0 + c.T), 1);
        if (c.B > 1)
            for (int j = 0; j < std::min(4, c.p0 + c.T - 1); j++) mask[(size_t)1 * (c.p0 + c.T) + j] = 0;
        if (c.B > 2 && c.p0 > 0) mask[(size_t)2 * (c.p0 + c.T) + c.p0 - 1] = 0;
        std::string where = std::string(k.name) + " B,T,p0,NH,KVH,hd=" +
                            shape({c.B, c.T, c.p0, c.NH, c.KVH, c.hd}) + " threads " + std::to_string(threads);

        auto q_clear = q, k_clear = kk, kc_clear = kc, vc_clear = vc;
        clear_kernel.rope_append_kv(q_clear.data(), k_clear.data(), v.data(), kc_clear.data(), vc_clear.data(),
                                    c.B, c.T, c.NH, c.KVH, c.hd, c.p0, capacity, cos_t.data(), sin_t.data());
        auto q_k = q, k_k = kk, kc_k = kc, vc_k = vc;
        k.rope_append_kv(q_k.data(), k_k.data(), v.data(), kc_k.data(), vc_k.data(), c.B, c.T, c.NH, c.KVH,
                         c.hd, c.p0, capacity, cos_t.data(), sin_t.data());
        // (a compiler may fuse the rotation's multiply-adds: equal to float32 rounding, not bitwise)
        expect_close("rope q " + where, q_k.data(), q_clear.data(), q.size(), 1e-6);
        expect_close("rope k cache " + where, kc_k.data(), kc_clear.data(), cache_size, 1e-6);
        expect_equal("v cache " + where, vc_k.data(), vc_clear.data(), cache_size);

        std::vector<float> want(q.size()), got(q.size(), NAN);
        clear_kernel.attention(want.data(), q_clear.data(), kc_clear.data(), vc_clear.data(), mask.data(), c.B,
                               c.T, c.p0, c.NH, c.KVH, c.hd, capacity);
        k.attention(got.data(), q_clear.data(), kc_clear.data(), vc_clear.data(), mask.data(), c.B, c.T, c.p0,
                    c.NH, c.KVH, c.hd, capacity);
        expect_close("attention " + where, got.data(), want.data(), want.size(), 2e-6 * std::sqrt((double)c.hd));
        k.attention(got.data(), q_clear.data(), kc_clear.data(), vc_clear.data(), nullptr, c.B, c.T, c.p0, c.NH,
                    c.KVH, c.hd, capacity);
        clear_kernel.attention(want.data(), q_clear.data(), kc_clear.data(), vc_clear.data(), nullptr, c.B, c.T,
                               c.p0, c.NH, c.KVH, c.hd, capacity);
        expect_close("attention no mask " + where, got.data(), want.data(), want.size(), 2e-6 * std::sqrt((double)c.hd));
    }
}

// A whole model on random weights: the kernel against clear, decode against one forward.
// The weight matrices in one storage dtype (the norms and RoPE tables float32).
struct RandomModel {
    Config config;
    std::vector<std::vector<float>> tensors;
    std::vector<TypedMatrix> matrices;
    Weights weights;

    RandomModel(int H, int L, int NH, int KVH, int I, int V, int max_pos, StorageCase sc = {DType::f32, 0}) {
        config = {H, L, NH, KVH, H / NH, I, V, max_pos, 1e-5, 1e6};
        int hd = H / NH;
        auto add = [&](size_t n, float scale, float mean = 0) {
            tensors.push_back(randn(n, scale));
            for (float& x : tensors.back()) x += mean;
            return tensors.back().data();
        };
        matrices.reserve(2 + 7 * L);  // views are taken below, once every matrix exists
        auto matrix = [&](int rows, int cols, float scale) {
            matrices.emplace_back(randn((size_t)rows * cols, scale), rows, cols, sc.dtype,
                                  sc.block_size ? sc.block_size : cols);
            return matrices.size() - 1;
        };
        size_t embedding = matrix(V, H, 1.0f);
        std::vector<size_t> layer_matrices;
        for (int l = 0; l < L; l++) {
            LayerWeights lw;
            lw.rms_attn = add(H, 0.2f, 1.0f);
            lw.rms_ffn = add(H, 0.2f, 1.0f);
            weights.layers.push_back(lw);
            for (auto [rows, cols] : {std::pair<int, int>{NH * hd, H}, {KVH * hd, H}, {KVH * hd, H}, {H, NH * hd},
                                      {I, H}, {I, H}, {H, I}})
                layer_matrices.push_back(matrix(rows, cols, 0.1f));
        }
        weights.tok_embedding = weights.lm_head = matrices[embedding].view();  // tied head
        for (int l = 0; l < L; l++) {
            LayerWeights& lw = weights.layers[l];
            const size_t* m = layer_matrices.data() + 7 * l;
            lw.wq = matrices[m[0]].view(), lw.wk = matrices[m[1]].view(), lw.wv = matrices[m[2]].view();
            lw.wo = matrices[m[3]].view(), lw.w_gate = matrices[m[4]].view(), lw.w_up = matrices[m[5]].view();
            lw.w_down = matrices[m[6]].view();
        }
        weights.final_rms = add(H, 0.2f, 1.0f);
        // RoPE tables as the file stores them
        std::vector<float> cos_t((size_t)max_pos * hd), sin_t((size_t)max_pos * hd);
        for (int p = 0; p < max_pos; p++)
            for (int j = 0; j < hd; j++) {
                double inv_freq = 1.0 / std::pow(1e6, 2.0 * (j % (hd / 2)) / hd);
                cos_t[(size_t)p * hd + j] = (float)std::cos(p * inv_freq);
                sin_t[(size_t)p * hd + j] = (float)std::sin(p * inv_freq);
            }
        tensors.push_back(cos_t);
        weights.rope_cos = tensors.back().data();
        tensors.push_back(sin_t);
        weights.rope_sin = tensors.back().data();
    }
};

static void test_transformer(const KernelOps& k, StorageCase sc) {
    struct Case { int H, L, NH, KVH, I, V, B, S; };
    std::vector<Case> cases = {Case{72, 2, 6, 2, 100, 131, 3, 33}, Case{48, 1, 8, 8, 64, 97, 2, 3},
                               Case{36, 2, 6, 1, 96, 131, 1, 1}, Case{64, 2, 8, 2, 192, 128, 2, 17}};
    if (sc.dtype != DType::f32) cases = {cases[0], cases[3]};  // typed weights: two shapes are enough
    for (Case c : cases) {
        RandomModel m(c.H, c.L, c.NH, c.KVH, c.I, c.V, c.S + 4, sc);
        std::uniform_int_distribution<int64_t> token(0, c.V - 1);
        std::vector<int64_t> ids((size_t)c.B * c.S), mask((size_t)c.B * c.S, 1);
        for (auto& id : ids) id = token(g_rng);
        if (c.B > 1 && c.S > 2) mask[(size_t)(c.B - 1) * c.S] = mask[(size_t)(c.B - 1) * c.S + 1] = 0;  // left padding
        StepInput in;
        in.ids = ids.data(), in.B = c.B, in.T = c.S, in.mask = mask.data(), in.mask_rows = c.B, in.mask_cols = c.S;
        size_t n_logits = (size_t)c.B * c.S * c.V;
        std::string where = std::string(k.name) + " " + storage_name(sc) + " H,L,NH,KVH,I,V,B,S=" +
                            shape({c.H, c.L, c.NH, c.KVH, c.I, c.V, c.B, c.S});

        Transformer clear(m.config, m.weights, clear_kernel), model(m.config, m.weights, k);
        const float* clear_logits = clear.forward(in);
        std::vector<float> want(clear_logits, clear_logits + n_logits);
        const float* logits = model.forward(in);
        std::vector<float> got(logits, logits + n_logits);
        expect_close("logits " + where, got.data(), want.data(), n_logits, 2e-5);

        Intermediates captured;
        const float* with_capture = model.forward(in, &captured);
        expect_close("logits with capture " + where, with_capture, got.data(), n_logits, 1e-6);
        g_checks++;
        if (captured.size() != 3 + 12 * (size_t)c.L) {
            g_failures++;
            std::printf("FAIL capture %s: %zu intermediates\n", where.c_str(), captured.size());
        }

        // prefill S-1 tokens, then the last token through the KV cache
        if (c.S < 2) continue;
        StepInput prefill = in, last = in;
        std::vector<int64_t> ids_prefill, ids_last;
        for (int b = 0; b < c.B; b++) {
            ids_prefill.insert(ids_prefill.end(), ids.begin() + (size_t)b * c.S, ids.begin() + (size_t)b * c.S + c.S - 1);
            ids_last.push_back(ids[(size_t)b * c.S + c.S - 1]);
        }
        std::vector<int64_t> mask_prefill;
        for (int b = 0; b < c.B; b++)
            mask_prefill.insert(mask_prefill.end(), mask.begin() + (size_t)b * c.S, mask.begin() + (size_t)b * c.S + c.S - 1);
        prefill.ids = ids_prefill.data(), prefill.T = c.S - 1, prefill.mask = mask_prefill.data(), prefill.mask_cols = c.S - 1;
        last.ids = ids_last.data(), last.T = 1;
        model.forward(prefill);
        const float* step = model.step(last);
        for (int b = 0; b < c.B; b++) {
            const float* full = got.data() + ((size_t)b * c.S + c.S - 1) * c.V;
            expect_close("decode step " + where + " row " + std::to_string(b), step + (size_t)b * c.V, full, c.V, 1e-5);
        }
    }
}

int main() {
    std::vector<std::string> names = kernel_names();
    std::printf("kernels:");
    for (const std::string& n : names) std::printf(" %s", n.c_str());
    std::printf("; fast kernel ISA %s\n", fast_kernel_isa());
    test_half_conversions();
    test_bf16_conversions();
    test_dequantize();
    for (const std::string& name : names) {
        const KernelOps& k = find_kernel(name);
        if (&k != &clear_kernel) {  // each op against the clear one
            test_residual_rmsnorm(k);
            for (int threads : {1, 2, 3}) {
                set_num_threads(threads);
                test_rope_and_attention(k, threads);
                test_matmul(k, threads);
            }
        }
        set_num_threads(2);  // (the thread split does not depend on the dtype: test_matmul covers it)
        test_typed_matmul(k, 2);  // every kernel, typed weights against a double reference
        for (const StorageCase& sc : kStorageCases)  // decode against one forward; clear against itself
            test_transformer(k, sc);
    }
    bool unknown_refused = false;
    try {
        find_kernel("nope");
    } catch (const InputError&) {
        unknown_refused = true;
    }
    g_checks++;
    if (!unknown_refused) g_failures++, std::printf("FAIL find_kernel(\"nope\") did not throw\n");
    std::printf("%d passed, %d failed\n", g_checks - g_failures, g_failures);
    return g_failures ? 1 : 0;
}
