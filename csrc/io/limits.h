// Limits a model file must keep to. They come from the format's one description,
// python/xvalid/schemas/model-format.json (via the generated io/format_spec.h), which
// xvalid's Python reader reads too; docs/model-format.md lists them for users.
#pragma once

#include <cstdint>

#include "io/format_spec.h"

namespace xvalid {

// Every config size and every tensor dimension must be at most this. Sizes derived from
// them (products of two or three) then fit in int64 and the kernel's int dimensions, and
// a typo like hidden_size = 10^9 is an error instead of a giant allocation.
constexpr int64_t kMaxDim = spec::kMaxDim;

// Arrays and objects may be nested at most this deep. A model file needs 6 levels
// (weights.layers[i].wq.shape); deeper text is refused before it is parsed, so nothing
// that walks a parsed value can run out of stack.
constexpr int kMaxJsonDepth = spec::kMaxJsonDepth;

// The values a float hyperparameter may take, and its default when the config leaves it out.
struct FloatRange : spec::FloatConfig {
    constexpr bool contains(double x) const {  // false for NaN
        return (low_included ? x >= low : x > low) && (high_included ? x <= high : x < high);
    }
};

namespace detail {
constexpr bool same_name(const char* a, const char* b) {
    while (*a && *a == *b) a++, b++;
    return *a == *b;
}
// The float hyperparameter `name` of the format description; a name it lacks does not compile.
constexpr FloatRange float_config(const char* name) {
    for (const spec::FloatConfig& f : spec::kFloatConfig) {
        if (same_name(f.name, name)) return FloatRange{f};
    }
    throw "the format description has no such float config";
}
}  // namespace detail

// eps is added to mean(x^2) in float32: below 1e-30 it is on its way to rounding to 0
// (then an all-zero row divides 0 by 0), and an eps of 1 or more swamps the normalisation.
constexpr FloatRange kRmsNormEps = detail::float_config("rms_norm_eps");
// RoPE's base: theta <= 1 makes the "frequencies" grow with the dimension index; real
// models use 1e4 .. 1e9.
constexpr FloatRange kRopeTheta = detail::float_config("rope_theta");
constexpr FloatRange kFloatConfig[] = {kRmsNormEps, kRopeTheta};
static_assert(sizeof(kFloatConfig) / sizeof(kFloatConfig[0]) == sizeof(spec::kFloatConfig) / sizeof(spec::kFloatConfig[0]),
              "a float config of the format description is not read by the loader");

}  // namespace xvalid
