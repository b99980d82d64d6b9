// The per-instruction-set entry points behind matmul.h; matmul.cpp picks one set at run time.
// Same contracts as matmul.h. The AVX2 set exists only in x86-64 builds.
#pragma once

#include "../dtype.h"

namespace xvalid::fast {

#define XVALID_DECLARE_MATMUL(ns)                                                                   \
    namespace ns {                                                                                  \
    void matmul_nt(float* C, const float* A, const WeightMatrix& B, int M, const float* row_scale,  \
                   const float* col_scale, bool accumulate, int n_threads);                         \
    void matmul_nt_swiglu(float* out, const float* A, const WeightMatrix& B_gate,                   \
                          const WeightMatrix& B_up, int M, const float* row_scale,                  \
                          const float* col_scale, int n_threads);                                   \
    /* float32 B (N, K), as matmul.h's overloads */                                                 \
    inline void matmul_nt(float* C, const float* A, const float* B, int M, int N, int K,            \
                          const float* row_scale, const float* col_scale, bool accumulate,          \
                          int n_threads) {                                                          \
        matmul_nt(C, A, WeightMatrix::f32(B, N, K), M, row_scale, col_scale, accumulate, n_threads); \
    }                                                                                               \
    inline void matmul_nt_swiglu(float* out, const float* A, const float* B_gate, const float* B_up, \
                                 int M, int N, int K, const float* row_scale,                       \
                                 const float* col_scale, int n_threads) {                           \
        matmul_nt_swiglu(out, A, WeightMatrix::f32(B_gate, N, K), WeightMatrix::f32(B_up, N, K), M, \
                         row_scale, col_scale, n_threads);                                          \
    }                                                                                               \
    }

XVALID_DECLARE_MATMUL(avx2)
XVALID_DECLARE_MATMUL(portable)

#undef XVALID_DECLARE_MATMUL

}  // namespace xvalid::fast
