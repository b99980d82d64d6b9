// The instruction-set-independent half of the fast matmul: blocking, packing, threading and
// the decode (small M) loop. Included only by matmul_avx2.cpp and matmul_portable.cpp, each of
// which supplies an `Isa` struct (micro-kernel, tile sizes, dot products) and compiles this
// file with its own flags. Everything here has internal linkage (anonymous namespace) so the
// linker can never pick the AVX2 copy of a function for the portable path.
//
// Notation: C (M, N) = A' (M, K) . B (N, K)^T. The micro-kernel computes an MR x NR tile of C
// from an A micro-panel (MR rows, k-major: a[k*MR + i]) and a B micro-panel (NR columns of C,
// i.e. NR rows of B, k-major: b[k*NR + j]), kc values of k at a time.
//
// Loops (Goto/BLIS order), per thread over its rectangle of C:
//   nb: NC columns   pack B (all K, as kc-slices of NR-wide panels)  -> L3, K*NC floats
//    mb: MC rows     pack A (all K, as kc-slices of MR-tall panels)  -> L2, one slice MC*KC
//     slice s: kc <= KC values of k
//      panel p of B (KC*NR floats, stays in L1 while ...)
//       panel i of A (KC*MR floats, streamed from L2): micro-kernel on the (i, p) tile.
// Partial sums over the k-slices accumulate in C itself (or, for SwiGLU, in a per-thread
// MC x 2NC block H, turned into silu(gate) * up after the last slice).
//
// Weights of any storage dtype (dtype.h): packing converts them to float32 panel by panel
// (Isa::dequantize into a small buffer, then the float32 packing), so the micro-kernel only
// ever sees float32; the decode loop reads them as stored, converting in registers where the
// Isa has dots for the dtype (Isa::has_dots), else one group of weight rows at a time into a
// small float32 buffer. Nothing converts a whole matrix.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <new>
#include <vector>

#include "../dtype.h"
#ifdef _OPENMP
#include <omp.h>
#endif

namespace xvalid::fast {
namespace {

// ---- scratch ------------------------------------------------------------------------------

// A 64-byte aligned float buffer that only grows.
class Buffer {
public:
    Buffer() = default;
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    Buffer(Buffer&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr, o.n_ = 0; }
    ~Buffer() { std::free(p_); }
    float* reserve(size_t n) {
        if (n > n_) {
            size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
            auto* p = static_cast<float*>(std::aligned_alloc(64, bytes));
            if (!p) throw std::bad_alloc();
            std::free(p_);
            p_ = p, n_ = n;
        }
        return p_;
    }
    float* data() const { return p_; }

private:
    float* p_ = nullptr;
    size_t n_ = 0;
};

// Packed panels of one OpenMP worker: a (A block), b (B block), h (SwiGLU partial sums),
// w (weight rows converted to float32: a panel's NR rows of one k-slice while packing, or a
// decode group's rows).
struct WorkerScratch {
    Buffer a, b, h, w;
};

// The calling thread's scratch, one entry per worker of its parallel regions. It is sized
// before a region starts, so an allocation failure throws in the caller, not in a worker.
std::vector<WorkerScratch>& worker_scratch(int n_workers) {
    thread_local std::vector<WorkerScratch> pool;
    if ((int)pool.size() < n_workers) pool.resize(n_workers);
    return pool;
}

// A' (M, K) for the decode path when a scale is given (M is small, so this is cheap).
Buffer& scaled_a_scratch() {
    thread_local Buffer buffer;
    return buffer;
}

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// [begin, end) of part `part` when `count` units are split as evenly as possible in `parts`.
inline int split_point(int count, int parts, int part) {
    return (int)((long long)count * part / parts);
}

inline float silu_times(float gate, float up) { return gate / (1.0f + std::exp(-gate)) * up; }

// A'[m][k] = (A[m][k] * row_scale[m]) * col_scale[k], the one place the scaling rule lives.
inline float scaled(const float* a_row, int k, float rs, bool has_rs, const float* cs) {
    float v = a_row[k];
    if (has_rs) v = v * rs;
    if (cs) v = v * cs[k];
    return v;
}

// ---- the problem of one call ----------------------------------------------------------

struct Problem {
    float* C;                    // (M, N) output
    const float* A;              // (M, K)
    const WeightMatrix* B;       // (N, K) plain matmul, else nullptr
    const WeightMatrix* B_gate;  // (N, K) SwiGLU, else nullptr
    const WeightMatrix* B_up;    // (N, K)
    int M, N, K;
    const float* row_scale;  // (M) or nullptr
    const float* col_scale;  // (K) or nullptr
    bool accumulate;
    bool swiglu() const { return B == nullptr; }
};

// One row of a weight matrix (matrix nullptr: a padding row, read as zeros).
struct WeightRow {
    const WeightMatrix* matrix;
    int row;
};

// R weight rows of one dtype (and for int8 one block size) as the decode loop reads them.
template <int R>
struct Rows {
    DType dtype;
    int block_size;          // int8 only
    const void* row[R];      // the stored elements: float, uint16_t or int8_t
    const float* scales[R];  // int8 only: the row's scales
    const float* f32(int r) const { return static_cast<const float*>(row[r]); }
    const uint16_t* u16(int r) const { return static_cast<const uint16_t*>(row[r]); }
    const int8_t* q8(int r) const { return static_cast<const int8_t*>(row[r]); }
};

// How K is cut into slices of at most kc_max: equal slices, so no slice is a runt.
struct Slices {
    int count, K;
    Slices(int K_, int kc_max) : count(ceil_div(K_, kc_max)), K(K_) {}
    int begin(int s) const { return split_point(K, count, s); }
    int size(int s) const { return begin(s + 1) - begin(s); }
};

template <class Isa>
struct Gemm {
    static constexpr int MR = Isa::MR, NR = Isa::NR, KC = Isa::KC, MC = Isa::MC, NC = Isa::NC;
    static_assert(MC % MR == 0 && NC % NR == 0 && NR % 2 == 0, "blocks are whole tiles");

