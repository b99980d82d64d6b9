// Base64 of the model file's tensors: RFC 4648 standard alphabet, padded, no whitespace
// (docs/model-format.md). Two decoders that accept exactly the same texts:
//   - decode_exact: one quad (4 characters -> 3 bytes) at a time, checking each character;
//     it names the first invalid one, for the loader's message. The reference.
//   - decode: the fast one, used on every tensor. It checks a whole text at once (error flags
//     OR-ed together, no branch per character) with AVX2 where the CPU has it (32 characters
//     -> 24 bytes per step; XVALID_ISA=portable forces the table-driven scalar code); only
//     when the text is not valid does it call decode_exact to find the culprit.
// Valid text: a length that is a multiple of 4, every character from the alphabet, except
// '=' as the last one or two characters (not "=" then a letter: "AB=C" is refused).
#pragma once

#include <cstddef>
#include <cstdint>

namespace xvalid::base64 {

constexpr size_t npos = static_cast<size_t>(-1);

// The bytes a text of n characters (n a multiple of 4) decodes to: n / 4 * 3, less one per
// trailing '=' (at most two).
size_t decoded_size(const char* text, size_t n);

// Decodes text[0, n) (n a multiple of 4) into out, which holds decoded_size(text, n) bytes.
// Returns npos, or the offset of the first character that is invalid where it stands (then
// out holds garbage).
size_t decode(const char* text, size_t n, uint8_t* out);
size_t decode_exact(const char* text, size_t n, uint8_t* out);

// For the tests (base64_test.cpp): decode's two bodies. true when text[0, n) is valid; then
// out holds what decode_exact writes. decode_avx2 exists in x86-64 builds and needs AVX2.
bool decode_scalar(const char* text, size_t n, uint8_t* out);
bool decode_avx2(const char* text, size_t n, uint8_t* out);
bool have_avx2();  // the CPU has AVX2 and XVALID_ISA is not "portable": decode uses decode_avx2

}  // namespace xvalid::base64
