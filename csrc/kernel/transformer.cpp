#include "transformer.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstring>
#include <initializer_list>

#include "ops.h"

namespace xvalid {

// Copies `buffer`'s first prod(shape) floats into the capture as "name" (layer < 0) or
// "layer{l}.name". Without a capture this is one branch: nothing is formatted or copied.
static void record(Intermediates* capture, int layer, const char* name,
                   std::initializer_list<int64_t> shape, const float* buffer) {
    if (!capture) return;
    Intermediate t;
    t.name = layer < 0 ? name : "layer" + std::to_string(layer) + "." + name;
    t.shape = shape;
    int64_t numel = 1;
    for (int64_t d : shape) numel *= d;
    t.data.assign(buffer, buffer + numel);
    capture->push_back(std::move(t));
}

// Calls the kernel's ops, timing each under its profile name when profiling is on. The
// floating-point operations and bytes are the op's nominal work, for GFLOP/s and GB/s.
class OpRunner {
public:
    OpRunner(const KernelOps& ops, Profile& profile) : ops_(ops), profile_(profile) {}

    void embedding(float* out, const int64_t* ids, const WeightMatrix& table, int rows, int H) {
        double row_bytes = table.bytes() / table.rows;  // the rows read, stored; float32 written
        timed(Op::embedding, 0, rows * (row_bytes + 4.0 * H), [&] { ops_.embedding(out, ids, table, rows); });
    }
    void residual_rmsnorm(float* x, const float* delta, const float* w, float* out, int rows, int n,
                          float eps) {
        double bytes = 4.0 * rows * n * (delta ? 4 : 2);
        timed(Op::rmsnorm, 5.0 * rows * n, bytes,
              [&] { ops_.residual_rmsnorm(x, delta, w, out, rows, n, eps); });
    }
    // out (rows, d) = x (rows, n) W^T; W is (d, n), its bytes as stored.
    void matmul(Op op, float* out, const float* x, const WeightMatrix& w, int rows, int n, int d) {
        double bytes = w.bytes() + 4.0 * ((double)rows * n + (double)rows * d);
        timed(op, 2.0 * rows * n * d, bytes, [&] { ops_.matmul(out, x, w, rows); });
    }
    void matmul_swiglu(float* out, const float* x, const WeightMatrix& wg, const WeightMatrix& wu, int rows,
                       int n, int d, float* gate, float* up) {
        double bytes = wg.bytes() + wu.bytes() + 4.0 * ((double)rows * n + (double)rows * d);
        timed(Op::gate_up_swiglu, 4.0 * rows * n * d, bytes,
              [&] { ops_.matmul_swiglu(out, x, wg, wu, rows, gate, up); });
    }
    void rope_append_kv(float* q, float* k, const float* v, float* kc, float* vc, int B, int T, int NH,
                        int KVH, int hd, int p0, int capacity, const float* cos_t, const float* sin_t) {
        double values = (double)B * T * hd;
        timed(Op::rope, 3.0 * values * (NH + KVH), 4.0 * values * (2 * NH + 4 * KVH + 2), [&] {
            ops_.rope_append_kv(q, k, v, kc, vc, B, T, NH, KVH, hd, p0, capacity, cos_t, sin_t);
        });
    }
    void attention(float* out, const float* q, const float* kc, const float* vc, const int64_t* mask,
                   int B, int T, int p0, int NH, int KVH, int hd, int capacity) {
        // query i sees p0 + i + 1 keys: q.k and p.v are 2 * hd flops each per (query, key)
        double pairs = (double)B * NH * ((double)T * p0 + (double)T * (T + 1) / 2);
        double bytes = 4.0 * ((double)B * KVH * (p0 + T) * hd * 2 + 2.0 * B * T * NH * hd);
        timed(Op::attention, 4.0 * hd * pairs, bytes, [&] {
            ops_.attention(out, q, kc, vc, mask, B, T, p0, NH, KVH, hd, capacity);
        });
    }

private:
    template <class F>
    void timed(Op op, double flops, double bytes, F&& run) {
        if (!profile_.enabled) {
            run();
            return;
        }
        auto start = std::chrono::steady_clock::now();
        run();
        std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
        profile_.add(op, elapsed.count(), flops, bytes);
    }