    // Columns of C per B block: a SwiGLU panel holds NR/2 gate and NR/2 up rows of one
    // group of output features, so a block covers half as many features.
    static int block_cols(const Problem& p) { return p.swiglu() ? NC / 2 : NC; }
    static int panel_cols(const Problem& p) { return p.swiglu() ? NR / 2 : NR; }

    // ---- packing ----

    // The B rows feeding panel `panel` of the block that starts at column nb of C.
    // rows[j].matrix = nullptr where the panel runs past N (packed as zeros).
    static void panel_rows(const Problem& p, int nb, int panel, WeightRow rows[NR]) {
        if (!p.swiglu()) {
            for (int j = 0; j < NR; j++) {
                int n = nb + panel * NR + j;
                rows[j] = {n < p.N ? p.B : nullptr, n};
            }
            return;
        }
        constexpr int half = NR / 2;
        for (int j = 0; j < half; j++) {
            int n = nb + panel * half + j;
            rows[j] = {n < p.N ? p.B_gate : nullptr, n};
            rows[half + j] = {n < p.N ? p.B_up : nullptr, n};
        }
    }

    // B block for the C columns from nb, width/NR panels: slice s, panel q at dst + k0*width + q*kc*NR.
    // float32 rows are packed straight from the weights; other dtypes are converted slice by
    // slice into `converted` (NR x KC floats), then packed from there.
    static void pack_b_block(float* dst, const Problem& p, const Slices& sl, int nb, int width,
                             float* converted) {
        int panels = width / NR;
        for (int q = 0; q < panels; q++) {
            WeightRow rows[NR];
            panel_rows(p, nb, q, rows);
            bool all_f32 = true;
            for (const WeightRow& r : rows) all_f32 = all_f32 && (!r.matrix || r.matrix->dtype == DType::f32);
            for (int s = 0; s < sl.count; s++) {
                int k0 = sl.begin(s), kc = sl.size(s);
                const float* src[NR];  // rows whose elements k0 .. k0+kc-1 start at src_k0
                int src_k0 = all_f32 ? k0 : 0;
                for (int j = 0; j < NR; j++) {
                    const WeightRow& r = rows[j];
                    if (!r.matrix) {
                        src[j] = nullptr;
                    } else if (all_f32) {
                        src[j] = r.matrix->f32_row(r.row);
                    } else {
                        Isa::dequantize(*r.matrix, r.row, k0, kc, converted + (size_t)j * KC);
                        src[j] = converted + (size_t)j * KC;
                    }
                }
                Isa::pack_b_panel(dst + (size_t)k0 * width + (size_t)q * kc * NR, src, src_k0, kc);
            }
        }
    }

