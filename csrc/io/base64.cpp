#include "base64.h"

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define XVALID_BASE64_AVX2 1
#include <immintrin.h>
#endif

namespace xvalid::base64 {
namespace {

constexpr const char* kAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
constexpr int8_t kNotBase64 = -1, kPadding = -2;

// A character's 6-bit value, kNotBase64, or kPadding for '='.
constexpr std::array<int8_t, 256> make_values() {
    std::array<int8_t, 256> table{};
    for (auto& value : table) value = kNotBase64;
    for (int i = 0; i < 64; i++) table[(unsigned char)kAlphabet[i]] = (int8_t)i;
    table['='] = kPadding;
    return table;
}
constexpr std::array<int8_t, 256> kValue = make_values();

// ---- the scalar fast path: one table per position in a quad ----
// kQuad[p][c]: character c's 6 bits already shifted to their place in the quad's 24-bit
// group (p = 0 highest), or kInvalid for a character outside the alphabet ('=' included, so
// padding is left to the last quad's exact check). A quad is 4 lookups OR-ed together; the
// invalid flags of a whole text are OR-ed into one word, tested once at the end.
constexpr uint32_t kInvalid = 1u << 31;
struct QuadTables {
    uint32_t at[4][256];
};
constexpr QuadTables make_quad_tables() {
    QuadTables t{};
    for (int p = 0; p < 4; p++) {
        for (int c = 0; c < 256; c++) t.at[p][c] = kValue[c] < 0 ? kInvalid : (uint32_t)kValue[c] << (18 - 6 * p);
    }
    return t;
}
constexpr QuadTables kQuad = make_quad_tables();

// `quads` quads without padding from `in` to 3 * quads bytes at `out`; false if any
// character is outside the alphabet.
bool body_scalar(const unsigned char* in, size_t quads, uint8_t* out) {
    uint32_t flags = 0;
    for (size_t q = 0; q < quads; q++, in += 4, out += 3) {
        uint32_t bits = kQuad.at[0][in[0]] | kQuad.at[1][in[1]] | kQuad.at[2][in[2]] | kQuad.at[3][in[3]];
        flags |= bits;
        out[0] = (uint8_t)(bits >> 16);
        out[1] = (uint8_t)(bits >> 8);
        out[2] = (uint8_t)bits;
    }
    return (flags & kInvalid) == 0;
}

#ifdef XVALID_BASE64_AVX2
// ---- AVX2: 32 characters -> 24 bytes per step ----
// A byte c splits into nibbles hi = c >> 4 and lo = c & 15. It is in the alphabet iff
// kValidLo[lo] has bit hi set (kHiBit[hi] = 1 << hi; 0 for hi >= 8, i.e. non-ASCII). Its
// value is c + kShift[hi], except '/' (which shares hi = 2 with '+'): c + 16.
struct NibbleTables {
    uint8_t valid_lo[16];
    uint8_t hi_bit[16];
    int8_t shift[16];
};
constexpr NibbleTables make_nibble_tables() {
    NibbleTables t{};
    for (int i = 0; i < 64; i++) {
        unsigned char c = (unsigned char)kAlphabet[i];
        t.valid_lo[c & 15] |= (uint8_t)(1 << (c >> 4));
        if (c != '/') t.shift[c >> 4] = (int8_t)(i - c);  // the same for every character of a row
    }
    for (int hi = 0; hi < 8; hi++) t.hi_bit[hi] = (uint8_t)(1 << hi);
    return t;
}
constexpr NibbleTables kNibble = make_nibble_tables();
static_assert(kNibble.shift[2] == 62 - '+' && kNibble.shift[3] == 52 - '0' && kNibble.shift[4] == -'A' &&
              kNibble.shift[5] == -'A' && kNibble.shift[6] == 26 - 'a' && kNibble.shift[7] == 26 - 'a');

__attribute__((target("avx2"))) inline __m256i broadcast16(const void* table) {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128(static_cast<const __m128i*>(table)));
}

__attribute__((target("avx2"))) bool body_avx2(const unsigned char* in, size_t quads, uint8_t* out) {
    const __m256i valid_lo = broadcast16(kNibble.valid_lo), hi_bit = broadcast16(kNibble.hi_bit),
                  shift_hi = broadcast16(kNibble.shift);
    const __m256i low4 = _mm256_set1_epi8(0x0f), slash = _mm256_set1_epi8('/'), slash_shift = _mm256_set1_epi8(63 - '/');
    // each 32-bit lane holds a quad's values a, b, c, d (one byte each, a first):
    // maddubs -> (a << 6 | b), (c << 6 | d) as 16-bit; madd -> a << 18 | b << 12 | c << 6 | d
    const __m256i merge_pairs = _mm256_set1_epi32(0x01400140), merge_quads = _mm256_set1_epi32(0x00011000);
    // the three bytes of each lane, most significant first, packed into the lane's first 12
    const __m256i order = _mm256_setr_epi8(2, 1, 0, 6, 5, 4, 10, 9, 8, 14, 13, 12, -1, -1, -1, -1,  //
                                           2, 1, 0, 6, 5, 4, 10, 9, 8, 14, 13, 12, -1, -1, -1, -1);
    const __m256i join_lanes = _mm256_setr_epi32(0, 1, 2, 4, 5, 6, 3, 7);  // 12 + 12 bytes first
    __m256i invalid = _mm256_setzero_si256();
    // 8 quads per step; the 32-byte store needs 32 bytes of room (8 more than it fills)
    for (; quads >= 11; quads -= 8, in += 32, out += 24) {
        __m256i chars = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in));
        __m256i hi = _mm256_and_si256(_mm256_srli_epi32(chars, 4), low4);
        __m256i lo = _mm256_and_si256(chars, low4);
        __m256i ok = _mm256_and_si256(_mm256_shuffle_epi8(valid_lo, lo), _mm256_shuffle_epi8(hi_bit, hi));
        invalid = _mm256_or_si256(invalid, _mm256_cmpeq_epi8(ok, _mm256_setzero_si256()));
        __m256i shift = _mm256_blendv_epi8(_mm256_shuffle_epi8(shift_hi, hi), slash_shift, _mm256_cmpeq_epi8(chars, slash));
        __m256i values = _mm256_add_epi8(chars, shift);
        __m256i groups = _mm256_madd_epi16(_mm256_maddubs_epi16(values, merge_pairs), merge_quads);
        __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(groups, order), join_lanes);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), bytes);
    }
    return _mm256_testz_si256(invalid, invalid) && body_scalar(in, quads, out);
}
#endif

