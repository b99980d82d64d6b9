#include "forward_memory.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <unistd.h>

#include "model_file.h"

namespace xvalid {

constexpr double kMiB = 1024.0 * 1024.0;
constexpr double kLimitWithoutSysconf = 16384;  // MiB, when the machine's memory is unknown
constexpr const char* kLimitVariable = "XVALID_MEMORY_LIMIT_MB";

// The operations and their order match memory.py's, so both print the same figure.
double forward_memory_bytes(const Config& c, int64_t B, int64_t T, int64_t P, bool intermediates) {
    int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size, L = c.num_layers, NH = c.num_heads;
    int64_t q_dim = NH * c.head_dim, kv_dim = (int64_t)c.num_kv_heads * c.head_dim;
    double rows = (double)B * (double)T;
    // RunState's buffers per row: x, xb, proj (H); q, heads (q_dim); k, v (kv_dim); gate,
    // up (I); logits (V); plus the copy of the logits handed to the caller (V)
    double floats = rows * (double)(3 * H + 2 * q_dim + 2 * kv_dim + 2 * I + 2 * V);
    floats += 2.0 * L * B * P * kv_dim;   // keys and values of every layer and position
    floats += (double)B * NH * T * P;     // attention scores
    if (intermediates) {  // embedding, final_norm (H) and logits (V); per layer 6 of width H, q, heads, k, v, gate, up
        floats += rows * (double)(2 * H + V + L * (6 * H + 2 * q_dim + 2 * kv_dim + 2 * I));
    }
    return 4.0 * floats;
}

// XVALID_MEMORY_LIMIT_MB's value, or 0 when it is unset or empty.
static double limit_from_environment() {
    const char* text = std::getenv(kLimitVariable);
    if (!text || !*text) return 0;
    size_t n = std::strlen(text);
    bool digits = n <= 15 && std::strspn(text, "0123456789") == n;
    double mib = digits ? std::strtod(text, nullptr) : 0;
    if (mib < 1) {
        std::string shown = n <= 40 ? text : std::string(text, 37) + "...";
        throw ModelFileError(std::string(kLimitVariable) + ": expected a whole number of MiB (1 or more), found '" +
                             shown + "'");
    }
    return mib;
}

static double half_the_machine_mib() {
    long pages = sysconf(_SC_PHYS_PAGES), page_size = sysconf(_SC_PAGESIZE);
    if (pages <= 0 || page_size <= 0) return kLimitWithoutSysconf;
    return std::floor((double)pages * (double)page_size / 2 / kMiB);
}

struct Limit {
    double mib;
    bool from_environment;
};

static Limit current_limit() {
    double from_environment = limit_from_environment();
    return from_environment > 0 ? Limit{from_environment, true} : Limit{half_the_machine_mib(), false};
}

double memory_limit_mib() { return current_limit().mib; }

std::string forward_memory_problem(const Config& c, int64_t B, int64_t T, int64_t P, bool intermediates) {
    double needed_mib = std::ceil(forward_memory_bytes(c, B, T, P, intermediates) / kMiB);
    Limit limit = current_limit();
    if (needed_mib <= limit.mib) return "";
    char text[400];
    std::snprintf(text, sizeof text,
                  "needs about %.0f MiB of working memory (activations, KV cache, attention scores, logits%s), "
                  "above the limit of %.0f MiB (%s)",
                  needed_mib, intermediates ? ", intermediates" : "", limit.mib,
                  limit.from_environment ? "set by XVALID_MEMORY_LIMIT_MB"
                                   : "half of this machine's memory; XVALID_MEMORY_LIMIT_MB sets another");
    return text;
}

}  // namespace xvalid