    // ---- the blocked loops over one thread's rectangle of C ----

    // Tile at C + ldc*row + col gets the product of the two micro-panels; only the valid
    // rows x cols are written. add: C += product, else C = product.
    static void tile(int kc, const float* a, const float* b, float* c, int ldc, int rows,
                     int cols, bool add) {
        if (rows == MR && cols == NR) {
            Isa::kernel(kc, a, b, c, ldc, add);
            return;
        }
        alignas(64) float t[MR * NR];
        Isa::kernel(kc, a, b, t, NR, false);
        for (int i = 0; i < rows; i++)
            for (int j = 0; j < cols; j++)
                c[(size_t)i * ldc + j] = add ? c[(size_t)i * ldc + j] + t[i * NR + j] : t[i * NR + j];
    }

    static void rectangle(const Problem& p, int m_begin, int m_end, int n_begin, int n_end,
                          WorkerScratch& ws) {
        const Slices sl(p.K, KC);
        const int bc = block_cols(p), pc = panel_cols(p);
        float* Bp = ws.b.data();
        float* Ap = ws.a.data();
        float* H = ws.h.data();
        float* converted = ws.w.data();
        for (int nb = n_begin; nb < n_end; nb += bc) {
            const int cols = std::min(bc, n_end - nb);
            const int panels = ceil_div(cols, pc);
            const int width = panels * NR;  // packed B columns (padded)
            pack_b_block(Bp, p, sl, nb, width, converted);
            for (int mb = m_begin; mb < m_end; mb += MC) {
                const int rows = std::min(MC, m_end - mb);
                const int tiles = ceil_div(rows, MR);
                const int height = tiles * MR;  // packed A rows (padded)
                for (int s = 0; s < sl.count; s++) {
                    int k0 = sl.begin(s), kc = sl.size(s);
                    for (int i = 0; i < tiles; i++)
                        Isa::pack_a_panel(Ap + (size_t)k0 * height + (size_t)i * kc * MR, p.A, p.K,
                                          mb + i * MR, std::min(MR, rows - i * MR), k0, kc,
                                          p.row_scale, p.col_scale);
                }
                for (int s = 0; s < sl.count; s++) {
                    int k0 = sl.begin(s), kc = sl.size(s);
                    const float* As = Ap + (size_t)k0 * height;
                    const float* Bs = Bp + (size_t)k0 * width;
                    for (int q = 0; q < panels; q++) {
                        const float* b = Bs + (size_t)q * kc * NR;
                        for (int i = 0; i < tiles; i++) {
                            const float* a = As + (size_t)i * kc * MR;
                            if (p.swiglu()) {  // H (height, width) holds whole padded tiles
                                Isa::kernel(kc, a, b, H + (size_t)i * MR * width + q * NR, width, s > 0);
                            } else {
                                float* c = p.C + (size_t)(mb + i * MR) * p.N + nb + q * NR;
                                tile(kc, a, b, c, p.N, std::min(MR, rows - i * MR),
                                     std::min(NR, cols - q * NR), s > 0 || p.accumulate);
                            }
                        }
                    }
                }
                if (p.swiglu()) swiglu_epilogue(p, H, width, mb, rows, nb, cols);
            }
        }
    }

