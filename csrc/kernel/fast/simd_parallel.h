// What the fast kernel's SIMD sources (simd_ops.cpp, simd_attention.cpp) share: when an op
// runs on one thread or on OpenMP's, and the loop that hands the work out. Like them it is
// compiled once per instruction set, into namespace xvalid::fast::XVALID_SIMD_NS.
#pragma once

#include <cstdint>

#include "../ops.h"  // get_num_threads

#ifndef XVALID_SIMD_NS
#error "compile with -DXVALID_SIMD_NS=avx2 or -DXVALID_SIMD_NS=portable"
#endif

namespace xvalid {
namespace fast {
namespace XVALID_SIMD_NS {

// Below this many floats an op runs on one thread: waking the others costs more.
static constexpr int64_t kParallelMin = 1 << 14;

static inline int threads_for(int64_t work) { return work < kParallelMin ? 1 : get_num_threads(); }

// body(i) for i in [0, n), on `threads` OpenMP threads (dynamic: tasks of uneven cost are
// handed out one at a time). On one thread no OpenMP region is entered at all: even a
// one-thread region costs about a microsecond, and a tiny model's forward has a dozen.
template <bool dynamic = false, class Body>
static inline void parallel_for(int64_t n, int threads, const Body& body) {
    if (threads <= 1 || n <= 1) {
        for (int64_t i = 0; i < n; i++) body(i);
    } else if (dynamic) {
#pragma omp parallel for schedule(dynamic) num_threads(threads)
        for (int64_t i = 0; i < n; i++) body(i);
    } else {
#pragma omp parallel for num_threads(threads)
        for (int64_t i = 0; i < n; i++) body(i);
    }
}

}  // namespace XVALID_SIMD_NS
}  // namespace fast
}  // namespace xvalid
