// AVX2 + FMA (+ F16C for float16 weights) code of the fast matmul (x86-64 only; built with
// -mavx2 -mfma -mf16c and called only after the run-time check in matmul.cpp). The blocking and threading are in matmul_blocked.h.
//
// Micro-kernel 6x16: 12 ymm accumulators (6 rows x 2 vectors of 8 columns), 2 ymm for the B
// row of the current k and 1 for the broadcast A value = 15 of the 16 ymm registers. Per k:
// 2 loads + 6 broadcasts for 12 FMAs, which keeps both FMA pipes busy (Zen: 2 FMA/cycle,
// latency 4-5, so at least 8-10 independent accumulators are needed; 12 are there).
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "matmul_avx2.cpp must be compiled with -mavx2 -mfma -mf16c"
#endif

#include <immintrin.h>

#include <cstring>

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
    // Weight rows are prefetched this many bytes ahead in the decode path: 1 KB for float32.
    // Rows of narrower weights are short (512 bytes of int8 at K = 512), too short for the
    // hardware prefetcher to pick up, so the software prefetch must cover the whole memory
    // latency: 4 KB ahead (the rows that follow) measured best (one thread, int8 rows of 512:
    // 6.6 G weights/s at 1 KB, 8.9 at 4 KB; float16 2.9 and 4.0).
    template <DType D>
    static constexpr int kPrefetchBytes = D == DType::f32 ? 1024 : 4096;
    // Tiles and blocks (floats). KC = 256: a B micro-panel is 256*16*4 = 16 KB, half of L1d,
    // and stays there while the A micro-panels (256*6*4 = 6 KB each) stream past it.
    // MC = 120 rows: the A slice the inner loops sweep is 120*256*4 = 120 KB, in L2 (512 KB).
    // NC = 512 columns: the packed B block is K*512*4 bytes (1 MB at K = 512, 2.9 MB at
    // K = 1408), in L2 + L3; A is repacked once per B block, ~1% of the flops at NC = 512.
    static constexpr int MR = 6, NR = 16, KC = 256, MC = 120, NC = 512;
    // Decode path for M <= SMALL_M. Measured on Zen 3 (one thread, N, K = 512..1408): no
    // packing is faster up to M = 8 (packing B costs N*K stores for only 2M flops per
    // weight), packing from M = 12 on. A in chunks of up to GEMV_MM = 4 rows against a group of
    // 4 weight rows: chunks of 1-3 rows take all 4 weight rows at once (4-12 accumulators),
    // a chunk of 4 takes them 2 at a time (8 accumulators).
    static constexpr int SMALL_M = 8, GEMV_MM = 4;

    // c (6, 16) with row stride ldc = (add ? c : 0) + a-panel . b-panel over kc.
    static void kernel(int kc, const float* a, const float* b, float* c, int ldc, bool add) {
        // The C tile is read and written once, after the k loop: ask for its lines now, so
        // the miss (C is often far bigger than L2) overlaps the arithmetic.
        for (int i = 0; i < MR; i++) {
            _mm_prefetch(reinterpret_cast<const char*>(c + (size_t)i * ldc), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(c + (size_t)i * ldc + NR - 1), _MM_HINT_T0);
        }
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

    // Packing transposes 8 x 8 blocks in registers: 8 loads of 8 consecutive k from 8 rows,
    // 8 stores of 8 rows at one k. Tails (k % 8, missing rows) take the generic path.

    // dst[k*MR + i] = A'[m0 + i][k0 + k], zero rows past `rows`.
    static void pack_a_panel(float* dst, const float* A, int K, int m0, int rows, int k0, int kc,
                             const float* row_scale, const float* col_scale) {
        int k = 0;
        for (; k + 8 <= kc; k += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; i++) {
                if (i >= rows || i >= MR) {
                    r[i] = _mm256_setzero_ps();
                    continue;
                }
                r[i] = _mm256_loadu_ps(A + (size_t)(m0 + i) * K + k0 + k);
                if (row_scale) r[i] = _mm256_mul_ps(r[i], _mm256_set1_ps(row_scale[m0 + i]));
                if (col_scale) r[i] = _mm256_mul_ps(r[i], _mm256_loadu_ps(col_scale + k0 + k));
            }
            transpose8(r);
            for (int j = 0; j < 8; j++) {  // 6 of the 8 lanes: rows 0..5 at k + j
                float* d = dst + (size_t)(k + j) * MR;
                _mm_storeu_ps(d, _mm256_castps256_ps128(r[j]));
                _mm_storel_pi(reinterpret_cast<__m64*>(d + 4), _mm256_extractf128_ps(r[j], 1));
            }
        }
        if (k < kc) pack_a_panel_generic<MR>(dst + (size_t)k * MR, A, K, m0, rows, k0 + k, kc - k, row_scale, col_scale);
    }
    static_assert(MR <= 8, "pack_a_panel transposes 8 rows at a time");

    // dst[k*NR + j] = rows[j][k0 + k], zero where rows[j] is null.
    static void pack_b_panel(float* dst, const float* const rows[NR], int k0, int kc) {
        for (int h = 0; h < NR; h += 8) {
            bool whole = true;
            for (int j = 0; j < 8; j++) whole = whole && rows[h + j];
            int k = 0;
            if (whole) {
                for (; k + 8 <= kc; k += 8) {
                    __m256 r[8];
                    for (int j = 0; j < 8; j++) r[j] = _mm256_loadu_ps(rows[h + j] + k0 + k);
                    transpose8(r);
                    for (int j = 0; j < 8; j++) _mm256_storeu_ps(dst + (size_t)(k + j) * NR + h, r[j]);
                }
            }
            for (int j = 0; j < 8; j++)
                for (int kk = k; kk < kc; kk++)
                    dst[(size_t)kk * NR + h + j] = rows[h + j] ? rows[h + j][k0 + kk] : 0.0f;
        }
    }

    // r[i][j] <- r[j][i] for an 8 x 8 block.
    static inline void transpose8(__m256 r[8]) {
        __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
        __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
        __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
        __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
        __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
        __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
        __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
        __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
        r[0] = _mm256_permute2f128_ps(u0, u4, 0x20), r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
        r[2] = _mm256_permute2f128_ps(u2, u6, 0x20), r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
        r[4] = _mm256_permute2f128_ps(u0, u4, 0x31), r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
        r[6] = _mm256_permute2f128_ps(u2, u6, 0x31), r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
    }

    // out[j] = silu(gate[j]) * up[j], j < n <= NR/2 = 8: one vector when the panel is whole.
    static void swiglu_panel(float* out, const float* gate, const float* up, int n) {
        if (n < 8) {
            for (int j = 0; j < n; j++) out[j] = silu_times(gate[j], up[j]);
            return;
        }
        __m256 z = _mm256_loadu_ps(gate);
        __m256 sig_den = _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), z)));
        _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_div_ps(z, sig_den), _mm256_loadu_ps(up)));
    }

    // exp(x) for 8 floats, within about 2 ulp of expf (Cephes' polynomial): x = n ln2 + r,
    // |r| <= ln2/2, exp(r) by a degree-7 polynomial, times 2^n built in the exponent bits.
    // x is clamped to [-87.3, 88]: 2^n stays a normal float; silu(z) for |z| > 87 is z or
    // about 0 either way. A NaN stays NaN through silu: z itself is the numerator.
    static inline __m256 exp8(__m256 x) {
        x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.0f));
        __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
        r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
        __m256 p = _mm256_set1_ps(1.9875691500e-4f);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
        p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
        __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    }

    // ---- weights of other storage dtypes (dtype.h) ----
    // float16 by F16C's vcvtph2ps, bfloat16 by widening to 32 bits and shifting into the top
    // half, int8 by widening to 32-bit integers and converting: all exact, 8 weights at a time.
    // The decode loop reads every dtype in its dot products (int8 when the block size is a
    // multiple of 8, so that blocks and vectors line up; else Gemm converts the rows first).
    static constexpr bool HAS_DOTS_F16 = true, HAS_DOTS_BF16 = true, HAS_DOTS_Q8 = true;

    // 8 weights of a float32/float16/bfloat16 row from element k, as float32.
    template <DType D>
    static inline __m256 load8(const void* row, int k) {
        if constexpr (D == DType::f32) {
            return _mm256_loadu_ps(static_cast<const float*>(row) + k);
        } else {
            static_assert(D == DType::f16 || D == DType::bf16, "int8 rows: load8_q8");
            __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row) + k));
            if constexpr (D == DType::f16) return _mm256_cvtph_ps(bits);
            return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
        }
    }
    // the same for one weight (the K % 8 tail)
    template <DType D>
    static inline float load1(const void* row, int k) {
        if constexpr (D == DType::f32) return static_cast<const float*>(row)[k];
        else if constexpr (D == DType::f16) return half_to_float(static_cast<const uint16_t*>(row)[k]);
        else return bf16_to_float(static_cast<const uint16_t*>(row)[k]);
    }
    // 8 int8 weights from element k as float32, unscaled.
    static inline __m256 load8_q8(const int8_t* row, int k) {
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k))));
    }
    // Ask for the row's bytes kPrefetchBytes ahead of element k.
    template <DType D>
    static inline void prefetch(const void* row, int k) {
        _mm_prefetch(static_cast<const char*>(row) + (size_t)k * dtype_itemsize(D) + kPrefetchBytes<D>, _MM_HINT_T0);
    }

    // out[0 .. n) = row r of w, elements k0 .. k0+n-1, as float32 (packing's conversion);
    // the same values as dtype.h's dequantize_row.
    static void dequantize(const WeightMatrix& w, int r, int k0, int n, float* out) {
        int i = 0;
        switch (w.dtype) {
            case DType::f32:
                std::memcpy(out, w.f32_row(r) + k0, sizeof(float) * n);
                return;
            case DType::f16:
                for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, load8<DType::f16>(w.u16_row(r) + k0, i));
                for (; i < n; i++) out[i] = half_to_float(w.u16_row(r)[k0 + i]);
                return;
            case DType::bf16:
                for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, load8<DType::bf16>(w.u16_row(r) + k0, i));
                for (; i < n; i++) out[i] = bf16_to_float(w.u16_row(r)[k0 + i]);
                return;
            case DType::q8: {
                const int8_t* q = w.q8_row(r);
                const float* scales = w.scales_row(r);
                for (int c = k0; c < k0 + n;) {  // one block (or the part of it in range) at a time
                    int block = c / w.block_size;
                    int end = std::min((block + 1) * w.block_size, k0 + n);
                    float scale = scales[block];
                    __m256 scale8 = _mm256_set1_ps(scale);
                    for (; c + 8 <= end; c += 8) _mm256_storeu_ps(out + c - k0, _mm256_mul_ps(load8_q8(q, c), scale8));
                    for (; c < end; c++) out[c - k0] = (float)q[c] * scale;
                }
                return;
            }
        }
    }

    // res[m][r] = A[m] . rows[r] (A row stride K) for m < MM, r < R; 8-wide FMA, MM*R
    // independent accumulators, the K % 8 tail in scalar. float32, float16 and bfloat16
    // rows are converted as they are loaded (load8); int8 rows go to dots_q8.
    template <int MM, int R, DType D>
    static void dots(const float* A, int K, const Rows<R>& rows, float (*res)[R]) {
        if constexpr (D == DType::q8) {
            dots_q8<MM, R>(A, K, rows, res);
            return;
        } else if constexpr (MM == 4 && R == 4) {  // 16 accumulators would spill: two halves
            in_halves<MM, D>(A, K, rows, res);
            return;
        } else {
            __m256 acc[MM][R];
            for (int m = 0; m < MM; m++)
                for (int r = 0; r < R; r++) acc[m][r] = _mm256_setzero_ps();
            int k = 0;
            if constexpr (MM * R <= 4) {  // too few chains to hide FMA latency: a second set
                __m256 acc2[MM][R];
                for (int m = 0; m < MM; m++)
                    for (int r = 0; r < R; r++) acc2[m][r] = _mm256_setzero_ps();
                for (; k + 16 <= K; k += 16) {
                    __m256 w[R], w2[R];
                    for (int r = 0; r < R; r++) {
                        prefetch<D>(rows.row[r], k);
                        w[r] = load8<D>(rows.row[r], k);
                        w2[r] = load8<D>(rows.row[r], k + 8);
                    }
                    for (int m = 0; m < MM; m++) {
                        __m256 x = _mm256_loadu_ps(A + (size_t)m * K + k);
                        __m256 x2 = _mm256_loadu_ps(A + (size_t)m * K + k + 8);
                        for (int r = 0; r < R; r++) {
                            acc[m][r] = _mm256_fmadd_ps(x, w[r], acc[m][r]);
                            acc2[m][r] = _mm256_fmadd_ps(x2, w2[r], acc2[m][r]);
                        }
                    }
                }
                for (int m = 0; m < MM; m++)
                    for (int r = 0; r < R; r++) acc[m][r] = _mm256_add_ps(acc[m][r], acc2[m][r]);
            }
            for (; k + 8 <= K; k += 8) {
                __m256 w[R];
                for (int r = 0; r < R; r++) {
                    prefetch<D>(rows.row[r], k);
                    w[r] = load8<D>(rows.row[r], k);
                }
                for (int m = 0; m < MM; m++) {
                    __m256 x = _mm256_loadu_ps(A + (size_t)m * K + k);
                    for (int r = 0; r < R; r++) acc[m][r] = _mm256_fmadd_ps(x, w[r], acc[m][r]);
                }
            }
            for (int m = 0; m < MM; m++)
                for (int r = 0; r < R; r++) res[m][r] = hsum(acc[m][r]);
            for (; k < K; k++)
                for (int m = 0; m < MM; m++)
                    for (int r = 0; r < R; r++) res[m][r] += A[(size_t)m * K + k] * load1<D>(rows.row[r], k);
        }
    }

    // dots over 4 rows as two calls over 2 (fewer accumulators live at once).
    template <int MM, DType D>
    static void in_halves(const float* A, int K, const Rows<4>& rows, float (*res)[4]) {
        for (int h = 0; h < 2; h++) {
            Rows<2> pair{rows.dtype, rows.block_size, {rows.row[2 * h], rows.row[2 * h + 1]},
                         {rows.scales[2 * h], rows.scales[2 * h + 1]}};
            float half[MM][2];
            dots<MM, 2, D>(A, K, pair, half);
            for (int m = 0; m < MM; m++) res[m][2 * h] = half[m][0], res[m][2 * h + 1] = half[m][1];
        }
    }

    // int8 rows, block_size a multiple of 8 (blocks start on a vector). One A row (decode
    // at batch 1, the case that matters): q * x summed over a block in a register, then one
    // FMA with the block's scale. Several A rows: each 8 weights dequantised in a register
    // (q * scale), shared by the rows' FMAs. The K % 8 tail (in the last block) in scalar.
    // Q8_0's block of 32 is compiled apart (BS = 32: its 4 vectors unrolled); BS = 0 reads
    // the block size at run time.
    template <int MM, int R>
    static void dots_q8(const float* A, int K, const Rows<R>& rows, float (*res)[R]) {
        if constexpr (MM >= 2 && R == 4) {  // MM x 4 accumulators, 4 weights and 4 scales would spill
            in_halves<MM, DType::q8>(A, K, rows, res);
        } else if (rows.block_size == 32) {
            dots_q8_blocks<MM, R, 32>(A, K, rows, res);
        } else {
            dots_q8_blocks<MM, R, 0>(A, K, rows, res);
        }
    }

    template <int MM, int R, int BS>
    static void dots_q8_blocks(const float* A, int K, const Rows<R>& rows, float (*res)[R]) {
        const int bs = BS ? BS : rows.block_size, k_vectors = K / 8 * 8;
        const int8_t* q[R];  // held in registers, not re-read from `rows` every block
        const float* scales[R];
        for (int r = 0; r < R; r++) q[r] = rows.q8(r), scales[r] = rows.scales[r];
        __m256 acc[MM][R];
        for (int m = 0; m < MM; m++)
            for (int r = 0; r < R; r++) acc[m][r] = _mm256_setzero_ps();
        for (int b0 = 0, block = 0; b0 < k_vectors; b0 += bs, block++) {
            const int end = std::min(b0 + bs, k_vectors);
            for (int p = (b0 + 63) / 64 * 64; p < end; p += 64)  // one prefetch per 64 bytes of a row
                for (int r = 0; r < R; r++) prefetch<DType::q8>(q[r], p);
            if constexpr (MM == 1) {
                __m256 sum[R];  // this block's q . x per row
                for (int r = 0; r < R; r++) sum[r] = _mm256_setzero_ps();
                if (BS && end - b0 == BS) {  // a whole Q8_0 block: 4 vectors, unrolled
#pragma GCC unroll 4
                    for (int k = b0; k < b0 + BS; k += 8) {
                        __m256 x = _mm256_loadu_ps(A + k);
                        for (int r = 0; r < R; r++) sum[r] = _mm256_fmadd_ps(x, load8_q8(q[r], k), sum[r]);
                    }
                } else {
                    for (int k = b0; k < end; k += 8) {
                        __m256 x = _mm256_loadu_ps(A + k);
                        for (int r = 0; r < R; r++) sum[r] = _mm256_fmadd_ps(x, load8_q8(q[r], k), sum[r]);
                    }
                }
                for (int r = 0; r < R; r++)
                    acc[0][r] = _mm256_fmadd_ps(sum[r], _mm256_set1_ps(scales[r][block]), acc[0][r]);
            } else {
                __m256 scale[R];
                for (int r = 0; r < R; r++) scale[r] = _mm256_set1_ps(scales[r][block]);
                for (int k = b0; k < end; k += 8) {
                    __m256 w[R];
                    for (int r = 0; r < R; r++) w[r] = _mm256_mul_ps(load8_q8(q[r], k), scale[r]);
                    for (int m = 0; m < MM; m++) {
                        __m256 x = _mm256_loadu_ps(A + (size_t)m * K + k);
                        for (int r = 0; r < R; r++) acc[m][r] = _mm256_fmadd_ps(x, w[r], acc[m][r]);
                    }
                }
            }
        }
        for (int m = 0; m < MM; m++)
            for (int r = 0; r < R; r++) res[m][r] = hsum(acc[m][r]);
        for (int k = k_vectors; k < K; k++)
            for (int m = 0; m < MM; m++)
                for (int r = 0; r < R; r++) res[m][r] += A[(size_t)m * K + k] * ((float)q[r][k] * scales[r][k / bs]);
    }
};

}  // namespace

namespace avx2 {
void matmul_nt(float* C, const float* A, const WeightMatrix& B, int M, const float* row_scale,
               const float* col_scale, bool accumulate, int n_threads) {
    matmul_nt_impl<Avx2>(C, A, B, M, row_scale, col_scale, accumulate, n_threads);
}
void matmul_nt_swiglu(float* out, const float* A, const WeightMatrix& B_gate, const WeightMatrix& B_up,
                      int M, const float* row_scale, const float* col_scale, int n_threads) {
    matmul_nt_swiglu_impl<Avx2>(out, A, B_gate, B_up, M, row_scale, col_scale, n_threads);
}
}  // namespace avx2

}  // namespace xvalid::fast