    // out[mb + r][nb + c] = silu(gate) * up from H, where panel q of H holds the gate sums
    // of features q*NR/2 .. in its first NR/2 columns and the up sums in the next NR/2.
    static void swiglu_epilogue(const Problem& p, const float* H, int width, int mb, int rows,
                                int nb, int cols) {
        constexpr int half = NR / 2;
        for (int r = 0; r < rows; r++) {
            const float* h = H + (size_t)r * width;
            float* out = p.C + (size_t)(mb + r) * p.N + nb;
            for (int q = 0; q * half < cols; q++)
                Isa::swiglu_panel(out + q * half, h + q * NR, h + q * NR + half,
                                  std::min(half, cols - q * half));
        }
    }

    // ---- threads ----

    // Threads x grid (tm along M, tn along N) for the packed path: the split with the least
    // estimated time of the slowest thread, counting padded tiles (compute, 16 flops/cycle)
    // and packing (about a cycle per packed element; A is packed once per B block).
    struct Grid {
        int tm, tn;
    };
    static Grid choose_grid(const Problem& p, int T) {
        Grid best{1, 1};
        double best_cost = 1e300;
        const int pc = panel_cols(p), bc = block_cols(p);
        for (int tm = 1; tm <= T; tm++) {
            if (T % tm) continue;
            int tn = T / tm;
            if (tm > ceil_div(p.M, MR) || tn > ceil_div(p.N, pc)) continue;
            double rows = (double)ceil_div(ceil_div(p.M, MR), tm) * MR;
            double cols = (double)ceil_div(ceil_div(p.N, pc), tn) * pc;
            double flops = rows * cols * p.K * 2.0 * (p.swiglu() ? 2 : 1);
            double packed = rows * p.K * std::ceil(cols / bc) + cols * p.K * (p.swiglu() ? 2 : 1);
            double cost = flops / 16.0 + packed;
            if (cost < best_cost) best_cost = cost, best = {tm, tn};
        }
        return best;
    }

    static void packed(const Problem& p, int T) {
        const Grid g = choose_grid(p, T);
        T = g.tm * g.tn;
        const int pc = panel_cols(p);
        const int m_tiles = ceil_div(p.M, MR), n_panels = ceil_div(p.N, pc);
        // Scratch sizes: the largest block any worker packs.
        const int max_cols = std::min(ceil_div(n_panels, g.tn) * pc, block_cols(p));
        const int max_width = ceil_div(max_cols, pc) * NR;
        const int max_height = std::min(ceil_div(m_tiles, g.tm) * MR, MC);
        auto& pool = worker_scratch(T);
        for (int t = 0; t < T; t++) {
            pool[t].b.reserve((size_t)p.K * max_width);
            pool[t].a.reserve((size_t)p.K * max_height);
            if (p.swiglu()) pool[t].h.reserve((size_t)max_height * max_width);
            pool[t].w.reserve((size_t)NR * KC);
        }
        auto job = [&](int t) {
            int im = t / g.tn, in = t % g.tn;
            int m0 = split_point(m_tiles, g.tm, im) * MR, m1 = std::min(p.M, split_point(m_tiles, g.tm, im + 1) * MR);
            int n0 = split_point(n_panels, g.tn, in) * pc, n1 = std::min(p.N, split_point(n_panels, g.tn, in + 1) * pc);
            if (m0 < m1 && n0 < n1) rectangle(p, m0, m1, n0, n1, pool[t]);
        };
        run_jobs(T, job);
    }

    // ---- decode: small M, weights streamed once, no packing ----

    // Rows [n0, n1) of B (or of B_gate and B_up) against all M rows of A (already scaled),
    // R = 4 weight rows at a time, A in chunks of at most Isa::GEMV_MM rows. `buffer` holds
    // 4 x K floats: weight rows the Isa's dot products cannot read as stored, converted.
    static void gemv_range(const Problem& p, const float* A, int n0, int n1, float* buffer) {
        constexpr int R = 4;
        const int M = p.M, K = p.K;
        int n = n0;
        for (; n + R <= n1; n += R) gemv_group<R>(p, A, M, K, n, buffer);
        for (; n < n1; n++) gemv_group<1>(p, A, M, K, n, buffer);
    }

