// The Llama/MiniMind2 decoder in plain C++ (semantics: docs/model.md).
//
// Three structs make the architecture visible: Config (hyperparameters), Weights
// (borrowed pointers to the tensors, each with its shape), RunState (activation
// buffers and the KV cache). Transformer ties them together with a kernel, the table of
// ops it computes with (kernels.h: "fast" by default, or "clear"): step() appends T
// tokens per sequence to the KV cache and returns their logits, so prefill and
// decode are the same code path; forward() is reset_cache() + step().
//
// Dimensions: B = batch, T = new tokens in this call, p0 = tokens already in the
// cache, H = hidden, L = layers, NH/KVH = query/key-value heads, hd = head_dim,
// I = intermediate size, V = vocab.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "errors.h"
#include "kernels.h"
#include "profile.h"

namespace xvalid {

struct Config {
    int hidden_size;              // H, width of the residual stream
    int num_layers;               // L, decoder layers
    int num_heads;                // NH, query heads
    int num_kv_heads;             // KVH, key/value heads; NH % KVH == 0 (grouped-query attention)
    int head_dim;                 // hd, usually H / NH; even, since RoPE rotates two halves
    int intermediate_size;        // I, hidden width of the SwiGLU feed-forward
    int vocab_size;               // V
    int max_position_embeddings;  // rows of the RoPE tables: the longest sequence, cache included
    double rms_norm_eps;          // added (in fp32, like the reference) to mean(x^2) in every rmsnorm
    double rope_theta;            // RoPE base; informational, the kernel uses the file's tables
};

// Weight matrices are typed views (dtype.h): float32, float16, bfloat16 or int8 with block
// scales, converted by the kernel's ops as they read them. The norm weights are float32 (a
// loader upcasts a half-precision file's vectors: they are tiny).
struct LayerWeights {
    const float* rms_attn;  // (H) attention rmsnorm weight
    WeightMatrix wq;        // (NH*hd, H)
    WeightMatrix wk;        // (KVH*hd, H)
    WeightMatrix wv;        // (KVH*hd, H)
    WeightMatrix wo;        // (H, NH*hd)
    const float* rms_ffn;   // (H) feed-forward rmsnorm weight
    WeightMatrix w_gate;    // (I, H)
    WeightMatrix w_up;      // (I, H)
    WeightMatrix w_down;    // (H, I)
};

// Borrowed: whoever fills these (the model-file loader) owns the memory.
struct Weights {
    WeightMatrix tok_embedding;        // (V, H)
    std::vector<LayerWeights> layers;  // (L)
    const float* final_rms;            // (H)
    WeightMatrix lm_head;              // (V, H); tied models: the same view as tok_embedding
    // RoPE tables as stored in the file, not recomputed: tables computed in numpy and
    // in torch differ by up to 6e-8, and the reference uses the file's.
    const float* rope_cos;             // (max_pos, hd)
    const float* rope_sin;             // (max_pos, hd)
};

// Activation buffers for rows = B*T token rows, grown (never shrunk) when a call needs
// more rows, and the KV cache, grown when it needs more positions.
struct RunState {
    int row_capacity = 0;       // token rows the activation buffers hold
    std::vector<float> x;       // (rows, H) residual stream
    std::vector<float> xb;      // (rows, H) rmsnorm output: the input of a sublayer or of the head
    std::vector<float> q;       // (rows, NH*hd) queries, after RoPE
    std::vector<float> k;       // (rows, KVH*hd) this call's keys, after RoPE (copied into the cache)
    std::vector<float> v;       // (rows, KVH*hd) this call's values
    std::vector<float> heads;   // (rows, NH*hd) per-head attention outputs, head-major
    std::vector<float> proj;    // (rows, H) sublayer output (attn_out, then ffn_out) before the residual add
    std::vector<float> ffn;     // (rows, I) silu(m Wgate^T) * (m Wup^T), the down projection's input
    std::vector<float> gate;    // (rows, I) m Wgate^T, allocated and kept only when capturing
    std::vector<float> up;      // (rows, I) m Wup^T, likewise
    std::vector<float> logits;  // (rows, V)
    // KV cache: keys after RoPE, for positions 0 .. cache_len-1 of every sequence.
    int cache_batch = 0;        // B the cache is laid out for
    int cache_capacity = 0;     // positions per sequence; at most max_position_embeddings
    // Each (layer, sequence, kv head) owns `capacity` contiguous rows of hd floats, so the
    // query heads that share a kv head read its keys and values as one contiguous block.
    std::vector<float> key_cache;    // (L, B, KVH, capacity, hd)
    std::vector<float> value_cache;  // (L, B, KVH, capacity, hd)
};

// One call's tokens. Ids and mask are int64, like torch's LongTensor, so callers convert
// any integer array to them without loss and a bad value is reported exactly as given.
struct StepInput {
    const int64_t* ids = nullptr;   // (B, T) token ids in [0, V)
    int64_t B = 0;
    int64_t T = 0;
    // (mask_rows, mask_cols), which must be (B, cache_len + T): every key the new tokens
    // see, the cached ones then the new ones. 1 = attend, 0 = padding. nullptr = all ones.
    const int64_t* mask = nullptr;
    int64_t mask_rows = 0;
    int64_t mask_cols = 0;
};

// A captured intermediate (docs/intermediates.md): "layer0.q" with shape (B, T, NH, hd), ...
struct Intermediate {
    std::string name;
    std::vector<int64_t> shape;
    std::vector<float> data;  // C order
};
using Intermediates = std::vector<Intermediate>;  // in forward order

class Transformer {
public:
    // Borrows the weights: they must outlive the Transformer. The config must be valid
    // (the loader checks it). `kernel`: find_kernel("fast"), find_kernel("clear"), ...
    Transformer(const Config& config, const Weights& weights, const KernelOps& kernel = fast_kernel);

    const Config& config() const { return config_; }
    const KernelOps& kernel() const { return kernel_; }
    int cache_len() const { return cache_len_; }  // p0: positions already in the KV cache
    void reset_cache() { cache_len_ = 0; }

    // Appends in.T tokens per sequence to the KV cache at positions p0 .. p0+T-1
    // (absolute: padding does not shift them) and returns their logits (B, T, V),
    // valid until the next call. With capture, fills *capture (cleared first) with the
    // named intermediates of docs/intermediates.md; without, they cost nothing.
    // Throws InputError, leaving the cache as it was, for a bad input.
    const float* step(const StepInput& in, Intermediates* capture = nullptr);

    // The whole sequence from an empty cache: reset_cache() + step().
    const float* forward(const StepInput& in, Intermediates* capture = nullptr);

    // Per-op timers (profile.h): off by default and free when off.
    void set_profiling(bool on) { profile_.enabled = on; }
    const Profile& profile() const { return profile_; }
    void reset_profile() { profile_.reset(); }

private:
    void check_input(const StepInput& in, int p0) const;
    void reserve_rows(int rows);
    void reserve_cache(int B, int n_positions);

    Config config_;
    Weights weights_;
    const KernelOps& kernel_;
    RunState state_;
    Profile profile_;
    int cache_len_ = 0;
};

}  // namespace xvalid
