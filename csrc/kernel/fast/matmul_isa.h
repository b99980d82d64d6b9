// The per-instruction-set entry points behind matmul.h; matmul.cpp picks one set at run time.
// Same contracts as matmul.h. The AVX2 set exists only in x86-64 builds.
#pragma once

namespace xvalid::fast {

namespace avx2 {
void matmul_nt(float* C, const float* A, const float* B, int M, int N, int K,
               const float* row_scale, const float* col_scale, bool accumulate, int n_threads);
void matmul_nt_swiglu(float* out, const float* A, const float* B_gate, const float* B_up,
                      int M, int N, int K, const float* row_scale, const float* col_scale,
                      int n_threads);
}  // namespace avx2

namespace portable {
void matmul_nt(float* C, const float* A, const float* B, int M, int N, int K,
               const float* row_scale, const float* col_scale, bool accumulate, int n_threads);
void matmul_nt_swiglu(float* out, const float* A, const float* B_gate, const float* B_up,
                      int M, int N, int K, const float* row_scale, const float* col_scale,
                      int n_threads);
}  // namespace portable

}  // namespace xvalid::fast