    // R rows n .. n+R-1 of one matrix.
    template <int R>
    static Rows<R> matrix_rows(const WeightMatrix& w, int n) {
        Rows<R> rows{w.dtype, w.block_size, {}, {}};
        for (int r = 0; r < R; r++) {
            rows.row[r] = static_cast<const char*>(w.data) + (size_t)(n + r) * w.cols * dtype_itemsize(w.dtype);
            rows.scales[r] = w.dtype == DType::q8 ? w.scales_row(n + r) : nullptr;
        }
        return rows;
    }

    // Whether the Isa reads this dtype in its dot products; if not, the rows are converted
    // to float32 first (as_dots_can_read).
    template <int R>
    static bool has_dots(const Rows<R>& rows) {
        switch (rows.dtype) {
            case DType::f32: return true;
            case DType::f16: return Isa::HAS_DOTS_F16;
            case DType::bf16: return Isa::HAS_DOTS_BF16;
            case DType::q8: return Isa::HAS_DOTS_Q8 && rows.block_size % 8 == 0;
        }
        return false;
    }

    // rows, or their float32 values in `buffer` (R x K floats) when the Isa cannot read them.
    template <int R>
    static Rows<R> as_dots_can_read(const Rows<R>& rows, int K, float* buffer) {
        if (has_dots(rows)) return rows;
        Rows<R> converted{DType::f32, 0, {}, {}};
        for (int r = 0; r < R; r++) {
            WeightMatrix one = WeightMatrix::f32(nullptr, 1, K);  // row r as a 1 x K matrix
            one.dtype = rows.dtype, one.data = rows.row[r], one.scales = rows.scales[r];
            one.block_size = rows.block_size;
            Isa::dequantize(one, 0, 0, K, buffer + (size_t)r * K);
            converted.row[r] = buffer + (size_t)r * K;
        }
        return converted;
    }

    // Output features n .. n+R-1: R weight rows, or for SwiGLU R gate and R up rows, taken
    // 2 features (4 rows) at a time, the same 4-row shape as the plain case.
    template <int R>
    static void gemv_group(const Problem& p, const float* A, int M, int K, int n, float* buffer) {
        if (p.swiglu()) {
            if constexpr (R % 2 == 0)
                for (int f = 0; f < R; f += 2) gemv_swiglu_rows<2>(p, A, M, K, n + f, buffer);
            else
                for (int f = 0; f < R; f++) gemv_swiglu_rows<1>(p, A, M, K, n + f, buffer);
            return;
        }
        const Rows<R> rows = as_dots_can_read(matrix_rows<R>(*p.B, n), K, buffer);
        for (int m0 = 0; m0 < M; m0 += Isa::GEMV_MM) {
            float res[Isa::GEMV_MM][R] = {};
            int mm = std::min(Isa::GEMV_MM, M - m0);
            dots_any<R>(A + (size_t)m0 * K, K, rows, mm, res);
            for (int m = 0; m < mm; m++) {
                float* c = p.C + (size_t)(m0 + m) * p.N + n;
                for (int r = 0; r < R; r++) c[r] = p.accumulate ? c[r] + res[m][r] : res[m][r];
            }
        }
    }

