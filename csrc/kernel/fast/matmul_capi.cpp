// C symbols for the fast matmul, so scripts/matmul_lab.py can time it through ctypes in the
// same process as torch. Not part of the kernel's API (that is matmul.h).
#include "matmul.h"

extern "C" {

void xvalid_fast_matmul_nt(float* C, const float* A, const float* B, int M, int N, int K,
                           const float* row_scale, const float* col_scale, int accumulate,
                           int n_threads) {
    xvalid::fast::matmul_nt(C, A, B, M, N, K, row_scale, col_scale, accumulate != 0, n_threads);
}

void xvalid_fast_matmul_nt_swiglu(float* out, const float* A, const float* B_gate,
                                  const float* B_up, int M, int N, int K,
                                  const float* row_scale, const float* col_scale, int n_threads) {
    xvalid::fast::matmul_nt_swiglu(out, A, B_gate, B_up, M, N, K, row_scale, col_scale, n_threads);
}

const char* xvalid_fast_matmul_isa() { return xvalid::fast::matmul_isa(); }

}  // extern "C"
