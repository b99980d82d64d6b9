// xvalid-base64-test: the fast base64 decoders (AVX2 and scalar) against the exact one, which
// checks one character at a time (base64.h). Every byte value at every position of texts of
// many lengths (the AVX2 loop's 32-character steps, its 11-quad tail rule, the scalar tail and
// the last quad all get hit), every padding variant of the last quad, random multi-character
// damage, and a text of several MiB. Same verdict, same bytes, and for an invalid text, decode
// names the same offset as the exact decoder. Run by ctest; XVALID_ISA=portable makes decode
// take the scalar path.
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "io/base64.h"

using namespace xvalid;

static int g_checks = 0, g_failures = 0;
static std::mt19937 g_rng(4321);
static const char* kAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static std::string random_text(size_t quads) {
    std::string text(quads * 4, 'A');
    for (char& c : text) c = kAlphabet[g_rng() & 63];
    return text;
}

static std::string printable(const std::string& text) {
    std::string out;
    for (unsigned char c : text.substr(0, 80)) {
        char hex[8];
        std::snprintf(hex, sizeof hex, c >= 0x20 && c < 0x7f ? "%c" : "\\x%02x", c);
        out += hex;
    }
    return out + (text.size() > 80 ? "..." : "");
}

// One text through every decoder: all agree with decode_exact.
static void check(const std::string& text) {
    g_checks++;
    const size_t n = text.size();
    const size_t size = base64::decoded_size(text.data(), n);
    // one spare byte after each output, to see that no decoder writes past its size
    std::vector<uint8_t> exact(size + 1, 0xA5), fast(size + 1, 0x5A);
    size_t bad = base64::decode_exact(text.data(), n, exact.data());
    bool valid = bad == base64::npos;
    auto fail = [&](const char* what) {
        g_failures++;
        std::printf("FAIL %s on \"%s\" (%zu chars, exact: %s)\n", what, printable(text).c_str(), n,
                    valid ? "valid" : ("invalid at " + std::to_string(bad)).c_str());
    };
    if (base64::decode(text.data(), n, fast.data()) != bad) return fail("decode's verdict");
    if (valid && std::memcmp(fast.data(), exact.data(), size) != 0) return fail("decode's bytes");
    if (fast[size] != 0x5A) return fail("decode wrote past the end");
    struct Variant {
        const char* name;
        bool (*decode)(const char*, size_t, uint8_t*);
    };
    std::vector<Variant> variants = {{"decode_scalar", base64::decode_scalar}};
    if (base64::have_avx2()) variants.push_back({"decode_avx2", base64::decode_avx2});
    for (const Variant& v : variants) {
        std::fill(fast.begin(), fast.end(), 0x5A);
        if (v.decode(text.data(), n, fast.data()) != valid) return fail(v.name);
        if (valid && std::memcmp(fast.data(), exact.data(), size) != 0) return fail(v.name);
        if (fast[size] != 0x5A) return fail(v.name);
    }
}

int main() {
    // decoded_size: by the padding
    g_checks++;
    if (base64::decoded_size("", 0) != 0 || base64::decoded_size("AAAA", 4) != 3 || base64::decoded_size("AAA=", 4) != 2 ||
        base64::decoded_size("AA==", 4) != 1 || base64::decoded_size("AAAAAA==", 8) != 4) {
        g_failures++;
        std::printf("FAIL decoded_size\n");
    }
    // the exact decoder itself, on texts worked out by hand
    g_checks++;
    uint8_t out[8] = {};
    if (base64::decode_exact("TWFu", 4, out) != base64::npos || std::memcmp(out, "Man", 3) != 0 ||
        base64::decode_exact("TWE=", 4, out) != base64::npos || std::memcmp(out, "Ma", 2) != 0 ||
        base64::decode_exact("TQ==", 4, out) != base64::npos || out[0] != 'M' ||
        base64::decode_exact("T=E=", 4, out) != 1 || base64::decode_exact("TW=u", 4, out) != 2 ||
        base64::decode_exact("TQ==TWFu", 8, out) != 2 || base64::decode_exact("TWFu-WFu", 8, out) != 4) {
        g_failures++;
        std::printf("FAIL decode_exact on known texts\n");
    }

    // every byte value at every position, texts of 1 .. 16 quads and lengths around the AVX2
    // loop's step (8 quads) and its tail rule (at least 11 quads left)
    std::vector<size_t> lengths;
    for (size_t quads = 1; quads <= 16; quads++) lengths.push_back(quads);
    for (size_t quads : {19, 20, 21, 24, 27, 28, 32, 33, 40, 64}) lengths.push_back(quads);
    for (size_t quads : lengths) {
        std::string base = random_text(quads);
        check(base);
        for (size_t pos = 0; pos < base.size(); pos++) {
            for (int byte = 0; byte < 256; byte++) {
                std::string text = base;
                text[pos] = (char)byte;
                check(text);
            }
        }
    }
    // the last quad: every combination of a letter, '=', '+', '/', and a byte outside the
    // alphabet, after bodies of several lengths (and '=' early in the text)
    const char last_chars[] = {'Q', '=', '+', '/', '-', '\0', '"', '\\'};
    for (size_t quads : {0, 1, 7, 8, 11, 12, 20}) {
        std::string body = random_text(quads);
        for (char a : last_chars)
            for (char b : last_chars)
                for (char c : last_chars)
                    for (char d : last_chars) {
                        check(body + a + b + c + d);
                        check(std::string() + a + b + c + d + body);
                    }
    }
    // random damage: 1-4 bytes anywhere, texts up to 2000 characters
    for (int trial = 0; trial < 20000; trial++) {
        std::string text = random_text(1 + g_rng() % 500);
        for (int k = 0, damage = 1 + g_rng() % 4; k < damage; k++) text[g_rng() % text.size()] = (char)(g_rng() & 255);
        if (g_rng() % 4 == 0) text[text.size() - 1] = '=';
        if (g_rng() % 8 == 0) text[text.size() - 2] = '=';
        check(text);
    }
    // a long text, valid and with one bad byte near its start, middle and end
    std::string big = random_text(3 << 20 >> 2);  // 3 MiB
    check(big);
    for (size_t pos : {size_t(5), big.size() / 2 + 1, big.size() - 37, big.size() - 1}) {
        std::string text = big;
        text[pos] = '*';
        check(text);
    }

    std::printf("base64 tests (%s): %d checks, %d failures\n", base64::have_avx2() ? "avx2" : "portable", g_checks,
                g_failures);
    return g_failures == 0 ? 0 : 1;
}