    template <int F>  // F features: rows gate[n..n+F), up[n..n+F)
    static void gemv_swiglu_rows(const Problem& p, const float* A, int M, int K, int n, float* buffer) {
        Rows<F> gate = matrix_rows<F>(*p.B_gate, n), up = matrix_rows<F>(*p.B_up, n);
        // one pass over the 2F rows when they read alike (the usual case), else two
        bool together = gate.dtype == up.dtype && gate.block_size == up.block_size;
        Rows<2 * F> both{gate.dtype, gate.block_size, {}, {}};
        for (int f = 0; f < F; f++) {
            both.row[f] = gate.row[f], both.row[F + f] = up.row[f];
            both.scales[f] = gate.scales[f], both.scales[F + f] = up.scales[f];
        }
        if (together) both = as_dots_can_read(both, K, buffer);
        if (!together) gate = as_dots_can_read(gate, K, buffer), up = as_dots_can_read(up, K, buffer + (size_t)F * K);
        for (int m0 = 0; m0 < M; m0 += Isa::GEMV_MM) {
            float res[Isa::GEMV_MM][2 * F] = {};
            int mm = std::min(Isa::GEMV_MM, M - m0);
            if (together) {
                dots_any<2 * F>(A + (size_t)m0 * K, K, both, mm, res);
            } else {
                float res_gate[Isa::GEMV_MM][F] = {}, res_up[Isa::GEMV_MM][F] = {};
                dots_any<F>(A + (size_t)m0 * K, K, gate, mm, res_gate);
                dots_any<F>(A + (size_t)m0 * K, K, up, mm, res_up);
                for (int m = 0; m < mm; m++)
                    for (int f = 0; f < F; f++) res[m][f] = res_gate[m][f], res[m][F + f] = res_up[m][f];
            }
            for (int m = 0; m < mm; m++)
                for (int f = 0; f < F; f++)
                    p.C[(size_t)(m0 + m) * p.N + n + f] = silu_times(res[m][f], res[m][F + f]);
        }
    }

    // res[m][r] = A[m] . rows[r] for m < mm (mm <= GEMV_MM), dispatched to the fixed-size kernel
    // for the rows' dtype (one the Isa reads: as_dots_can_read).
    template <int R>
    static void dots_any(const float* A, int K, const Rows<R>& rows, int mm, float (*res)[R]) {
        switch (rows.dtype) {
            case DType::f32: dots_mm<R, DType::f32>(A, K, rows, mm, res); break;
            case DType::f16: if constexpr (Isa::HAS_DOTS_F16) dots_mm<R, DType::f16>(A, K, rows, mm, res); break;
            case DType::bf16: if constexpr (Isa::HAS_DOTS_BF16) dots_mm<R, DType::bf16>(A, K, rows, mm, res); break;
            case DType::q8: if constexpr (Isa::HAS_DOTS_Q8) dots_mm<R, DType::q8>(A, K, rows, mm, res); break;
        }
    }

    template <int R, DType D>
    static void dots_mm(const float* A, int K, const Rows<R>& rows, int mm, float (*res)[R]) {
        static_assert(Isa::GEMV_MM >= 1 && Isa::GEMV_MM <= 4, "chunk of A rows");
        switch (mm) {
        case 1: Isa::template dots<1, R, D>(A, K, rows, res); break;
        case 2: if constexpr (Isa::GEMV_MM >= 2) Isa::template dots<2, R, D>(A, K, rows, res); break;
        case 3: if constexpr (Isa::GEMV_MM >= 3) Isa::template dots<3, R, D>(A, K, rows, res); break;
        default: if constexpr (Isa::GEMV_MM >= 4) Isa::template dots<4, R, D>(A, K, rows, res); break;
        }
    }

    static void gemv(const Problem& p_in, int n_threads) {
        Problem p = p_in;
        if (p.row_scale || p.col_scale) {  // A' once, in the caller's thread
            float* As = scaled_a_scratch().reserve((size_t)p.M * p.K);
            for (int m = 0; m < p.M; m++) {
                const float* a_row = p.A + (size_t)m * p.K;
                float rs = p.row_scale ? p.row_scale[m] : 1.0f;
                for (int k = 0; k < p.K; k++)
                    As[(size_t)m * p.K + k] = scaled(a_row, k, rs, p.row_scale != nullptr, p.col_scale);
            }
            p.A = As;
            p.row_scale = p.col_scale = nullptr;
        }
        // Threads over contiguous ranges of output features, in groups of 4 (one gemv_group);
        // at least kGemvMinBytes of weights per thread, so tiny products stay on one thread.
        constexpr double kGemvMinBytes = 64 * 1024;
        double weight_bytes = p.swiglu() ? p.B_gate->bytes() + p.B_up->bytes() : p.B->bytes();
        int groups = ceil_div(p.N, 4);
        int T = std::max(1, std::min({n_threads, groups, (int)(weight_bytes / kGemvMinBytes)}));
        // each worker's buffer for weight rows the Isa's dot products cannot read as stored:
        // a group's 4 rows, or 2 x 2 for SwiGLU (sized here, so a failure throws in the caller)
        auto& pool = worker_scratch(T);
        for (int t = 0; t < T; t++) pool[t].w.reserve((size_t)4 * p.K);
        run_jobs(T, [&](int t) {
            int n0 = std::min(p.N, split_point(groups, T, t) * 4);
            int n1 = std::min(p.N, split_point(groups, T, t + 1) * 4);
            if (n0 < n1) gemv_range(p, p.A, n0, n1, pool[t].w.data());
        });
    }

