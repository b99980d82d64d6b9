// How a weight matrix is stored, and the conversions to float32 that both kernels use.
//
// A model file may store its weight matrices as float32, float16, bfloat16 or int8 with block
// scales (docs/model-format.md). The kernels never expand a model to float32: a WeightMatrix
// points at the stored bytes (decoded from the file, or in place in a memory-mapped
// safetensors file), and each op converts or dequantises as it reads, inside its own loops.
// The arithmetic is float32 (the clear kernel: double sums) whatever the storage.
//
//   float32   4 bytes a weight
//   float16   2 bytes: IEEE 754 half (1 sign, 5 exponent, 10 mantissa bits); exact in float32
//   bfloat16  2 bytes: the top half of a float32's bits; exact in float32
//   int8      1 byte + 4 bytes per block_size weights: symmetric block quantisation along a
//             row (llama.cpp's Q8_0 at block_size 32):
//             value[r][c] = q[r][c] * scales[r][c / block_size], the product rounded to float32
//
// The scalar conversions below are the readable definitions; the fast kernel's SIMD loops
// (fast/) compute the same values (F16C's vcvtph2ps, a 16-bit shift for bfloat16).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace xvalid {

enum class DType : uint8_t {
    f32,   // float32
    f16,   // float16
    bf16,  // bfloat16
    q8,    // int8 with one float32 scale per block_size weights of a row
};

// The model file's name of a dtype: "float32", "float16", "bfloat16", "int8".
inline const char* dtype_name(DType dtype) {
    switch (dtype) {
        case DType::f32: return "float32";
        case DType::f16: return "float16";
        case DType::bf16: return "bfloat16";
        case DType::q8: return "int8";
    }
    return "?";
}

// Bytes of one stored weight (int8's scales not counted).
inline int dtype_itemsize(DType dtype) {
    return dtype == DType::f32 ? 4 : dtype == DType::q8 ? 1 : 2;
}

// A (rows, cols) weight matrix, row-major, as stored: nn.Linear's (out, in), or the embedding
// table (V, H). Borrowed: whoever fills it (the loader) owns the bytes.
struct WeightMatrix {
    DType dtype = DType::f32;
    const void* data = nullptr;     // (rows, cols): float, uint16_t bits (f16, bf16) or int8_t
    const float* scales = nullptr;  // int8 only: (rows, blocks_per_row()) float32
    int block_size = 0;             // int8 only: weights per scale, in [1, cols]; the last
                                    // block of a row may be partial
    int rows = 0, cols = 0;

    static WeightMatrix f32(const float* data, int rows, int cols) {
        WeightMatrix w;
        w.data = data;
        w.rows = rows;
        w.cols = cols;
        return w;
    }
    int blocks_per_row() const { return block_size > 0 ? (cols + block_size - 1) / block_size : 0; }
    // Bytes one pass over the matrix reads: the weights and, for int8, the scales.
    double bytes() const {
        double n = (double)rows * cols * dtype_itemsize(dtype);
        return dtype == DType::q8 ? n + 4.0 * rows * blocks_per_row() : n;
    }
    const float* f32_row(int r) const { return static_cast<const float*>(data) + (size_t)r * cols; }
    const uint16_t* u16_row(int r) const { return static_cast<const uint16_t*>(data) + (size_t)r * cols; }
    const int8_t* q8_row(int r) const { return static_cast<const int8_t*>(data) + (size_t)r * cols; }
    const float* scales_row(int r) const { return scales + (size_t)r * blocks_per_row(); }
};

inline float float_from_bits(uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline uint32_t bits_of_float(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    return bits;
}

// float16 -> float32, exact for every half (subnormals included; inf and NaN kept).
inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    float magnitude;
    if (exponent == 0) {  // zero and subnormals: mantissa * 2^-24, exact in float32
        magnitude = (float)mantissa * 0x1p-24f;
    } else if (exponent == 31) {  // inf, NaN
        magnitude = float_from_bits(0x7f800000u | mantissa << 13);
    } else {  // normal: exponent rebiased from 15 to 127
        magnitude = float_from_bits((exponent + 112) << 23 | mantissa << 13);
    }
    return float_from_bits(bits_of_float(magnitude) | sign);
}

