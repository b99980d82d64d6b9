#include "transformer.h"

#include <algorithm>
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

// The decoder over T new tokens per sequence at positions p0 .. p0+T-1. Reads cache
// positions 0 .. p0-1, writes p0 .. p0+T-1, and leaves the logits (B, T, V) in s.logits.
// Inputs are already checked and the buffers sized (Transformer::step).
static void transformer_forward(const Config& c, const Weights& w, RunState& s, const int64_t* ids,
                                 const int64_t* mask, int B, int T, int p0, Intermediates* capture) {
    int H = c.hidden_size, NH = c.num_heads, KVH = c.num_kv_heads, hd = c.head_dim;
    int I = c.intermediate_size, V = c.vocab_size;
    int rows = B * T;
    int q_dim = NH * hd, kv_dim = KVH * hd;
    float eps = (float)c.rms_norm_eps;  // the reference adds eps to an fp32 tensor
    int capacity = s.cache_capacity;
    size_t cache_layer_size = (size_t)B * capacity * kv_dim;  // floats per layer in each cache
    float *x = s.x.data(), *xb = s.xb.data(), *q = s.q.data(), *k = s.k.data(), *v = s.v.data();
    float *heads = s.heads.data(), *proj = s.proj.data(), *gate = s.gate.data(), *up = s.up.data();

    // token embedding: x = E[ids]
    embedding_forward(x, ids, w.tok_embedding, rows, H);
    record(capture, -1, "embedding", {B, T, H}, x);

    for (int l = 0; l < c.num_layers; l++) {
        const LayerWeights& lw = w.layers[l];
        float* key_cache = s.key_cache.data() + l * cache_layer_size;      // (B, capacity, KVH, hd)
        float* value_cache = s.value_cache.data() + l * cache_layer_size;  // (B, capacity, KVH, hd)

        // attention rmsnorm
        rmsnorm_forward(xb, x, lw.rms_attn, rows, H, eps);
        record(capture, l, "attn_norm", {B, T, H}, xb);

        // q, k, v projections
        matmul_forward(q, xb, lw.wq, rows, H, q_dim);
        matmul_forward(k, xb, lw.wk, rows, H, kv_dim);
        matmul_forward(v, xb, lw.wv, rows, H, kv_dim);

        // RoPE on queries and keys
        rope_forward(q, B, T, NH, hd, p0, w.rope_cos, w.rope_sin);
        rope_forward(k, B, T, KVH, hd, p0, w.rope_cos, w.rope_sin);
        record(capture, l, "q", {B, T, NH, hd}, q);
        record(capture, l, "k", {B, T, KVH, hd}, k);
        record(capture, l, "v", {B, T, KVH, hd}, v);

        // append this call's keys and values to the cache at positions p0 .. p0+T-1
        for (int b = 0; b < B; b++) {
            size_t cache_row = (size_t)b * capacity + p0;
            size_t new_row = (size_t)b * T;
            std::memcpy(key_cache + cache_row * kv_dim, k + new_row * kv_dim, sizeof(float) * T * kv_dim);
            std::memcpy(value_cache + cache_row * kv_dim, v + new_row * kv_dim, sizeof(float) * T * kv_dim);
        }

        // attention of every query head over the cached and new keys
        attention_forward(heads, q, key_cache, value_cache, mask, s.scores.data(), B, T, p0, NH,
                          KVH, hd, capacity);
        record(capture, l, "attn_heads", {B, T, NH, hd}, heads);

        // output projection of the concatenated heads
        matmul_forward(proj, heads, lw.wo, rows, q_dim, H);
        record(capture, l, "attn_out", {B, T, H}, proj);

        // residual
        residual_forward(x, proj, (int64_t)rows * H);
        record(capture, l, "attn_residual", {B, T, H}, x);

        // feed-forward rmsnorm
        rmsnorm_forward(xb, x, lw.rms_ffn, rows, H, eps);
        record(capture, l, "ffn_norm", {B, T, H}, xb);

        // gate and up projections
        matmul_forward(gate, xb, lw.w_gate, rows, H, I);
        matmul_forward(up, xb, lw.w_up, rows, H, I);
        record(capture, l, "gate", {B, T, I}, gate);
        record(capture, l, "up", {B, T, I}, up);

        // SwiGLU, then the down projection
        swiglu_forward(gate, gate, up, (int64_t)rows * I);
        matmul_forward(proj, gate, lw.w_down, rows, I, H);
        record(capture, l, "ffn_out", {B, T, H}, proj);

        // residual
        residual_forward(x, proj, (int64_t)rows * H);
        record(capture, l, "residual", {B, T, H}, x);
    }

    // final rmsnorm
    rmsnorm_forward(xb, x, w.final_rms, rows, H, eps);
    record(capture, -1, "final_norm", {B, T, H}, xb);

    // classifier into logits (tied: lm_head is the token embedding)
    matmul_forward(s.logits.data(), xb, w.lm_head, rows, H, V);
    record(capture, -1, "logits", {B, T, V}, s.logits.data());
}

Transformer::Transformer(const Config& config, const Weights& weights)
    : config_(config), weights_(weights) {}

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
    s.gate.assign(n * c.intermediate_size, 0.0f);
    s.up.assign(n * c.intermediate_size, 0.0f);
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
    size_t kv_dim = (size_t)c.num_kv_heads * c.head_dim;
    size_t sequences = (size_t)c.num_layers * B;  // (layer, sequence) slabs of each cache
    std::vector<float> keys(sequences * capacity * kv_dim), values(sequences * capacity * kv_dim);
    for (size_t i = 0; i < sequences && cache_len_ > 0; i++) {
        size_t old_slab = i * s.cache_capacity * kv_dim, new_slab = i * capacity * kv_dim;
        size_t bytes = sizeof(float) * cache_len_ * kv_dim;
        std::memcpy(keys.data() + new_slab, s.key_cache.data() + old_slab, bytes);
        std::memcpy(values.data() + new_slab, s.value_cache.data() + old_slab, bytes);
    }
    s.key_cache = std::move(keys);
    s.value_cache = std::move(values);
    s.scores.assign((size_t)B * c.num_heads * capacity, 0.0f);
    s.cache_capacity = capacity;
}

const float* Transformer::step(const StepInput& in, Intermediates* capture) {
    check_input(in, cache_len_);
    int B = (int)in.B, T = (int)in.T;
    reserve_rows(B * T);
    reserve_cache(B, cache_len_ + T);
    if (capture) capture->clear();
    transformer_forward(config_, weights_, state_, in.ids, in.mask, B, T, cache_len_, capture);
    cache_len_ += T;
    return state_.logits.data();
}

const float* Transformer::forward(const StepInput& in, Intermediates* capture) {
    check_input(in, 0);  // before the reset, so a rejected call keeps the cache
    reset_cache();
    return step(in, capture);
}

}  // namespace xvalid