    // ---- entry ----

    // Job t in [0, T) on OpenMP worker t (or shared out if the runtime gives fewer workers).
    template <class Job>
    static void run_jobs(int T, const Job& job) {
        if (T <= 1) {
            job(0);
            return;
        }
#ifdef _OPENMP
#pragma omp parallel num_threads(T)
        {
            int workers = omp_get_num_threads();
            for (int t = omp_get_thread_num(); t < T; t += workers) job(t);
        }
#else
        for (int t = 0; t < T; t++) job(t);
#endif
    }

    static void run(const Problem& p, int n_threads) {
        if (p.M <= Isa::SMALL_M) {
            gemv(p, n_threads);
            return;
        }
        // At least kMinFlopsPerThread of work per thread: waking a thread costs microseconds.
        constexpr double kMinFlopsPerThread = 1 << 19;
        double flops = 2.0 * p.M * p.N * p.K * (p.swiglu() ? 2 : 1);
        int T = std::max(1, std::min(n_threads, (int)(flops / kMinFlopsPerThread)));
        packed(p, T);
    }
};

// The two public entry points of one instruction set, over its Isa. N = B.rows, K = B.cols.
template <class Isa>
void matmul_nt_impl(float* C, const float* A, const WeightMatrix& B, int M, const float* row_scale,
                    const float* col_scale, bool accumulate, int n_threads) {
    Problem p{C, A, &B, nullptr, nullptr, M, B.rows, B.cols, row_scale, col_scale, accumulate};
    Gemm<Isa>::run(p, n_threads);
}

template <class Isa>
void matmul_nt_swiglu_impl(float* out, const float* A, const WeightMatrix& B_gate,
                           const WeightMatrix& B_up, int M, const float* row_scale,
                           const float* col_scale, int n_threads) {
    Problem p{out, A, nullptr, &B_gate, &B_up, M, B_gate.rows, B_gate.cols, row_scale, col_scale, false};
    Gemm<Isa>::run(p, n_threads);
}

// Generic A micro-panel packing: A rows [m0, m0 + rows) (rows <= MR; missing rows are
// zero), k in [k0, k0 + kc), into dst[k*MR + i], scaled by the A' rule.
template <int MR>
inline void pack_a_panel_generic(float* dst, const float* A, int K, int m0, int rows, int k0,
                                 int kc, const float* row_scale, const float* col_scale) {
    for (int i = 0; i < MR; i++) {
        if (i >= rows) {
            for (int k = 0; k < kc; k++) dst[k * MR + i] = 0.0f;
            continue;
        }
        const float* a_row = A + (size_t)(m0 + i) * K;
        bool has_rs = row_scale != nullptr;
        float rs = has_rs ? row_scale[m0 + i] : 1.0f;
        for (int k = 0; k < kc; k++) dst[k * MR + i] = scaled(a_row, k0 + k, rs, has_rs, col_scale);
    }
}

// Generic B micro-panel packing: dst[k*NR + j] = rows[j][k0 + k] (0 where rows[j] is null).
template <int NR>
inline void pack_b_panel_generic(float* dst, const float* const rows[NR], int k0, int kc) {
    for (int j = 0; j < NR; j++) {
        const float* r = rows[j];
        if (!r) {
            for (int k = 0; k < kc; k++) dst[k * NR + j] = 0.0f;
            continue;
        }
        for (int k = 0; k < kc; k++) dst[k * NR + j] = r[k0 + k];
    }
}

}  // namespace
}  // namespace xvalid::fast
