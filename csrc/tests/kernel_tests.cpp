// xvalid-kernel-tests: every op of every kernel against the clear kernel, over shapes chosen to
// hit tile edges (sizes that are not multiples of the SIMD width or of a tile), grouped-query
// ratios, padding masks, a KV cache already holding positions, and 1 to 3 threads; then whole
// Transformers on random weights: fast against clear, prefill + decode against one forward,
// capture against no capture. Run by ctest, and under ASan + UBSan by scripts/sanitize.sh.
// XVALID_ISA=portable tests the portable fallback. Exit status 0 when every check passes.
#include <algorithm>
#include <cmath>
#include <cstdio>
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
                clear_kernel.matmul(want.data(), x.data(), w.data(), M, K, N);
                k.matmul(got.data(), x.data(), w.data(), M, K, N);
                expect_close("matmul " + where, got.data(), want.data(), want.size(), tol);
                clear_kernel.matmul_swiglu(want_f.data(), x.data(), w.data(), wu.data(), M, K, N, nullptr, nullptr);
                k.matmul_swiglu(got_f.data(), x.data(), w.data(), wu.data(), M, K, N, nullptr, nullptr);
                expect_close("matmul_swiglu " + where, got_f.data(), want_f.data(), want_f.size(), 2 * tol);
                // with capture: gate and up as matmul computes them, the same SwiGLU output
                k.matmul_swiglu(want_f.data(), x.data(), w.data(), wu.data(), M, K, N, gate.data(), up.data());
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
struct RandomModel {
    Config config;
    std::vector<std::vector<float>> tensors;
    Weights weights;

    RandomModel(int H, int L, int NH, int KVH, int I, int V, int max_pos) {
        config = {H, L, NH, KVH, H / NH, I, V, max_pos, 1e-5, 1e6};
        int hd = H / NH;
        auto add = [&](size_t n, float scale, float mean = 0) {
            tensors.push_back(randn(n, scale));
            for (float& x : tensors.back()) x += mean;
            return tensors.back().data();
        };
        weights.tok_embedding = add((size_t)V * H, 1.0f);
        for (int l = 0; l < L; l++) {
            LayerWeights lw;
            lw.rms_attn = add(H, 0.2f, 1.0f);
            lw.wq = add((size_t)NH * hd * H, 0.1f);
            lw.wk = add((size_t)KVH * hd * H, 0.1f);
            lw.wv = add((size_t)KVH * hd * H, 0.1f);
            lw.wo = add((size_t)H * NH * hd, 0.1f);
            lw.rms_ffn = add(H, 0.2f, 1.0f);
            lw.w_gate = add((size_t)I * H, 0.1f);
            lw.w_up = add((size_t)I * H, 0.1f);
            lw.w_down = add((size_t)H * I, 0.1f);
            weights.layers.push_back(lw);
        }
        weights.final_rms = add(H, 0.2f, 1.0f);
        weights.lm_head = weights.tok_embedding;
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

static void test_transformer(const KernelOps& k) {
    struct Case { int H, L, NH, KVH, I, V, B, S; };
    for (Case c : {Case{72, 2, 6, 2, 100, 131, 3, 33}, Case{48, 1, 8, 8, 64, 97, 2, 3},
                   Case{36, 2, 6, 1, 96, 131, 1, 1}, Case{64, 2, 8, 2, 192, 128, 2, 17}}) {
        RandomModel m(c.H, c.L, c.NH, c.KVH, c.I, c.V, c.S + 4);
        std::uniform_int_distribution<int64_t> token(0, c.V - 1);
        std::vector<int64_t> ids((size_t)c.B * c.S), mask((size_t)c.B * c.S, 1);
        for (auto& id : ids) id = token(g_rng);
        if (c.B > 1 && c.S > 2) mask[(size_t)(c.B - 1) * c.S] = mask[(size_t)(c.B - 1) * c.S + 1] = 0;  // left padding
        StepInput in;
        in.ids = ids.data(), in.B = c.B, in.T = c.S, in.mask = mask.data(), in.mask_rows = c.B, in.mask_cols = c.S;
        size_t n_logits = (size_t)c.B * c.S * c.V;
        std::string where = std::string(k.name) + " H,L,NH,KVH,I,V,B,S=" +
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
        set_num_threads(2);
        test_transformer(k);  // every kernel: decode against one forward; clear against itself
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