bool use_avx2() {
#ifdef XVALID_BASE64_AVX2
    static const bool chosen = [] {
        const char* forced = std::getenv("XVALID_ISA");  // as the fast kernel's matmul (matmul.cpp)
        if (forced && std::strcmp(forced, "portable") == 0) return false;
        __builtin_cpu_init();
        return (bool)__builtin_cpu_supports("avx2");
    }();
    return chosen;
#else
    return false;
#endif
}

// The fast path: every quad but the last by `body` (body_scalar or body_avx2), which only
// says whether all were valid, then the last quad, where padding may stand, by the exact
// decoder. (One thread: decoding runs at several GB/s, and splitting it over two threads made
// a load slower whenever another process kept a core busy.)
using Body = bool (*)(const unsigned char* in, size_t quads, uint8_t* out);
bool decode_with(Body body, const char* text, size_t n, uint8_t* out) {
    if (n == 0) return true;
    const size_t quads = n / 4 - 1;
    return body(reinterpret_cast<const unsigned char*>(text), quads, out) &&
           decode_exact(text + 4 * quads, 4, out + 3 * quads) == npos;
}

}  // namespace

size_t decoded_size(const char* text, size_t n) {
    size_t padding = (n >= 1 && text[n - 1] == '=') + (n >= 2 && text[n - 2] == '=');
    return n / 4 * 3 - padding;
}

size_t decode_exact(const char* text, size_t n, uint8_t* out) {
    const auto* in = reinterpret_cast<const unsigned char*>(text);
    for (size_t i = 0; i < n; i += 4) {
        int a = kValue[in[i]], b = kValue[in[i + 1]], c = kValue[in[i + 2]], d = kValue[in[i + 3]];
        bool last = i + 4 == n;
        if (a < 0) return i;
        if (b < 0) return i + 1;
        if (c == kNotBase64 || (c == kPadding && !(last && d == kPadding))) return i + 2;
        if (d == kNotBase64 || (d == kPadding && !last)) return i + 3;
        uint32_t bits = (uint32_t)a << 18 | (uint32_t)b << 12 | (uint32_t)std::max(c, 0) << 6 | (uint32_t)std::max(d, 0);
        *out++ = (uint8_t)(bits >> 16);
        if (c >= 0) *out++ = (uint8_t)(bits >> 8);
        if (d >= 0) *out++ = (uint8_t)bits;
    }
    return npos;
}

size_t decode(const char* text, size_t n, uint8_t* out) {
#ifdef XVALID_BASE64_AVX2
    Body body = use_avx2() ? body_avx2 : body_scalar;
#else
    Body body = body_scalar;
#endif
    return decode_with(body, text, n, out) ? npos : decode_exact(text, n, out);
}

bool decode_scalar(const char* text, size_t n, uint8_t* out) { return decode_with(body_scalar, text, n, out); }

bool decode_avx2(const char* text, size_t n, uint8_t* out) {
#ifdef XVALID_BASE64_AVX2
    return decode_with(body_avx2, text, n, out);
#else
    (void)text, (void)n, (void)out;
    return false;
#endif
}

bool have_avx2() { return use_avx2(); }

}  // namespace xvalid::base64