// float32 -> float16, rounded to nearest, ties to even (numpy's astype(float16)); beyond
// 65504 rounds to inf, NaN stays NaN. For tests and writers: the kernels only read halves.
inline uint16_t float_to_half(float f) {
    uint32_t x = bits_of_float(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    x &= 0x7fffffffu;
    if (x >= 0x7f800000u) return sign | 0x7c00 | (x > 0x7f800000u ? 0x200 : 0);  // inf, NaN
    if (x >= 0x477ff000u) return sign | 0x7c00;  // >= 65520: rounds to inf
    if (x < 0x38800000u) {                        // below 2^-14: a half subnormal (or zero)
        uint32_t exponent = x >> 23;
        int shift = 126 - (int)exponent;  // value = m * 2^(exponent-150) = (m >> shift) * 2^-24
        if (shift > 24) return sign;      // below 2^-25: rounds to zero
        uint32_t m = (x & 0x7fffffu) | 0x800000u;
        uint32_t k = m >> shift, rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rest > half || (rest == half && (k & 1))) k++;  // k = 1024 is the smallest normal
        return sign | (uint16_t)k;
    }
    uint32_t h = ((x >> 23) - 112) << 10 | (x & 0x7fffffu) >> 13;
    uint32_t rest = x & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1))) h++;  // a carry moves into the exponent
    return sign | (uint16_t)h;
}

// bfloat16 -> float32: the 16 bits are a float32's top half. Exact.
inline float bf16_to_float(uint16_t b) { return float_from_bits((uint32_t)b << 16); }

// float32 -> bfloat16, rounded to nearest, ties to even (torch's); NaN stays NaN.
inline uint16_t float_to_bf16(float f) {
    uint32_t x = bits_of_float(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40);  // quiet NaN
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1)) >> 16);
}

// The float32 value of weight (r, c), as the reference sees it: float16/bfloat16 upcast,
// int8 dequantised (q * scale, rounded to float32). The clear kernel's one accessor.
inline float weight_at(const WeightMatrix& w, int64_t r, int64_t c) {
    size_t i = (size_t)r * w.cols + c;
    switch (w.dtype) {
        case DType::f32: return static_cast<const float*>(w.data)[i];
        case DType::f16: return half_to_float(static_cast<const uint16_t*>(w.data)[i]);
        case DType::bf16: return bf16_to_float(static_cast<const uint16_t*>(w.data)[i]);
        case DType::q8: return (float)static_cast<const int8_t*>(w.data)[i] * w.scales_row((int)r)[c / w.block_size];
    }
    return 0.0f;
}

// out[0 .. n) = weights (r, c0 .. c0+n) as float32 (weight_at), one dtype switch per call.
inline void dequantize_row(const WeightMatrix& w, int r, int c0, int n, float* out) {
    switch (w.dtype) {
        case DType::f32:
            std::memcpy(out, w.f32_row(r) + c0, sizeof(float) * n);
            return;
        case DType::f16: {
            const uint16_t* row = w.u16_row(r) + c0;
            for (int i = 0; i < n; i++) out[i] = half_to_float(row[i]);
            return;
        }
        case DType::bf16: {
            const uint16_t* row = w.u16_row(r) + c0;
            for (int i = 0; i < n; i++) out[i] = bf16_to_float(row[i]);
            return;
        }
        case DType::q8: {  // block by block: one scale per run of the inner loop
            const int8_t* row = w.q8_row(r);
            const float* scales = w.scales_row(r);
            for (int c = c0; c < c0 + n;) {
                int block = c / w.block_size;
                int end = (block + 1) * w.block_size < c0 + n ? (block + 1) * w.block_size : c0 + n;
                float scale = scales[block];
                for (; c < end; c++) out[c - c0] = (float)row[c] * scale;
            }
            return;
        }
    }
}

}  // namespace xvalid
