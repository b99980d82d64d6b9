// Tests of the fast matmul against a naive double-accumulated reference, for every
// instruction set built in (AVX2+FMA when the CPU has it, portable always) and the run-time
// dispatch, over shapes that hit every tile edge: M, N, K below, at and just past the tile
// and block sizes, thread counts 1, 2, 3. Meant to run under -fsanitize=address,undefined
// too: C and the inputs are exact-size heap arrays, so an out-of-bounds access is reported.
//
//   matmul_test [expected-isa]     exit 0 all pass, 1 a mismatch, 2 bad usage
// expected-isa ("avx2+fma" or "portable") checks what the dispatch chose, e.g. with
// XVALID_ISA=portable in the environment.
//
// By hand (the AVX2 unit alone gets -mavx2 -mfma -mf16c; add -fsanitize=address,undefined to all):
//   g++ -std=c++17 -O2 -fopenmp -c matmul.cpp matmul_portable.cpp
//   g++ -std=c++17 -O2 -fopenmp -mavx2 -mfma -mf16c -c matmul_avx2.cpp
//   g++ -std=c++17 -O2 -fopenmp matmul_test.cpp matmul.o matmul_portable.o matmul_avx2.o -o matmul_test
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "matmul.h"
#include "matmul_isa.h"

using namespace xvalid::fast;

namespace {

using MatmulFn = void (*)(float*, const float*, const float*, int, int, int, const float*,
                          const float*, bool, int);
using SwigluFn = void (*)(float*, const float*, const float*, const float*, int, int, int,
                          const float*, const float*, int);

struct Impl {
    const char* name;
    MatmulFn matmul;
    SwigluFn swiglu;
};

std::vector<Impl> implementations() {
    std::vector<Impl> impls{{"dispatch", matmul_nt, matmul_nt_swiglu},
                            {"portable", portable::matmul_nt, portable::matmul_nt_swiglu}};
#ifdef XVALID_HAVE_AVX2  // the build compiled the AVX2 unit
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        impls.push_back({"avx2", avx2::matmul_nt, avx2::matmul_nt_swiglu});
    else
        std::printf("note: this CPU has no AVX2+FMA; the avx2 code is not tested here\n");
#endif
    return impls;
}

std::mt19937 rng(1234);
std::vector<float> random_vector(size_t n, float lo, float hi) {
    std::uniform_real_distribution<float> u(lo, hi);
    std::vector<float> v(n);
    for (auto& x : v) x = u(rng);
    return v;
}

// One product's inputs.
struct Case {
    int M, N, K;
    std::vector<float> A, B, B2, row_scale, col_scale, C0;
    bool scales;
};

// Reference products A' B^T and A' B2^T in double, with per-element error bounds.
struct Reference {
    std::vector<double> dot, bound, dot2, bound2;
};

// A' by the documented rule, in float32: (A * row_scale) * col_scale.
std::vector<float> scaled_a(const Case& c) {
    std::vector<float> a(c.A);
    if (!c.scales) return a;
    for (int m = 0; m < c.M; m++)
        for (int k = 0; k < c.K; k++) {
            float v = c.A[(size_t)m * c.K + k] * c.row_scale[m];
            a[(size_t)m * c.K + k] = v * c.col_scale[k];
        }
    return a;
}

// dot and a bound on float32 accumulation error: 1e-5 * sqrt(K) * max |term|.
void dot_ref(const float* a, const float* b, int K, double& dot, double& bound) {
    double s = 0, big = 0;
    for (int k = 0; k < K; k++) {
        double t = (double)a[k] * b[k];
        s += t;
        big = std::max(big, std::fabs(t));
    }
    dot = s;
    bound = 1e-5 * std::sqrt((double)K) * big + 1e-30;
}

int failures = 0;
void report(const char* what, const Impl& impl, const Case& c, int threads, int m, int n,
            double got, double want, double bound) {
    if (++failures <= 20)
        std::printf("FAIL %s %s M=%d N=%d K=%d scales=%d threads=%d at (%d, %d): got %.9g want %.9g (bound %.3g)\n",
                    what, impl.name, c.M, c.N, c.K, (int)c.scales, threads, m, n, got, want, bound);
}

Reference reference(const Case& c) {
    std::vector<float> a = scaled_a(c);
    size_t n = (size_t)c.M * c.N;
    Reference r{std::vector<double>(n), std::vector<double>(n), std::vector<double>(n), std::vector<double>(n)};
    for (int m = 0; m < c.M; m++)
        for (int j = 0; j < c.N; j++) {
            size_t i = (size_t)m * c.N + j;
            dot_ref(&a[(size_t)m * c.K], &c.B[(size_t)j * c.K], c.K, r.dot[i], r.bound[i]);
            dot_ref(&a[(size_t)m * c.K], &c.B2[(size_t)j * c.K], c.K, r.dot2[i], r.bound2[i]);
        }
    return r;
}

void check_matmul(const Impl& impl, const Case& c, const Reference& ref, int threads,
                  bool accumulate) {
    std::vector<float> C = accumulate ? c.C0 : std::vector<float>((size_t)c.M * c.N, NAN);
    impl.matmul(C.data(), c.A.data(), c.B.data(), c.M, c.N, c.K,
                c.scales ? c.row_scale.data() : nullptr, c.scales ? c.col_scale.data() : nullptr,
                accumulate, threads);
    for (int m = 0; m < c.M; m++)
        for (int n = 0; n < c.N; n++) {
            size_t i = (size_t)m * c.N + n;
            double want = ref.dot[i], bound = ref.bound[i], got = C[(size_t)m * c.N + n];
            if (accumulate) {
                want += c.C0[(size_t)m * c.N + n];
                bound += 1e-6 * std::fabs(want);
            }
            if (!(std::fabs(got - want) <= bound)) {  // also catches NaN: unwritten elements
                report(accumulate ? "matmul_nt(accumulate)" : "matmul_nt", impl, c, threads, m, n, got, want, bound);
                return;
            }
        }
}

void check_swiglu(const Impl& impl, const Case& c, const Reference& ref, int threads) {
    std::vector<float> out((size_t)c.M * c.N, NAN);
    impl.swiglu(out.data(), c.A.data(), c.B.data(), c.B2.data(), c.M, c.N, c.K,
                c.scales ? c.row_scale.data() : nullptr, c.scales ? c.col_scale.data() : nullptr,
                threads);
    for (int m = 0; m < c.M; m++)
        for (int n = 0; n < c.N; n++) {
            size_t i = (size_t)m * c.N + n;
            double g = ref.dot[i], gb = ref.bound[i], u = ref.dot2[i], ub = ref.bound2[i];
            double silu = g / (1.0 + std::exp(-g));
            double want = silu * u;
            // |d silu / dg| <= 1.1; plus float32 rounding of silu and of the product
            double bound = 1.1 * gb * (std::fabs(u) + ub) + std::fabs(silu) * ub + 1e-6 * std::fabs(want) + 1e-30;
            double got = out[(size_t)m * c.N + n];
            if (!(std::fabs(got - want) <= bound)) {
                report("matmul_nt_swiglu", impl, c, threads, m, n, got, want, bound);
                return;
            }
        }
}

Case make_case(int M, int N, int K, bool scales) {
    Case c{M, N, K, {}, {}, {}, {}, {}, {}, scales};
    c.A = random_vector((size_t)M * K, -1, 1);
    c.B = random_vector((size_t)N * K, -1, 1);
    c.B2 = random_vector((size_t)N * K, -1, 1);
    c.row_scale = random_vector(M, 0.5f, 2.0f);
    c.col_scale = random_vector(K, 0.5f, 2.0f);
    c.C0 = random_vector((size_t)M * N, -4, 4);
    return c;
}

// silu over its whole range, through both SwiGLU paths (decode M = 1, packed M = 12): with
// K = 1, A = 1 and up = 1 the output is silu(gate) itself. 16 features fill whole vectors.
void check_silu_range(const Impl& impl) {
    const float zs[16] = {-100, -88.5f, -87, -50, -10, -1, -1e-3f, 0, 1e-3f, 0.5f, 1, 10, 50, 87, 88.5f, 100};
    for (int M : {1, 12}) {
        std::vector<float> A(M, 1.0f), gate(zs, zs + 16), up(16, 1.0f), out((size_t)M * 16, NAN);
        impl.swiglu(out.data(), A.data(), gate.data(), up.data(), M, 16, 1, nullptr, nullptr, 1);
        for (int m = 0; m < M; m++)
            for (int n = 0; n < 16; n++) {
                double z = zs[n], want = z / (1.0 + std::exp(-z)), got = out[(size_t)m * 16 + n];
                if (!(std::fabs(got - want) <= 1e-6 * std::fabs(want) + 1e-30) && ++failures <= 20)
                    std::printf("FAIL silu %s M=%d z=%g: got %.9g want %.9g\n", impl.name, M, z, got, want);
            }
    }
}

}  // namespace