    const KernelOps& ops_;
    Profile& profile_;
};

// The decoder over T new tokens per sequence at positions p0 .. p0+T-1. Reads cache
// positions 0 .. p0-1, writes p0 .. p0+T-1, and leaves the logits (B, T, V) in s.logits.
// Inputs are already checked and the buffers sized (Transformer::step).
static void transformer_forward(const Config& c, const Weights& w, RunState& s, OpRunner& op,
                                const int64_t* ids, const int64_t* mask, int B, int T, int p0,
                                Intermediates* capture) {
    int H = c.hidden_size, NH = c.num_heads, KVH = c.num_kv_heads, hd = c.head_dim;
    int I = c.intermediate_size, V = c.vocab_size;
    int rows = B * T;
    int q_dim = NH * hd, kv_dim = KVH * hd;
    float eps = (float)c.rms_norm_eps;  // the reference adds eps to an fp32 tensor
    int capacity = s.cache_capacity;
    size_t cache_layer_size = (size_t)B * capacity * kv_dim;  // floats per layer in each cache
    float *x = s.x.data(), *xb = s.xb.data(), *q = s.q.data(), *k = s.k.data(), *v = s.v.data();
    float *heads = s.heads.data(), *proj = s.proj.data(), *ffn = s.ffn.data();
    float* gate = capture ? s.gate.data() : nullptr;  // the fused SwiGLU keeps gate and up
    float* up = capture ? s.up.data() : nullptr;      // only when they are captured

    // token embedding: x = E[ids]
    op.embedding(x, ids, w.tok_embedding, rows, H);
    record(capture, -1, "embedding", {B, T, H}, x);

    for (int l = 0; l < c.num_layers; l++) {
        const LayerWeights& lw = w.layers[l];
        float* key_cache = s.key_cache.data() + l * cache_layer_size;      // (B, KVH, capacity, hd)
        float* value_cache = s.value_cache.data() + l * cache_layer_size;  // (B, KVH, capacity, hd)

        // residual (the previous layer's feed-forward output), then the attention rmsnorm
        op.residual_rmsnorm(x, l > 0 ? proj : nullptr, lw.rms_attn, xb, rows, H, eps);
        if (l > 0) record(capture, l - 1, "residual", {B, T, H}, x);
        record(capture, l, "attn_norm", {B, T, H}, xb);

        // q, k, v projections
        op.matmul(Op::q_proj, q, xb, lw.wq, rows, H, q_dim);
        op.matmul(Op::k_proj, k, xb, lw.wk, rows, H, kv_dim);
        op.matmul(Op::v_proj, v, xb, lw.wv, rows, H, kv_dim);

        // RoPE on queries and keys; keys and values appended to the cache at p0 .. p0+T-1
        op.rope_append_kv(q, k, v, key_cache, value_cache, B, T, NH, KVH, hd, p0, capacity,
                          w.rope_cos, w.rope_sin);
        record(capture, l, "q", {B, T, NH, hd}, q);
        record(capture, l, "k", {B, T, KVH, hd}, k);
        record(capture, l, "v", {B, T, KVH, hd}, v);

        // attention of every query head over the cached and new keys
        op.attention(heads, q, key_cache, value_cache, mask, B, T, p0, NH, KVH, hd, capacity);
        record(capture, l, "attn_heads", {B, T, NH, hd}, heads);

        // output projection of the concatenated heads
        op.matmul(Op::o_proj, proj, heads, lw.wo, rows, q_dim, H);
        record(capture, l, "attn_out", {B, T, H}, proj);

        // residual, then the feed-forward rmsnorm
        op.residual_rmsnorm(x, proj, lw.rms_ffn, xb, rows, H, eps);
        record(capture, l, "attn_residual", {B, T, H}, x);
        record(capture, l, "ffn_norm", {B, T, H}, xb);

        // gate and up projections with SwiGLU, then the down projection
        op.matmul_swiglu(ffn, xb, lw.w_gate, lw.w_up, rows, H, I, gate, up);
        record(capture, l, "gate", {B, T, I}, gate);
        record(capture, l, "up", {B, T, I}, up);
        op.matmul(Op::down_proj, proj, ffn, lw.w_down, rows, I, H);
        record(capture, l, "ffn_out", {B, T, H}, proj);
    }

    // residual (the last layer's feed-forward output), then the final rmsnorm
    op.residual_rmsnorm(x, proj, w.final_rms, xb, rows, H, eps);
    record(capture, c.num_layers - 1, "residual", {B, T, H}, x);
    record(capture, -1, "final_norm", {B, T, H}, xb);

    // classifier into logits (tied: lm_head is the token embedding)
    op.matmul(Op::head, s.logits.data(), xb, w.lm_head, rows, H, V);
    record(capture, -1, "logits", {B, T, V}, s.logits.data());
}

// Every matrix must have the shape the config gives it (the loader makes sure; a hand-made
// Weights might not), and an int8 one a block size and scales.
static void check_matrix(const WeightMatrix& w, const std::string& name, int rows, int cols) {
    auto fail = [&](const std::string& what) { throw InputError("weight matrix " + name + ": " + what); };
    if (!w.data) fail("no data");
    if (w.rows != rows || w.cols != cols) {
        fail("shape (" + std::to_string(w.rows) + ", " + std::to_string(w.cols) + "), expected (" +
             std::to_string(rows) + ", " + std::to_string(cols) + ")");
    }
    if (w.dtype == DType::q8 && (!w.scales || w.block_size < 1 || w.block_size > cols)) {
        fail("int8 needs scales and a block size in [1, " + std::to_string(cols) + "]");
    }
}

Transformer::Transformer(const Config& config, const Weights& weights, const KernelOps& kernel)
    : config_(config), weights_(weights), kernel_(kernel) {
    const Config& c = config;
    int H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
    int q_dim = c.num_heads * c.head_dim, kv_dim = c.num_kv_heads * c.head_dim;
    if ((int)weights.layers.size() != c.num_layers) {
        throw InputError("weights hold " + std::to_string(weights.layers.size()) + " layers, the config " +
                         std::to_string(c.num_layers));
    }
    check_matrix(weights.tok_embedding, "tok_embedding", V, H);
    check_matrix(weights.lm_head, "lm_head", V, H);
    for (int l = 0; l < c.num_layers; l++) {
        const LayerWeights& lw = weights.layers[l];
        std::string at = "layers[" + std::to_string(l) + "].";
        check_matrix(lw.wq, at + "wq", q_dim, H);
        check_matrix(lw.wk, at + "wk", kv_dim, H);
        check_matrix(lw.wv, at + "wv", kv_dim, H);
        check_matrix(lw.wo, at + "wo", H, q_dim);
        check_matrix(lw.w_gate, at + "w_gate", I, H);
        check_matrix(lw.w_up, at + "w_up", I, H);
        check_matrix(lw.w_down, at + "w_down", H, I);
    }
}

// Every check happens before anything changes, so a rejected call leaves the cache intact.
void Transformer::check_input(const StepInput& in, int p0) const {
    auto shape = [](int64_t rows, int64_t cols) {
        return "(" + std::to_string(rows) + ", " + std::to_string(cols) + ")";
    };
    const Config& c = config_;
    if (!in.ids || in.B < 1 || in.T < 1) {
        throw InputError("input_ids must have shape (B, T) with B, T >= 1, got " + shape(in.B, in.T));
    }
    if (in.B > INT_MAX / in.T) throw InputError("input_ids shape " + shape(in.B, in.T) + " is too large");
    if (p0 > 0 && in.B != state_.cache_batch) {
        throw InputError("batch size " + std::to_string(in.B) + " does not match the KV cache's " +
                         std::to_string(state_.cache_batch) + " (reset the cache to start a new batch)");
    }
    if (in.T > c.max_position_embeddings - p0) {
        throw InputError(std::to_string(p0) + " cached + " + std::to_string(in.T) +
                         " new tokens exceed max_position_embeddings = " +
                         std::to_string(c.max_position_embeddings));
    }
    int64_t n_keys = p0 + in.T;
    if (in.mask && (in.mask_rows != in.B || in.mask_cols != n_keys)) {
        throw InputError("attention_mask has shape " + shape(in.mask_rows, in.mask_cols) + ", expected " +
                         shape(in.B, n_keys) + " (" + std::to_string(p0) + " cached + " +
                         std::to_string(in.T) + " new tokens)");
    }
    for (int64_t b = 0; b < in.B; b++) {
        for (int64_t t = 0; t < in.T; t++) {
            int64_t id = in.ids[b * in.T + t];
            if (id < 0 || id >= c.vocab_size) {
                throw InputError("input_ids[batch " + std::to_string(b) + ", position " +
                                 std::to_string(t) + "] = " + std::to_string(id) +
                                 " is out of range [0, " + std::to_string(c.vocab_size) + ")");
            }
        }
    }
    if (!in.mask) return;
    for (int64_t b = 0; b < in.B; b++) {
        for (int64_t j = 0; j < n_keys; j++) {
            int64_t m = in.mask[b * n_keys + j];
            if (m != 0 && m != 1) {
                throw InputError("attention_mask[batch " + std::to_string(b) + ", key " +
                                 std::to_string(j) + "] = " + std::to_string(m) + " is not 0 or 1");
            }
        }
    }
}

void Transformer::reserve_rows(int rows) {
    RunState& s = state_;
    if (rows <= s.row_capacity) return;
    const Config& c = config_;
    size_t n = rows;
    s.x.assign(n * c.hidden_size, 0.0f);
    s.xb.assign(n * c.hidden_size, 0.0f);
    s.q.assign(n * c.num_heads * c.head_dim, 0.0f);
    s.k.assign(n * c.num_kv_heads * c.head_dim, 0.0f);
    s.v.assign(n * c.num_kv_heads * c.head_dim, 0.0f);
    s.heads.assign(n * c.num_heads * c.head_dim, 0.0f);
    s.proj.assign(n * c.hidden_size, 0.0f);
    s.ffn.assign(n * c.intermediate_size, 0.0f);
    s.gate.clear();  // sized by step() only when a call captures
    s.up.clear();
    s.logits.assign(n * c.vocab_size, 0.0f);
    s.row_capacity = rows;
}

// Makes room for n_positions per sequence, keeping the cache_len_ positions already
// cached. Capacity at least doubles when it grows (capped at max_position_embeddings),
// so token-by-token decoding copies the cache O(log n) times, not n times.
void Transformer::reserve_cache(int B, int n_positions) {
    RunState& s = state_;
    const Config& c = config_;
    if (B != s.cache_batch) {  // a new batch layout; check_input allows it only with an empty cache
        s.cache_batch = B;
        s.cache_capacity = 0;
    }
    if (n_positions <= s.cache_capacity) return;
    int capacity = std::min(c.max_position_embeddings, std::max(n_positions, 2 * s.cache_capacity));
    size_t hd = c.head_dim;
    size_t slabs = (size_t)c.num_layers * B * c.num_kv_heads;  // (layer, sequence, kv head) slabs
    std::vector<float> keys(slabs * capacity * hd), values(slabs * capacity * hd);
    for (size_t i = 0; i < slabs && cache_len_ > 0; i++) {
        size_t old_slab = i * s.cache_capacity * hd, new_slab = i * capacity * hd;
        size_t bytes = sizeof(float) * cache_len_ * hd;
        std::memcpy(keys.data() + new_slab, s.key_cache.data() + old_slab, bytes);
        std::memcpy(values.data() + new_slab, s.value_cache.data() + old_slab, bytes);
    }
    s.key_cache = std::move(keys);
    s.value_cache = std::move(values);
    s.cache_capacity = capacity;
}

const float* Transformer::step(const StepInput& in, Intermediates* capture) {
    check_input(in, cache_len_);
    int B = (int)in.B, T = (int)in.T;
    reserve_rows(B * T);
    reserve_cache(B, cache_len_ + T);
    if (capture) {
        capture->clear();
        size_t gate_size = (size_t)B * T * config_.intermediate_size;  // gate and up are kept only
        if (state_.gate.size() < gate_size) {                          // when they are captured
            state_.gate.resize(gate_size);
            state_.up.resize(gate_size);
        }
    }
    OpRunner op(kernel_, profile_);
    transformer_forward(config_, weights_, state_, op, in.ids, in.mask, B, T, cache_len_, capture);
    cache_len_ += T;
    return state_.logits.data();
}

const float* Transformer::forward(const StepInput& in, Intermediates* capture) {
    check_input(in, 0);  // before the reset, so a rejected call keeps the cache
    reset_cache();
    return step(in, capture);
}

}  // namespace xvalid
