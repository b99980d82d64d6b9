// The fast kernel's op table (kernels.h), and the registry of kernels by name.
//
// Each op is dispatched to the AVX2/FMA build of the code or the portable one, following the
// matrix multiply's choice (matmul.cpp: CPUID, or XVALID_ISA=portable), made once per process:
// one predictable branch per op call.
#include <cstring>
#include <string>

#include "../kernels.h"
#include "../ops.h"
#include "matmul.h"
#include "simd_ops.h"

namespace xvalid {
namespace fast {

#ifdef XVALID_HAVE_AVX2  // CMake built the avx2 copy of simd_ops.cpp
static bool isa_avx2() {
    static const bool avx2 = std::strcmp(matmul_isa(), "avx2+fma") == 0;
    return avx2;
}
#define XVALID_DISPATCH(fn, ...) (isa_avx2() ? avx2::fn(__VA_ARGS__) : portable::fn(__VA_ARGS__))
#else
#define XVALID_DISPATCH(fn, ...) portable::fn(__VA_ARGS__)
#endif

static void residual_rmsnorm(float* x, const float* delta, const float* weight, float* out, int rows,
                             int n, float eps) {
    XVALID_DISPATCH(residual_rmsnorm, x, delta, weight, out, rows, n, eps);
}

static void matmul(float* out, const float* x, const WeightMatrix& w, int rows) {
    matmul_nt(out, x, w, rows, nullptr, nullptr, false, get_num_threads());
}

// Always the fused pass, so capturing changes no result; when gate and up are asked for
// (capture), they are computed again by two plain matmuls, the same products.
static void matmul_swiglu(float* out, const float* x, const WeightMatrix& w_gate, const WeightMatrix& w_up,
                          int rows, float* gate, float* up) {
    int threads = get_num_threads();
    matmul_nt_swiglu(out, x, w_gate, w_up, rows, nullptr, nullptr, threads);
    if (gate && up) {
        matmul_nt(gate, x, w_gate, rows, nullptr, nullptr, false, threads);
        matmul_nt(up, x, w_up, rows, nullptr, nullptr, false, threads);
    }
}

static void rope_append_kv(float* q, float* k, const float* v, float* key_cache, float* value_cache,
                           int B, int T, int NH, int KVH, int hd, int p0, int capacity,
                           const float* cos_table, const float* sin_table) {
    XVALID_DISPATCH(rope_append_kv, q, k, v, key_cache, value_cache, B, T, NH, KVH, hd, p0, capacity,
                    cos_table, sin_table);
}

static void attention(float* out, const float* q, const float* key_cache, const float* value_cache,
                      const int64_t* mask, int B, int T, int p0, int NH, int KVH, int hd, int capacity) {
    XVALID_DISPATCH(attention, out, q, key_cache, value_cache, mask, B, T, p0, NH, KVH, hd, capacity);
}

}  // namespace fast

// The ops' rows are the matrix multiply's M; its N and K are the weight's rows and columns.
const KernelOps fast_kernel = {
    "fast",
    "packed AVX2/FMA matmul (portable fallback), streaming-softmax attention, fused "
    "residual+rmsnorm, gate/up+SwiGLU and RoPE+KV append (csrc/kernel/fast/)",
    embedding_forward,  // a row per token, converted: the clear op is already as fast as memory
    fast::residual_rmsnorm,
    fast::matmul,
    fast::matmul_swiglu,
    fast::rope_append_kv,
    fast::attention,
};

static const KernelOps* const kKernels[] = {&fast_kernel, &clear_kernel};

const char* default_kernel_name() { return fast_kernel.name; }

std::vector<std::string> kernel_names() {
    std::vector<std::string> names;
    for (const KernelOps* k : kKernels) names.push_back(k->name);
    return names;
}

const KernelOps& find_kernel(const std::string& name) {
    std::string choices;
    for (const KernelOps* k : kKernels) {
        if (name == k->name) return *k;
        choices += (choices.empty() ? "" : ", ") + std::string(k->name);
    }
    throw InputError("unknown kernel '" + name + "' (choose from " + choices + ")");
}

const char* fast_kernel_isa() { return fast::matmul_isa(); }

}  // namespace xvalid
