// Limits a model file must keep to. xvalid's Python reader applies the same ones
// (python/xvalid/config.py, modelfile.py; tests/test_hostile_files.py checks that they agree)
// and docs/model-format.md lists them for users.
#pragma once

#include <cstdint>

namespace xvalid {

// Every config size and every tensor dimension must be at most this. Sizes derived from
// them (products of two or three) then fit in int64 and the kernel's int dimensions, and
// a typo like hidden_size = 10^9 is an error instead of a giant allocation.
constexpr int64_t kMaxDim = int64_t(1) << 24;

// Arrays and objects may be nested at most this deep. A model file needs 6 levels
// (weights.layers[i].wq.shape); deeper text is refused before it is parsed, so nothing
// that walks a parsed value can run out of stack.
constexpr int kMaxJsonDepth = 64;

// The values a float hyperparameter may take, and its default when the config leaves it
// out. `range` is how messages and docs write the interval.
struct FloatRange {
    const char* name;  // the config key
    double fallback;
    double low, high;
    bool low_included, high_included;
    const char* range;

    constexpr bool contains(double x) const {  // false for NaN
        return (low_included ? x >= low : x > low) && (high_included ? x <= high : x < high);
    }
};

// eps is added to mean(x^2) in float32: below 1e-30 it is on its way to rounding to 0
// (then an all-zero row divides 0 by 0), and an eps of 1 or more swamps the normalisation.
constexpr FloatRange kRmsNormEps{"rms_norm_eps", 1e-5, 1e-30, 1.0, true, false, "[1e-30, 1)"};
// RoPE's base: theta <= 1 makes the "frequencies" grow with the dimension index; real
// models use 1e4 .. 1e9.
constexpr FloatRange kRopeTheta{"rope_theta", 1e6, 1.0, 1e12, false, true, "(1, 1e12]"};
constexpr FloatRange kFloatConfig[] = {kRmsNormEps, kRopeTheta};

}  // namespace xvalid
