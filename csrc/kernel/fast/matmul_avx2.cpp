// AVX2 + FMA code of the fast matmul (x86-64 only; built with -mavx2 -mfma and called only
// after the run-time check in matmul.cpp). The blocking and threading are in matmul_blocked.h.
//
// Micro-kernel 6x16: 12 ymm accumulators (6 rows x 2 vectors of 8 columns), 2 ymm for the B
// row of the current k and 1 for the broadcast A value = 15 of the 16 ymm registers. Per k:
// 2 loads + 6 broadcasts for 12 FMAs, which keeps both FMA pipes busy (Zen: 2 FMA/cycle,
// latency 4-5, so at least 8-10 independent accumulators are needed; 12 are there).
#if !defined(__AVX2__) || !defined(__FMA__)
#error "matmul_avx2.cpp must be compiled with -mavx2 -mfma"
#endif

#include <immintrin.h>

#include "matmul_blocked.h"
#include "matmul_isa.h"

namespace xvalid::fast {
namespace {

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

struct Avx2 {
    // Tiles and blocks (floats). KC = 256: a B micro-panel is 256*16*4 = 16 KB, half of L1d,
    // and stays there while the A micro-panels (256*6*4 = 6 KB each) stream past it.
    // MC = 120 rows: the A slice the inner loops sweep is 120*256*4 = 120 KB, in L2 (512 KB).
    // NC = 512 columns: the packed B block is K*512*4 bytes (1 MB at K = 512, 2.9 MB at
    // K = 1408), in L2 + L3; A is repacked once per B block, ~1% of the flops at NC = 512.
    static constexpr int MR = 6, NR = 16, KC = 256, MC = 120, NC = 512;
    // Decode path: M <= SMALL_M; A in chunks of GEMV_MM rows against 4 weight rows
    // (2 x 4 = 8 accumulators, plus 4 weight vectors and one A vector).
    static constexpr int SMALL_M = 4, GEMV_MM = 2;

    // c (6, 16) with row stride ldc = (add ? c : 0) + a-panel . b-panel over kc.
    static void kernel(int kc, const float* a, const float* b, float* c, int ldc, bool add) {
        __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
        __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
        __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
        __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
        __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
        __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
#pragma GCC unroll 4
        for (int k = 0; k < kc; k++) {
            __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
            __m256 x;
            x = _mm256_broadcast_ss(a + 0), c00 = _mm256_fmadd_ps(x, b0, c00), c01 = _mm256_fmadd_ps(x, b1, c01);
            x = _mm256_broadcast_ss(a + 1), c10 = _mm256_fmadd_ps(x, b0, c10), c11 = _mm256_fmadd_ps(x, b1, c11);
            x = _mm256_broadcast_ss(a + 2), c20 = _mm256_fmadd_ps(x, b0, c20), c21 = _mm256_fmadd_ps(x, b1, c21);
            x = _mm256_broadcast_ss(a + 3), c30 = _mm256_fmadd_ps(x, b0, c30), c31 = _mm256_fmadd_ps(x, b1, c31);
            x = _mm256_broadcast_ss(a + 4), c40 = _mm256_fmadd_ps(x, b0, c40), c41 = _mm256_fmadd_ps(x, b1, c41);
            x = _mm256_broadcast_ss(a + 5), c50 = _mm256_fmadd_ps(x, b0, c50), c51 = _mm256_fmadd_ps(x, b1, c51);
            a += MR, b += NR;
        }
        store_row(c + 0 * (size_t)ldc, c00, c01, add);
        store_row(c + 1 * (size_t)ldc, c10, c11, add);
        store_row(c + 2 * (size_t)ldc, c20, c21, add);
        store_row(c + 3 * (size_t)ldc, c30, c31, add);
        store_row(c + 4 * (size_t)ldc, c40, c41, add);
        store_row(c + 5 * (size_t)ldc, c50, c51, add);
    }
    static inline void store_row(float* c, __m256 lo, __m256 hi, bool add) {
        if (add) lo = _mm256_add_ps(_mm256_loadu_ps(c), lo), hi = _mm256_add_ps(_mm256_loadu_ps(c + 8), hi);
        _mm256_storeu_ps(c, lo);
        _mm256_storeu_ps(c + 8, hi);
    }

    static void pack_b_panel(float* dst, const float* const rows[NR], int k0, int kc) {
        pack_b_panel_generic<NR>(dst, rows, k0, kc);
    }

    // out[j] = silu(gate[j]) * up[j], j < n <= NR/2.
    static void swiglu_panel(float* out, const float* gate, const float* up, int n) {
        for (int j = 0; j < n; j++) out[j] = silu_times(gate[j], up[j]);
    }

    // res[m][r] = A[m] . rows[r] (A row stride K) for m < MM, r < R; 8-wide FMA, MM*R
    // independent accumulators, the K % 8 tail in scalar.
    template <int MM, int R>
    static void dots(const float* A, int K, const float* const* rows, float (*res)[R]) {
        __m256 acc[MM][R];
        for (int m = 0; m < MM; m++)
            for (int r = 0; r < R; r++) acc[m][r] = _mm256_setzero_ps();
        int k = 0;
        for (; k + 8 <= K; k += 8) {
            __m256 w[R];
            for (int r = 0; r < R; r++) w[r] = _mm256_loadu_ps(rows[r] + k);
            for (int m = 0; m < MM; m++) {
                __m256 x = _mm256_loadu_ps(A + (size_t)m * K + k);
                for (int r = 0; r < R; r++) acc[m][r] = _mm256_fmadd_ps(x, w[r], acc[m][r]);
            }
        }
        for (int m = 0; m < MM; m++)
            for (int r = 0; r < R; r++) res[m][r] = hsum(acc[m][r]);
        for (; k < K; k++)
            for (int m = 0; m < MM; m++)
                for (int r = 0; r < R; r++) res[m][r] += A[(size_t)m * K + k] * rows[r][k];
    }
};

}  // namespace

namespace avx2 {
void matmul_nt(float* C, const float* A, const float* B, int M, int N, int K,
               const float* row_scale, const float* col_scale, bool accumulate, int n_threads) {
    matmul_nt_impl<Avx2>(C, A, B, M, N, K, row_scale, col_scale, accumulate, n_threads);
}
void matmul_nt_swiglu(float* out, const float* A, const float* B_gate, const float* B_up,
                      int M, int N, int K, const float* row_scale, const float* col_scale,
                      int n_threads) {
    matmul_nt_swiglu_impl<Avx2>(out, A, B_gate, B_up, M, N, K, row_scale, col_scale, n_threads);
}
}  // namespace avx2

}  // namespace xvalid::fast