int main(int argc, char** argv) {
    if (argc > 2) {
        std::fprintf(stderr, "usage: matmul_test [expected-isa]\n");
        return 2;
    }
    std::printf("dispatch chose %s\n", matmul_isa());
    if (argc == 2 && std::strcmp(argv[1], matmul_isa()) != 0) {
        std::printf("FAIL dispatch chose %s, expected %s\n", matmul_isa(), argv[1]);
        return 1;
    }
    const auto impls = implementations();
    const int Ms[] = {1, 2, 3, 4, 5, 7, 13, 33, 128};
    const int Ns[] = {1, 3, 8, 15, 16, 17, 24, 131, 200};
    const int Ks[] = {1, 3, 6, 8, 17, 64, 72, 513};
    struct Shape {
        int M, N, K;
    };
    std::vector<Shape> shapes;
    for (int M : Ms)
        for (int N : Ns)
            for (int K : Ks) shapes.push_back({M, N, K});
    // Several M, N and K blocks at once (MC 120/128, NC 512, SwiGLU NC/2, KC 256).
    shapes.push_back({251, 1100, 600});
    shapes.push_back({6, 530, 257});
    for (const Impl& impl : impls) check_silu_range(impl);
    long checks = 0;
    for (const Shape& s : shapes) {
        for (bool scales : {false, true}) {
            // Scales only on a subset of the grid, to keep the sanitizer run short.
            if (scales && (s.N % 2 == 0) != (s.K % 2 == 0)) continue;
            Case c = make_case(s.M, s.N, s.K, scales);
            Reference ref = reference(c);
            for (const Impl& impl : impls)
                for (int threads : {1, 2, 3}) {
                    // the dispatch calls one of the others: one thread count is enough
                    if (std::strcmp(impl.name, "dispatch") == 0 && threads != 2) continue;
                    check_matmul(impl, c, ref, threads, false);
                    check_matmul(impl, c, ref, threads, true);
                    check_swiglu(impl, c, ref, threads);
                    checks += 3;
                }
        }
    }
    std::printf("%ld checks over %zu shapes, %d failures\n", checks, shapes.size(), failures);
    return failures ? 1 : 0;
}
