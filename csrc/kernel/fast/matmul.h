// The fast kernel's matrix multiply: C = A' B^T with B an nn.Linear weight (out, in).
//
// Dimensions: M = token rows, N = output features, K = input features.
// All matrices are row-major and contiguous: A (M, K), B (N, K), C (M, N).
//
// Two paths, chosen per call by the shape:
//   - prefill (M large): A and B are packed into cache-sized panels and a register-tiled
//     micro-kernel (AVX2/FMA 6x16, or a portable 4x8 one) does the arithmetic;
//   - decode (M small): no packing; each thread streams its own range of weight rows once
//     and dots it with every row of A, so the time is the time to read the weights.
// The instruction set is chosen once at run time (AVX2+FMA when the CPU has both, else
// portable C++); XVALID_ISA=portable forces the portable code, for testing.
//
// Accumulation is in float32 with FMA (unlike the clear kernel, which sums in double).
// Scratch memory is kept per calling thread and grown on demand: a steady stream of calls
// of the same shapes allocates nothing. Threads: exactly n_threads OpenMP threads at most
// (fewer when the product is too small to split), reused by OpenMP between calls.
#pragma once

#include "../dtype.h"

namespace xvalid::fast {

// C (M, N) = A' (M, K) . B (N, K)^T, or C += that when accumulate (the residual add fused
// into the matmul's store). N = B.rows, K = B.cols; B of any storage dtype (dtype.h), read
// as its float32 values.
// A' is A scaled while it is read, which fuses RMSNorm into the next matmul:
//   A'[m][k] = (A[m][k] * row_scale[m]) * col_scale[k], rounded in float32 in that order;
// either scale may be nullptr (= 1, not applied).
// M, N, K >= 1 and n_threads >= 1 are the caller's to check; C must not alias A or B.
void matmul_nt(float* C, const float* A, const WeightMatrix& B, int M, const float* row_scale,
               const float* col_scale, bool accumulate, int n_threads);

// SwiGLU fused into the gate and up projections:
//   out (M, N) = silu(A' B_gate^T) * (A' B_up^T),  silu(z) = z / (1 + exp(-z)) in float32,
// with B_gate and B_up (N, K) of the same shape (dtypes may differ) and A' as in matmul_nt.
// Computed block by block: the two (M, N) products never exist in memory in full.
void matmul_nt_swiglu(float* out, const float* A, const WeightMatrix& B_gate,
                      const WeightMatrix& B_up, int M, const float* row_scale,
                      const float* col_scale, int n_threads);

// The same for float32 B (N, K) given as a pointer (the matmul lab and tests).
inline void matmul_nt(float* C, const float* A, const float* B, int M, int N, int K,
                      const float* row_scale, const float* col_scale, bool accumulate, int n_threads) {
    matmul_nt(C, A, WeightMatrix::f32(B, N, K), M, row_scale, col_scale, accumulate, n_threads);
}
inline void matmul_nt_swiglu(float* out, const float* A, const float* B_gate, const float* B_up,
                             int M, int N, int K, const float* row_scale, const float* col_scale,
                             int n_threads) {
    matmul_nt_swiglu(out, A, WeightMatrix::f32(B_gate, N, K), WeightMatrix::f32(B_up, N, K), M,
                     row_scale, col_scale, n_threads);
}

// "avx2+fma" or "portable": the code the run-time dispatch chose.
const char* matmul_isa();

}  // namespace xvalid::fast
