// Per-op timers for the C++ kernel: calls, seconds, floating-point operations and bytes
// moved, per op of the forward pass. Off by default; when off, each op pays one untaken
// branch (transformer.cpp's OpRunner), nothing is timed or counted.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

namespace xvalid {

// The ops the profile reports, in forward order. The fused ops keep one name for the whole
// fused pass: rmsnorm includes the residual add before it, gate_up_swiglu the SwiGLU, rope
// the append of k and v to the KV cache.
enum class Op : int {
    embedding, rmsnorm, q_proj, k_proj, v_proj, rope, attention, o_proj, gate_up_swiglu,
    down_proj, head, count
};

const char* op_name(Op op);

struct OpStats {
    int64_t calls = 0;
    double seconds = 0;
    double flops = 0;  // floating-point operations (a multiply-add counts 2)
    double bytes = 0;  // bytes read and written, counting every weight and activation once per call
};

struct Profile {
    bool enabled = false;
    std::array<OpStats, (std::size_t)Op::count> ops{};

    void reset() { ops = {}; }
    void add(Op op, double seconds, double flops, double bytes) {
        OpStats& s = ops[(std::size_t)op];
        s.calls += 1;
        s.seconds += seconds;
        s.flops += flops;
        s.bytes += bytes;
    }
};

}  // namespace xvalid
