// Portable code of the fast matmul: plain C++ that the compiler vectorises for whatever the
// target has (SSE2 on baseline x86-64, NEON on ARM). Used where AVX2+FMA is missing, or
// with XVALID_ISA=portable. The blocking and threading are in matmul_blocked.h.
//
// Micro-kernel 4x8: 32 accumulators = 8 SSE/NEON registers, the inner j loop vectorises.
#include "matmul_blocked.h"
#include "matmul_isa.h"

namespace xvalid::fast {
namespace {

struct Portable {
    // KC = 256: a B micro-panel is 256*8*4 = 8 KB (L1); MC = 128: A slice 128 KB (L2);
    // NC = 512: packed B block K*512*4 bytes (L2 + L3).
    static constexpr int MR = 4, NR = 8, KC = 256, MC = 128, NC = 512;
    // Decode path for M <= 4, one A row at a time against 4 weight rows (4 x 8 partial sums =
    // 8 SSE registers; two A rows at once spilled and ran 3x slower on x86-64 SSE2).
    static constexpr int SMALL_M = 4, GEMV_MM = 1;

    // c (4, 8) with row stride ldc = (add ? c : 0) + a-panel . b-panel over kc.
    static void kernel(int kc, const float* a, const float* b, float* c, int ldc, bool add) {
        float acc[MR][NR] = {};
        for (int k = 0; k < kc; k++, a += MR, b += NR)
            for (int i = 0; i < MR; i++)
                for (int j = 0; j < NR; j++) acc[i][j] += a[i] * b[j];
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < NR; j++)
                c[(size_t)i * ldc + j] = add ? c[(size_t)i * ldc + j] + acc[i][j] : acc[i][j];
    }

    static void pack_a_panel(float* dst, const float* A, int K, int m0, int rows, int k0, int kc,
                             const float* row_scale, const float* col_scale) {
        pack_a_panel_generic<MR>(dst, A, K, m0, rows, k0, kc, row_scale, col_scale);
    }
    static void pack_b_panel(float* dst, const float* const rows[NR], int k0, int kc) {
        pack_b_panel_generic<NR>(dst, rows, k0, kc);
    }

    static void swiglu_panel(float* out, const float* gate, const float* up, int n) {
        for (int j = 0; j < n; j++) out[j] = silu_times(gate[j], up[j]);
    }

    // Weights other than float32 are converted row by row before the dot products (Gemm's
    // as_dots_can_read, into a small per-thread buffer), with dtype.h's scalar conversions.
    static constexpr bool HAS_DOTS_F16 = false, HAS_DOTS_BF16 = false, HAS_DOTS_Q8 = false;

    // out[0 .. n) = row r of w, elements k0 .. k0+n-1, as float32.
    static void dequantize(const WeightMatrix& w, int r, int k0, int n, float* out) {
        dequantize_row(w, r, k0, n, out);
    }

    // res[m][r] = A[m] . rows[r] (float32 rows); L independent partial sums per pair so the
    // loop over l vectorises without reassociating (no -ffast-math needed).
    template <int MM, int R, DType D>
    static void dots(const float* A, int K, const Rows<R>& rows, float (*res)[R]) {
        static_assert(D == DType::f32, "the portable dot products read float32 rows only");
        constexpr int L = 8;
        float acc[MM][R][L] = {};
        int k = 0;
        for (; k + L <= K; k += L)
            for (int m = 0; m < MM; m++)
                for (int r = 0; r < R; r++)
                    for (int l = 0; l < L; l++) acc[m][r][l] += A[(size_t)m * K + k + l] * rows.f32(r)[k + l];
        for (int m = 0; m < MM; m++)
            for (int r = 0; r < R; r++) {
                float s = 0.0f;
                for (int l = 0; l < L; l++) s += acc[m][r][l];
                for (int kk = k; kk < K; kk++) s += A[(size_t)m * K + kk] * rows.f32(r)[kk];
                res[m][r] = s;
            }
    }
};

}  // namespace

namespace portable {
void matmul_nt(float* C, const float* A, const WeightMatrix& B, int M, const float* row_scale,
               const float* col_scale, bool accumulate, int n_threads) {
    matmul_nt_impl<Portable>(C, A, B, M, row_scale, col_scale, accumulate, n_threads);
}
void matmul_nt_swiglu(float* out, const float* A, const WeightMatrix& B_gate, const WeightMatrix& B_up,
                      int M, const float* row_scale, const float* col_scale, int n_threads) {
    matmul_nt_swiglu_impl<Portable>(out, A, B_gate, B_up, M, row_scale, col_scale, n_threads);
}
}  // namespace portable

}  // namespace xvalid::fast
