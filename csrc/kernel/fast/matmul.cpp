// Run-time choice of the fast matmul's instruction set: AVX2+FMA (+F16C) when built for x86-64
// and the CPU has them, else portable; XVALID_ISA=portable forces portable (for testing).
// Decided once, on the first call.
#include "matmul.h"

#include <cstdlib>
#include <cstring>

#include "matmul_isa.h"

// XVALID_HAVE_AVX2: the build compiled matmul_avx2.cpp (CMake's XVALID_AVX2 on x86-64).
#ifdef XVALID_HAVE_AVX2
#define XVALID_HAVE_AVX2_TU 1
#endif

namespace xvalid::fast {
namespace {

bool use_avx2() {
#ifdef XVALID_HAVE_AVX2_TU
    static const bool chosen = [] {
        const char* forced = std::getenv("XVALID_ISA");
        if (forced && std::strcmp(forced, "portable") == 0) return false;
        __builtin_cpu_init();  // F16C: the float16 weights' conversion (every AVX2 CPU has it)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    }();
    return chosen;
#else
    return false;
#endif
}

}  // namespace

void matmul_nt(float* C, const float* A, const WeightMatrix& B, int M, const float* row_scale,
               const float* col_scale, bool accumulate, int n_threads) {
#ifdef XVALID_HAVE_AVX2_TU
    if (use_avx2()) return avx2::matmul_nt(C, A, B, M, row_scale, col_scale, accumulate, n_threads);
#endif
    portable::matmul_nt(C, A, B, M, row_scale, col_scale, accumulate, n_threads);
}

void matmul_nt_swiglu(float* out, const float* A, const WeightMatrix& B_gate, const WeightMatrix& B_up,
                      int M, const float* row_scale, const float* col_scale, int n_threads) {
#ifdef XVALID_HAVE_AVX2_TU
    if (use_avx2()) return avx2::matmul_nt_swiglu(out, A, B_gate, B_up, M, row_scale, col_scale, n_threads);
#endif
    portable::matmul_nt_swiglu(out, A, B_gate, B_up, M, row_scale, col_scale, n_threads);
}

const char* matmul_isa() { return use_avx2() ? "avx2+fma" : "portable"; }

}  // namespace xvalid::fast
