#include "model_file.h"

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iterator>
#include <map>
#include <tuple>
#include <memory>
#include <type_traits>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "base64.h"
#include "kernel/dtype.h"

#include "forward_memory.h"
#include "limits.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "model files hold little-endian tensors; this reader copies them as they are"
#endif

namespace xvalid {
namespace {

using json = nlohmann::json;

using spec::kFormatVersion;  // the newest "format_version" this reader understands

template <size_t N>
bool listed(const char* const (&list)[N], const std::string& name) {
    return std::any_of(std::begin(list), std::end(list), [&](const char* d) { return name == d; });
}

bool is_reserved_dtype(const std::string& name) { return listed(spec::kReservedDtypes, name); }

// The dtypes a weights.* tensor may be stored in: matrices every weight dtype, vectors (the
// norms) all but the matrix-only ones (int8).
std::vector<std::string> weight_dtypes(bool matrix) {
    std::vector<std::string> names;
    for (const char* d : spec::kWeightDtypes) {
        if (matrix || !listed(spec::kMatrixOnlyDtypes, d)) names.push_back(d);
    }
    return names;
}

// "float32" or "float32, float16 or bfloat16", as messages (and the Python reader) write a
// list of dtypes.
std::string dtype_list(const std::vector<std::string>& names) {
    std::string text;
    for (size_t i = 0; i < names.size(); i++) {
        text += (i == 0 ? "" : i + 1 == names.size() ? " or " : ", ") + names[i];
    }
    return text;
}

DType weight_dtype(const std::string& name) {
    for (DType d : {DType::f32, DType::f16, DType::bf16, DType::q8}) {
        if (name == dtype_name(d)) return d;
    }
    throw std::logic_error("not a weight dtype: " + name);  // entry() admits only weight_dtypes()
}

// ---- messages ----

std::string join_key(const std::string& parent, const std::string& name) {
    return parent.empty() ? name : parent + "." + name;
}

// A JSON value's type as the Python reader names it in its messages (json.loads' types).
std::string python_type(const nlohmann::json& value) {
    if (value.is_object()) return "dict";
    if (value.is_array()) return "list";
    if (value.is_string()) return "str";
    if (value.is_boolean()) return "bool";
    if (value.is_number_float()) return "float";
    if (value.is_number()) return "int";
    return "NoneType";
}

std::string shape_str(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); i++) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

// Text quoted from the file is cut to this many characters ("..." ending the cut).
constexpr size_t kQuoteChars = 40;

std::string cut(const std::string& text) {
    return text.size() <= kQuoteChars ? text : text.substr(0, kQuoteChars - 3) + "...";
}

// A string as Python's repr() writes it in the Python reader's messages: 'text'.
std::string quoted(const std::string& text) { return "'" + cut(text) + "'"; }

// Appends `value` as JSON to `out`, walking at most `levels` levels of arrays and objects
// and stopping once `out` is longer than kQuoteChars: the cost is bounded however deep or
// large the value. (A full dump() recurses once per level, and a hostile file can nest
// 100000 levels.) Invalid UTF-8 in a string is replaced rather than thrown on.
void append_brief(const json& value, int levels, std::string& out) {
    if (value.is_string()) {
        const std::string& text = value.get_ref<const std::string&>();
        out += json(text.substr(0, kQuoteChars + 1)).dump(-1, ' ', false, json::error_handler_t::replace);
    } else if (value.is_array() || value.is_object()) {
        bool object = value.is_object();
        out += object ? '{' : '[';
        if (levels == 0 && !value.empty()) out += "...";
        for (auto it = value.begin(); levels > 0 && it != value.end() && out.size() <= kQuoteChars; ++it) {
            if (it != value.begin()) out += ", ";
            if (object) out += json(it.key().substr(0, kQuoteChars + 1)).dump(-1, ' ', false, json::error_handler_t::replace) + ": ";
            append_brief(*it, levels - 1, out);
        }
        out += object ? '}' : ']';
    } else {
        out += value.dump();  // a number, true, false or null
    }
}

// A JSON value as it appears in the file, cut short for a one-line message. Python's
// reader (errors.py brief) writes the same text.
std::string brief(const json& value) {
    std::string out;
    append_brief(value, 3, out);
    return cut(out);
}

std::string char_str(unsigned char ch) {
    if (ch >= 0x20 && ch < 0x7f) return std::string("'") + (char)ch + "'";
    char hex[8];
    std::snprintf(hex, sizeof hex, "0x%02x", ch);
    return hex;
}

// ---- the reader ----

// Where the parser is, as a message key ("config.hidden_size", "weights.layers[1].wq"), kept
// current by the parser's callback: a number the parser cannot hold is reported by its key.
class KeyTracker {
public:
    void see(json::parse_event_t event, const json& parsed) {
        switch (event) {
            case json::parse_event_t::object_start: levels_.push_back({false, "", 0}); break;
            case json::parse_event_t::array_start: levels_.push_back({true, "", 0}); break;
            case json::parse_event_t::key: levels_.back().name = parsed.get_ref<const std::string&>(); break;
            case json::parse_event_t::object_end:
            case json::parse_event_t::array_end:
                levels_.pop_back();
                element_done();
                break;
            case json::parse_event_t::value: element_done(); break;
        }
    }

    // The name of the object member being parsed ("" in an array or at the top level).
    const std::string& member() const {
        static const std::string none;
        return levels_.empty() || levels_.back().in_array ? none : levels_.back().name;
    }

    // The value being parsed: "(top level)", "config.hidden_size", "weights.layers[1]", ...
    // Python's reader (modelfile.py) names keys the same way.
    std::string key() const {
        std::string key;
        for (const Level& level : levels_) {
            if (level.in_array) {
                key += "[" + std::to_string(level.index) + "]";
            } else {
                key += (key.empty() ? "" : ".") + cut(level.name);
            }
        }
        return key.empty() ? "(top level)" : key;
    }

private:
    struct Level {
        bool in_array;
        std::string name;  // objects: the current member's key
        size_t index;      // arrays: elements read so far, so the current one's index
    };

    void element_done() {
        if (!levels_.empty() && levels_.back().in_array) levels_.back().index++;
    }

    std::vector<Level> levels_;
};

// A "data" text decoded before or while the file is parsed, so the parsed document never
// holds the base64 of the weights: it holds json::binary({}, index of this) instead. Only
// valid base64 of at least kDecodeWhileParsing characters is decoded early; anything else
// stays a string and is checked (with its exact message) where the tensor is read.
struct DecodedData {
    std::vector<float> values;  // the bytes, in float-aligned storage: float32 tensors move out
    size_t nbytes = 0;
    size_t chars = 0;           // the base64 text's length
};
constexpr size_t kDecodeWhileParsing = 4096;

// Asks for 2 MiB pages for a fresh buffer of `bytes` before it is first written. Its first
// touch then costs a page fault per 2 MiB instead of per 4 KiB: on this project's machine
// (a VM, transparent huge pages on request) 0.03 s instead of 0.13 s for 128 MiB, the largest
// cost of loading a model's weights. Only a hint: nothing changes where it is not granted.
void advise_huge_pages(void* p, size_t bytes) {
#ifdef MADV_HUGEPAGE
    constexpr size_t kHuge = 2 << 20;
    if (bytes < 2 * kHuge) return;
    static const uintptr_t page = (uintptr_t)::sysconf(_SC_PAGESIZE);
    uintptr_t begin = ((uintptr_t)p + page - 1) / page * page, end = ((uintptr_t)p + bytes) / page * page;
    ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
    (void)p, (void)bytes;
#endif
}

// The content of one string in the text, without its quotes: bytes [begin, end).
struct Span {
    size_t begin, end;
};

// The checks made on the raw text before it is parsed, and where the tensors' base64 is:
//   - nul_at: the offset of the first NUL byte (nlohmann's parser would take it for the end);
//   - too_deep_at: of the first '[' or '{' that opens a level deeper than kMaxJsonDepth,
//     strings skipped. The depth scan is the same as Python's reader's (modelfile.py
//     _scan_text), so both refuse the same files: a quote closes a string after an even
//     number of backslashes; on text that is not JSON the count may be off, and the parser
//     then reports the syntax error;
//   - data_strings: every string of at least kDecodeWhileParsing characters written as the
//     value of a "data" member: `"data"`, whitespace, ':', whitespace, the string. (A key
//     spelled with escapes, "d\u0061ta", is not seen here: its value is left to the parser.)
// The text is scanned in windows (scan_to), so that the caller can release what lies behind.
class TextScan {
public:
    static constexpr size_t npos = std::string::npos;
    size_t nul_at = npos, too_deep_at = npos;
    std::vector<Span> data_strings;

    // `text` stays readable, whole, while this scans it.
    TextScan(const char* text, size_t size) : text_(text), size_(size) {}

    // Scans on to byte `end` (at most the size). The depth scan stops at the first level too deep.
    void scan_to(size_t end) {
        if (nul_at == npos && end > nul_scanned_) {
            const void* nul = std::memchr(text_ + nul_scanned_, '\0', end - nul_scanned_);
            if (nul) nul_at = (const char*)nul - text_;
        }
        nul_scanned_ = std::max(nul_scanned_, end);
        while (pos_ < end && too_deep_at == npos) {
            if (in_string_) {
                skip_string(end);
                continue;
            }
            switch (text_[pos_]) {
                case '[':
                case '{':
                    if (++depth_ > kMaxJsonDepth) too_deep_at = pos_;
                    after_ = After::other;
                    break;
                case ']':
                case '}':
                    depth_--;
                    after_ = After::other;
                    break;
                case '"':
                    in_string_ = true;
                    string_begin_ = pos_ + 1;
                    backslashes_ = 0;
                    value_of_data_ = after_ == After::colon;
                    break;
                case ':':
                    after_ = after_ == After::data_key ? After::colon : After::other;
                    break;
                case ' ':
                case '\t':
                case '\n':
                case '\r':
                    break;
                default:
                    after_ = After::other;
            }
            pos_++;
        }
    }
    void scan_all() { scan_to(size_); }

    // Where the text the scan still needs begins: the string being scanned, else the end of
    // the scanned text.
    size_t needed_from() const { return in_string_ ? string_begin_ : pos_; }

private:
    // Inside a string: on to the character after its closing quote, or to `end`.
    void skip_string(size_t end) {
        for (;;) {
            const void* found = std::memchr(text_ + pos_, '"', end - pos_);
            size_t quote = found ? (const char*)found - text_ : end;
            size_t k = quote;  // backslashes right before the quote, carried over from the last window
            while (k > pos_ && text_[k - 1] == '\\') k--;
            size_t run = (quote - k) + (k == pos_ ? backslashes_ : 0);
            if (!found) {
                backslashes_ = run;
                pos_ = end;
                return;
            }
            backslashes_ = 0;
            pos_ = quote + 1;
            if (run % 2 == 0) {
                in_string_ = false;
                string_ended(quote);
                return;
            }
        }
    }

    void string_ended(size_t quote) {
        size_t length = quote - string_begin_;
        if (value_of_data_ && length >= kDecodeWhileParsing) data_strings.push_back({string_begin_, quote});
        bool data_key = length == 4 && std::memcmp(text_ + string_begin_, "data", 4) == 0;
        after_ = data_key ? After::data_key : After::other;
    }

    const char* text_;
    size_t size_;
    size_t pos_ = 0, nul_scanned_ = 0;
    int depth_ = 0;
    bool in_string_ = false;
    size_t string_begin_ = 0;  // the current string's first character
    size_t backslashes_ = 0;   // the string's backslashes right before pos_
    // what the text since the last string is: `"data"`, then maybe ':' (whitespace aside)
    enum class After { other, data_key, colon } after_ = After::other;
    bool value_of_data_ = false;  // the current string follows `"data":`
};

// A decoded data string's content, left out of what the parser reads (see SkippingIterator).
struct Skip {
    size_t begin, end;  // the content, as in Span
    size_t decoded;     // its bytes: decoded_[decoded]
};

// The text as the parser reads it, each skipped string's content left out: the parser sees
// "" there, and `pending` names the decoded bytes that the "" stands for until the parser's
// callback takes them (the next value event: the lexer reads a whole string before the
// parser reports it). An input iterator for nlohmann's parser.
struct SkippingIterator {
    using iterator_category = std::input_iterator_tag;
    using value_type = char;
    using difference_type = std::ptrdiff_t;
    using pointer = const char*;
    using reference = const char&;
    const char* text;
    size_t pos;
    const Skip* next;  // the next skip at or after pos (== last: none)
    const Skip* last;
    size_t* pending;
    const char& operator*() const { return text[pos]; }
    SkippingIterator& operator++() {
        if (++pos == (next != last ? next->begin : npos)) {
            *pending = next->decoded;
            pos = next->end;
            ++next;
        }
        return *this;
    }
    bool operator==(const SkippingIterator& other) const { return pos == other.pos; }
    bool operator!=(const SkippingIterator& other) const { return pos != other.pos; }
    static constexpr size_t npos = std::string::npos;
};

// A skipped string the parser did not report as a "data" value where it stood: the skips
// were wrong for this text (it is not JSON), so it is parsed again whole.
struct SkipMismatch {};

// A JSON model file's text, whole: memory-mapped when it is a regular file, else read into
// memory (a device, a pipe). Mapped pages are given back once read (release_before), so that the text
// of a 500 MB file never sits in memory whole; a page read again is mapped again from the
// page cache.
class FileText {
public:
    FileText() = default;
    FileText(const FileText&) = delete;
    FileText& operator=(const FileText&) = delete;
    ~FileText() {
        if (mapped_) ::munmap(mapped_, size_);
    }

    const char* data() const { return mapped_ ? static_cast<const char*>(mapped_) : bytes_.data(); }
    size_t size() const { return mapped_ ? size_ : bytes_.size(); }

    // false if `fd` is no regular file or cannot be mapped
    bool map(int fd, size_t size) {
        if (size == 0) return false;
        void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) return false;
        mapped_ = p;
        size_ = size;
        return true;
    }
    std::string& bytes() { return bytes_; }

    // The pages wholly before `offset` are not needed for now.
    void release_before(size_t offset) {
        if (!mapped_) return;
        static const size_t page = (size_t)::sysconf(_SC_PAGESIZE);
        size_t end = std::min(offset, size_) / page * page;
        if (end > released_) {
            ::madvise(static_cast<char*>(mapped_) + released_, end - released_, MADV_DONTNEED);
            released_ = end;
        }
    }

private:
    void* mapped_ = nullptr;
    size_t size_ = 0, released_ = 0;
    std::string bytes_;
};

// A tensor entry whose dtype and shape have been read, not yet decoded.
struct TensorEntry {
    std::string key;             // e.g. "weights.layers[1].wk"
    std::string dtype;           // one of the dtypes allowed where it stands
    std::vector<int64_t> shape;  // each dimension in [0, kMaxDim]
    const json* node = nullptr;  // the tensor object (for int8: its block_size and scales)
    const std::string* base64;   // the "data" text, or nullptr when it was decoded while parsing
    DecodedData* decoded;        // then: its bytes
    const uint8_t* mapped = nullptr;  // or: a safetensors tensor's bytes in the mapped file
    size_t mapped_bytes = 0;
};

// A safetensors tensor's bytes within the mapped file (its offsets already checked).
struct MappedSpan {
    const uint8_t* data;
    size_t nbytes;
};

class Reader {
public:
    explicit Reader(std::string path) : path_(std::move(path)) {}

    // Loads the JSON file at path_: mapped whole (read, if it cannot be mapped), then load_json.
    ModelFile load_file() {
        std::error_code ec;
        if (std::filesystem::is_directory(path_, ec)) throw ModelFileError(path_ + ": is a directory, not a model file");
        FileText text;
        read_file(text);
        return load_json(text.data(), text.size(), [&](size_t offset) { text.release_before(offset); });
    }

    // Loads a safetensors file (docs/model-format.md, "The safetensors container"): the file
    // is memory-mapped, its header checked (bounds, offsets, overlaps: the Python reader's
    // st_container.py checks, with its messages) and turned into the JSON container's
    // document, so every check after that is the JSON container's. float32 tensors stay in
    // the mapping.
    ModelFile load_safetensors() {
        std::shared_ptr<const void> mapping = map_file();
        const auto* bytes = static_cast<const uint8_t*>(mapping.get());
        json root = safetensors_document(bytes, mapped_size_);
        ModelFile file = load(root);
        file.mapping = std::move(mapping);
        return file;
    }

    // The same for a text already in memory.
    ModelFile load_text(const std::string& text, JsonParse how) {
        return load_json(text.data(), text.size(), [](size_t) {}, how);
    }

private:
    [[noreturn]] void fail_file(const std::string& what) const { throw ModelFileError(path_ + ": " + what); }

    // The file at path_, opened for reading, and its status.
    int open_file(struct stat& st) const {
        int fd = ::open(path_.c_str(), O_RDONLY);
        if (fd < 0) fail_file(std::string("cannot open model file: ") + std::strerror(errno));
        if (::fstat(fd, &st) != 0) {
            int error = errno;
            ::close(fd);
            fail_file(std::string("cannot read model file: ") + std::strerror(error));
        }
        return fd;
    }

    // The JSON file's text: mapped if it is a regular file, else read (a pipe).
    void read_file(FileText& text) const {
        struct stat st {};
        int fd = open_file(st);
        if (!S_ISREG(st.st_mode) || !text.map(fd, (size_t)st.st_size)) {
            char buffer[1 << 16];
            for (;;) {
                ssize_t n = ::read(fd, buffer, sizeof buffer);
                if (n < 0 && errno == EINTR) continue;
                if (n < 0) {
                    int error = errno;
                    ::close(fd);
                    fail_file(std::string("cannot read model file: read error: ") + std::strerror(error));
                }
                if (n == 0) break;
                text.bytes().append(buffer, (size_t)n);
            }
        }
        ::close(fd);
    }

    std::shared_ptr<const void> map_file() {
        struct stat st {};
        int fd = open_file(st);
        mapped_size_ = (size_t)st.st_size;
        void* p = ::mmap(nullptr, mapped_size_, PROT_READ, MAP_PRIVATE, fd, 0);
        ::close(fd);  // the mapping keeps the file
        if (p == MAP_FAILED) fail_file(std::string("cannot map model file: ") + std::strerror(errno));
        size_t size = mapped_size_;
        return std::shared_ptr<const void>(p, [size](const void* q) { ::munmap(const_cast<void*>(q), size); });
    }

    // The format's dtype name for a safetensors dtype (storage and reserved ones), else `st`.
    static std::string dtype_name(const std::string& st) {
        for (const spec::StorageDtype& d : spec::kStorageDtypes) {
            if (st == d.safetensors) return d.name;
        }
        static const std::pair<const char*, const char*> reserved[] = {
            {"F16", "float16"}, {"BF16", "bfloat16"}, {"I8", "int8"}, {"F8_E4M3", "float8_e4m3"}, {"F8_E5M2", "float8_e5m2"}};
        for (const auto& [from, to] : reserved) {
            if (st == from) return to;
        }
        return st;
    }

    static int itemsize(const std::string& name) {
        for (const spec::StorageDtype& d : spec::kStorageDtypes) {
            if (name == d.name) return d.itemsize;
        }
        return 0;
    }

    json metadata_json(const nlohmann::ordered_json& metadata, const char* name, bool required) const {
        auto it = metadata.find(name);
        std::string key = std::string("__metadata__.") + name;
        if (it == metadata.end() || it->is_null()) {
            if (!required) return json::object();
            fail(key, "expected JSON text, found null");
        }
        if (!it->is_string()) fail(key, "expected JSON text, found " + brief(json(*it)));
        const std::string& text = it->get_ref<const std::string&>();
        TextScan scan(text.data(), text.size());
        scan.scan_all();
        if (scan.nul_at != TextScan::npos || scan.too_deep_at != TextScan::npos) fail(key, "not valid JSON");
        json parsed = json::parse(text, nullptr, false);
        if (parsed.is_discarded()) fail(key, "not valid JSON");
        return parsed;
    }

    json safetensors_document(const uint8_t* bytes, size_t size) {
        uint64_t length = 0;
        std::memcpy(&length, bytes, 8);  // little-endian host (checked at the top)
        if (length > spec::kMaxSafetensorsHeaderBytes) {
            fail_file("safetensors header: " + std::to_string(length) + " bytes is more than the limit of " +
                      std::to_string(spec::kMaxSafetensorsHeaderBytes));
        }
        if (8 + length > size) {
            fail_file("safetensors header: " + std::to_string(length) + " bytes run past the end of the file (" +
                      std::to_string(size) + " bytes)");
        }
        std::string text(reinterpret_cast<const char*>(bytes) + 8, length);
        TextScan scan(text.data(), text.size());
        scan.scan_all();
        if (scan.too_deep_at != TextScan::npos) {
            fail_file("safetensors header: nested deeper than " + std::to_string(kMaxJsonDepth) + " levels");
        }
        nlohmann::ordered_json header = nlohmann::ordered_json::parse(text, nullptr, false);
        if (header.is_discarded() || scan.nul_at != TextScan::npos) fail_file("safetensors header: not valid JSON");
        if (!header.is_object()) fail_file("safetensors header: expected a JSON object, found " + brief(json(header)));

        const uint8_t* data = bytes + 8 + length;
        size_t data_size = size - 8 - length;
        json root = json::object();
        std::vector<std::tuple<uint64_t, uint64_t, std::string>> spans;
        std::vector<std::pair<std::string, json>> tensors;  // in header order, placed below
        for (auto it = header.begin(); it != header.end(); ++it) {
            const std::string& key = it.key();
            if (key == "__metadata__") continue;
            const auto& entry = it.value();
            std::string where = cut(key);
            if (!entry.is_object()) fail(where, "expected a tensor {dtype, shape, data_offsets}, found " + brief(json(entry)));
            auto field = [&](const char* name) {
                auto f = entry.find(name);
                return f == entry.end() ? json() : json(*f);
            };
            json dtype = field("dtype"), shape = field("shape"), offsets = field("data_offsets");
            if (!dtype.is_string()) fail(where, "dtype must be a string, found " + brief(dtype));
            bool shape_ok = shape.is_array();
            uint64_t numel = 1;
            for (const json& d : shape_ok ? shape : json::array()) {
                if (!d.is_number_unsigned() || d.get<uint64_t>() > (uint64_t)kMaxDim) {
                    shape_ok = false;
                    break;
                }
                uint64_t n = d.get<uint64_t>();
                numel = (n != 0 && numel > (UINT64_MAX >> 2) / n) ? (UINT64_MAX >> 2) : numel * n;  // saturates
            }
            if (!shape_ok) fail(where, "shape must hold integers in [0, " + std::to_string(kMaxDim) + "], found " + brief(shape));
            bool offsets_ok = offsets.is_array() && offsets.size() == 2 && offsets[0].is_number_unsigned() &&
                              offsets[1].is_number_unsigned() && offsets[0].get<uint64_t>() <= offsets[1].get<uint64_t>() &&
                              offsets[1].get<uint64_t>() <= data_size;
            if (!offsets_ok) {
                fail(where, "data_offsets " + brief(offsets) + " are not [begin, end] within the " + std::to_string(data_size) +
                                " data bytes");
            }
            uint64_t begin = offsets[0].get<uint64_t>(), end = offsets[1].get<uint64_t>();
            std::string name = dtype_name(dtype.get<std::string>());
            if (int size_of = itemsize(name)) {
                uint64_t needed = numel * (uint64_t)size_of;
                if (end - begin != needed) {
                    fail(where, "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) + "] hold " +
                                    std::to_string(end - begin) + " bytes, shape " + brief(shape) + " " +
                                    dtype.get<std::string>() + " needs " + std::to_string(needed));
                }
            }
            spans.emplace_back(begin, end, key);
            mapped_.push_back({data + begin, (size_t)(end - begin)});
            json tensor = {{"dtype", name}, {"shape", shape}, {"data", json::binary({}, mapped_.size() - 1)}};
            tensors.emplace_back(key, std::move(tensor));
        }
        std::sort(spans.begin(), spans.end());
        uint64_t covered = 0;
        for (const auto& [begin, end, key] : spans) {
            if (begin < covered) {
                fail(cut(key), "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                                   "] overlap another tensor's bytes");
            }
            if (begin > covered) {
                fail_file("safetensors data: bytes [" + std::to_string(covered) + ", " + std::to_string(begin) +
                          ") belong to no tensor");
            }
            covered = end;
        }
        if (covered != data_size) {
            fail_file("safetensors data: bytes [" + std::to_string(covered) + ", " + std::to_string(data_size) +
                      ") belong to no tensor");
        }

        nlohmann::ordered_json metadata = nlohmann::ordered_json::object();
        if (auto m = header.find("__metadata__"); m != header.end()) {
            if (!m->is_object()) fail("__metadata__", "expected an object, found " + brief(json(*m)));
            metadata = *m;
        }
        if (auto v = metadata.find("format_version"); v != metadata.end() && !v->is_null()) {
            const bool digits = v->is_string() && !v->get_ref<const std::string&>().empty() &&
                                v->get_ref<const std::string&>().find_first_not_of("0123456789") == std::string::npos;
            if (!digits) fail("format_version", "must be a positive integer, found " + brief(json(*v)));
            const std::string& text = v->get_ref<const std::string&>();
            // as a JSON number: beyond uint64 it becomes a double, which check_format_version refuses
            root["format_version"] = json::parse(text.substr(0, 30), nullptr, false);
        }
        root["config"] = metadata_json(metadata, "config", true);
        root["meta"] = metadata_json(metadata, "meta", false);
        attach_int8_parts(tensors, metadata_json(metadata, spec::kInt8SafetensorsMetadata, false));
        if (auto source = metadata.find(spec::kSourceKey); source != metadata.end() && !source->is_null()) {
            json record = metadata_json(metadata, spec::kSourceKey, false);
            if (!record.is_object()) {
                fail(std::string("__metadata__.") + spec::kSourceKey, "expected an object, found " + brief(record));
            }
            root[spec::kSourceKey] = std::move(record);  // its logits tensor joins it below
        }
        std::map<uint64_t, json> layers;
        for (auto& [key, tensor] : tensors) {
            if (!tensor.is_null()) place_tensor(root, layers, key, std::move(tensor));
        }
        if (!layers.empty()) {
            uint64_t count = layers.rbegin()->first + 1;
            if (count > (uint64_t)kMaxDim) {
                fail("weights.layers[" + std::to_string(count - 1) + "]", "layer index beyond " + std::to_string(kMaxDim));
            }
            json list = json::array();
            for (uint64_t i = 0; i < count; i++) {
                auto found = layers.find(i);
                list.push_back(found == layers.end() ? json() : std::move(found->second));
            }
            root["weights"]["layers"] = std::move(list);
        } else if (root.contains("weights")) {
            root["weights"]["layers"] = json::array();
        }
        return root;
    }

    // An int8 tensor's parts as the JSON container holds them in the tensor object: the
    // tensor "<key>.scales" becomes its "scales" (and is not placed on its own), and
    // __metadata__.quantization = {"<key>": {"block_size": n}, ...} gives its "block_size".
    // A missing part is then reported by the checks both containers share.
    void attach_int8_parts(std::vector<std::pair<std::string, json>>& tensors, const json& quantization) const {
        const std::string where = std::string("__metadata__.") + spec::kInt8SafetensorsMetadata;
        if (!quantization.is_object()) fail(where, "expected an object, found " + brief(quantization));
        const std::string suffix = spec::kInt8SafetensorsScalesSuffix;
        std::map<std::string, json*> by_key;
        for (auto& [key, tensor] : tensors) by_key[key] = &tensor;
        for (auto& [key, tensor] : tensors) {
            bool scales = key.size() > suffix.size() && key.compare(key.size() - suffix.size(), suffix.size(), suffix) == 0;
            auto owner = scales ? by_key.find(key.substr(0, key.size() - suffix.size())) : by_key.end();
            if (owner != by_key.end() && !owner->second->is_null()) {
                (*owner->second)[spec::kInt8ScalesKey] = std::move(tensor);
                tensor = json();  // placed with its owner
            }
        }
        for (auto& [key, tensor] : tensors) {
            auto entry = quantization.find(key);
            if (!tensor.is_object() || tensor["dtype"] != xvalid::dtype_name(DType::q8) || entry == quantization.end() ||
                entry->is_null()) {
                continue;
            }
            if (!entry->is_object()) {
                fail(where, cut(key) + ": expected an object {\"" + spec::kInt8BlockSizeKey + "\": n}, found " + brief(*entry));
            }
            if (auto size = entry->find(spec::kInt8BlockSizeKey); size != entry->end()) tensor[spec::kInt8BlockSizeKey] = *size;
        }
    }

    // Puts a tensor keyed "section.name" or "weights.layers[i].name" where the JSON container
    // has it; other keys are ignored (unknown keys are, in either container).
    static void place_tensor(json& root, std::map<uint64_t, json>& layers, const std::string& key, json tensor) {
        const std::string prefix = "weights.layers[";
        if (key.compare(0, prefix.size(), prefix) == 0) {
            size_t close = key.find("].", prefix.size());
            std::string index = key.substr(prefix.size(), close == std::string::npos ? 0 : close - prefix.size());
            std::string name = close == std::string::npos ? "" : key.substr(close + 2);
            bool word = !name.empty() && std::all_of(name.begin(), name.end(), [](char c) { return std::isalnum((unsigned char)c) || c == '_'; });
            if (!index.empty() && index.size() <= 18 && index.find_first_not_of("0123456789") == std::string::npos && word) {
                layers[std::stoull(index)][name] = std::move(tensor);
            }
            return;
        }
        size_t dot = key.find('.');
        if (dot == std::string::npos || key.find('.', dot + 1) != std::string::npos) return;
        std::string section = key.substr(0, dot);
        if (section == "inputs" || section == "rope" || section == "weights" || section == spec::kSourceKey) {
            root[section][key.substr(dot + 1)] = std::move(tensor);
        }
    }

    ModelFile load(const json& root) {
        if (!root.is_object()) fail("(top level)", "expected a JSON object, found " + brief(root));
        check_format_version(root);
        for (const char* section : spec::kRequiredSections) object_member(root, "", section);
        ModelFile file;
        file.config = read_config(root);
        file.weights = read_weights(root, file.config, file);
        // required, as in the Python reader: every command runs the file's own inputs
        file.inputs = read_inputs(object_member(root, "", "inputs"), file.config);
        check_forward_memory(*file.inputs, file.config);
        check_source(root, *file.inputs, file.config);
        return file;
    }

    // The optional quantisation record (spec::kSourceKey): {"weight_dtype": a string, "logits":
    // float32 (B, S, V), finite}, the logits of the model before its weights were converted.
    // The kernel does not use it; it is checked so that both loaders refuse the same files.
    void check_source(const json& root, const Inputs& in, const Config& c) const {
        const std::string key = spec::kSourceKey;
        const json* source = find(root, key.c_str());
        if (!source) return;
        if (!source->is_object()) fail(key, "expected an object, found " + python_type(*source));
        const json& weight_dtype = member(*source, key, "weight_dtype");
        if (!weight_dtype.is_string()) fail(key + ".weight_dtype", "expected a string, found " + brief(weight_dtype));
        TensorEntry logits = entry(*source, key, spec::kSourceLogitsKey, spec::kSourceLogitsDtype);
        std::vector<int64_t> shape{in.B, in.S, c.vocab_size};
        if (logits.shape != shape) fail(logits.key, "shape expected " + shape_str(shape) + ", found " + shape_str(logits.shape));
        std::vector<std::vector<float>> discarded;
        float32_data(logits, discarded);
    }

    [[noreturn]] void fail(const std::string& key, const std::string& what) const {
        throw ModelFileError(path_ + ": " + key + ": " + what);
    }

    void check_scan(const TextScan& scan) const {
        // nlohmann's parser takes a NUL byte for the end of the input: refuse it here, so a
        // file with junk after a NUL is not read as valid (JSON text never holds a raw NUL).
        if (scan.nul_at != TextScan::npos) {
            throw ModelFileError(path_ + ": not valid JSON: NUL byte at offset " + std::to_string(scan.nul_at));
        }
        if (scan.too_deep_at != TextScan::npos) {
            throw ModelFileError(path_ + ": not valid JSON: arrays and objects nested deeper than " +
                                 std::to_string(kMaxJsonDepth) + " levels (at byte offset " +
                                 std::to_string(scan.too_deep_at) + ")");
        }
    }

    // The JSON container's text, checked and parsed, then loaded:
    //   1. scanned in windows (NUL bytes, nesting depth, where the long "data" strings are),
    //      each long "data" string that is valid base64 decoded straight from the text as soon
    //      as the scan has passed its end, then `release` told that the text before the
    //      window (or before a string still being scanned) is not needed for now: the text is
    //      read once, and only a window and the longest string of it are held at a time;
    //   2. the rest parsed, those strings left out. (A text that does not parse is parsed
    //      again whole, the decoded strings included: the parser's message then names the
    //      line and column in the file, as it always did.)
    template <typename Release>
    ModelFile load_json(const char* text, size_t size, Release release, JsonParse how = JsonParse::fast) {
        constexpr size_t kWindow = 8 << 20;
        TextScan scan(text, size);
        std::vector<Skip> skips;
        size_t decoded = 0;  // of scan.data_strings
        for (size_t end = 0; end < size;) {
            end = std::min(size, end + kWindow);
            scan.scan_to(end);
            for (; how == JsonParse::fast && decoded < scan.data_strings.size(); decoded++) {
                const Span& s = scan.data_strings[decoded];
                if (decode_early(text + s.begin, s.end - s.begin)) skips.push_back({s.begin, s.end, decoded_.size() - 1});
            }
            release(scan.needed_from());
        }
        check_scan(scan);
        json root;
        try {
            root = parse(text, size, skips);
        } catch (const SkipMismatch&) {
            root = parse_whole(text, size);
        } catch (const ModelFileError&) {
            if (skips.empty()) throw;
            root = parse_whole(text, size);
        }
        release(size);
        return load(root);
    }

    json parse_whole(const char* text, size_t size) {
        decoded_.clear();
        return parse(text, size, {});
    }

    // A long "data" text that is valid base64, decoded into decoded_.back(); false otherwise.
    bool decode_early(const char* text, size_t n) {
        if (n < kDecodeWhileParsing || n % 4 != 0) return false;
        DecodedData d;
        d.nbytes = base64::decoded_size(text, n);
        d.chars = n;
        size_t count = (d.nbytes + sizeof(float) - 1) / sizeof(float);
        d.values.reserve(count);
        advise_huge_pages(d.values.data(), count * sizeof(float));
        d.values.resize(count);
        if (base64::decode(text, n, reinterpret_cast<uint8_t*>(d.values.data())) != base64::npos) return false;
        decoded_.push_back(std::move(d));
        return true;
    }

    // Parses the text, the content of each skip left out (see SkippingIterator): the "" the
    // parser reads there becomes the binary placeholder of the skip's decoded bytes. A long
    // "data" string the parser reads whole is decoded as it is parsed (decode_early).
    json parse(const char* text, size_t size, const std::vector<Skip>& skips) {
        KeyTracker where;
        size_t pending = SkippingIterator::npos, taken = 0;
        SkippingIterator first{text, 0, skips.data(), skips.data() + skips.size(), &pending};
        SkippingIterator last{text, size, nullptr, nullptr, &pending};
        try {
            json root = json::parse(first, last, [&](int, json::parse_event_t event, json& parsed) {
                bool data = event == json::parse_event_t::value && parsed.is_string() && where.member() == "data";
                if (pending != SkippingIterator::npos) {  // the "" of a skipped string
                    if (!data || !parsed.get_ref<const std::string&>().empty()) throw SkipMismatch{};
                    parsed = json::binary({}, pending);
                    pending = SkippingIterator::npos;
                    taken++;
                } else if (data) {
                    const std::string& value = parsed.get_ref<const std::string&>();
                    if (decode_early(value.data(), value.size())) parsed = json::binary({}, decoded_.size() - 1);
                }
                where.see(event, parsed);
                return true;
            });
            if (taken != skips.size()) throw SkipMismatch{};
            return root;
        } catch (const json::out_of_range& e) {
            // 406: a number beyond a double's range, such as 1e999 or a 400-digit integer;
            // e.what() ends "number overflow parsing '<the number>'"
            std::string what = e.what();
            const std::string parsing = "parsing '";
            size_t start = what.find(parsing);
            if (e.id != 406 || start == std::string::npos || what.back() != '\'') {
                throw ModelFileError(path_ + ": " + where.key() + ": not valid JSON: " + cut(what));
            }
            start += parsing.size();
            fail(where.key(), "number " + cut(what.substr(start, what.size() - 1 - start)) + " does not fit in a double");
        } catch (const json::parse_error& e) {
            // e.what() names the line and column: "... parse error at line 1, column 9: ...".
            // It also quotes the whole failing token, megabytes for a cut-off tensor: shorten that.
            std::string what = e.what();
            const std::string last_read = "; last read: '";
            size_t quote = what.find(last_read);
            if (quote != std::string::npos && what.size() > quote + last_read.size() + 40) {
                what = what.substr(0, quote + last_read.size() + 40) + "...'";
            }
            throw ModelFileError(path_ + ": not valid JSON: " + what);
        } catch (const json::exception& e) {
            throw ModelFileError(path_ + ": not valid JSON: " + cut(e.what()));
        }
    }

    // The member `name` of object `parent`, or nullptr. null counts as absent, as in HF
    // configs that write "head_dim": null.
    const json* find(const json& parent, const char* name) const {
        auto it = parent.find(name);
        return it == parent.end() || it->is_null() ? nullptr : &*it;
    }

    const json& member(const json& parent, const std::string& parent_key, const char* name) const {
        if (!parent.is_object()) fail(parent_key, "expected a JSON object, found " + brief(parent));
        const json* value = find(parent, name);
        if (!value) fail(join_key(parent_key, name), "missing from the model file");
        return *value;
    }

    const json& object_member(const json& parent, const std::string& parent_key, const char* name) const {
        const json& value = member(parent, parent_key, name);
        if (!value.is_object()) fail(join_key(parent_key, name), "expected a JSON object, found " + brief(value));
        return value;
    }

    // A size: an integer in [1, kMaxDim]. (The parser stores every non-negative integer
    // as number_unsigned, so that test also rejects negatives, floats and strings.)
    int dimension(const json& value, const std::string& key) const {
        if (!value.is_number_unsigned() || value.get<uint64_t>() < 1) {
            fail(key, "must be a positive integer, found " + brief(value));
        }
        uint64_t n = value.get<uint64_t>();
        if (n > (uint64_t)kMaxDim) {
            fail(key, std::to_string(n) + " exceeds the supported maximum " + std::to_string(kMaxDim));
        }
        return (int)n;
    }

    // An optional float hyperparameter within its range, the range's fallback when absent.
    double float_config(const json& cfg, const FloatRange& range) const {
        const json* value = find(cfg, range.name);
        if (!value) return range.fallback;
        std::string key = join_key("config", range.name);
        if (!value->is_number()) fail(key, "must be a number, found " + brief(*value));
        if (!range.contains(value->get<double>())) {
            fail(key, std::string("must be a number in ") + range.range + ", found " + brief(*value));
        }
        return value->get<double>();
    }

    // A positive integer no larger than the newest version this reader knows. The parser
    // keeps non-negative integers as uint64 and negative ones as int64: each is compared in
    // its own type, so 2^64 - 1 or 2^63 cannot wrap to a small or negative number.
    void check_format_version(const json& root) const {
        const json* version = find(root, "format_version");
        if (!version) return;  // files from before versioning (the seed's) are version 1
        if (!version->is_number_unsigned() || version->get<uint64_t>() < 1) {
            fail("format_version", "must be a positive integer, found " + brief(*version));
        }
        if (version->get<uint64_t>() > (uint64_t)kFormatVersion) {
            fail("format_version", brief(*version) + " is newer than this reader supports (" +
                                       std::to_string(kFormatVersion) + "); update xvalid");
        }
    }

    // A forward over the inputs must fit the memory limit (forward_memory.h). The kernel
    // would otherwise allocate (B*S, V) logits and the rest for any batch the file declares.
    void check_forward_memory(const Inputs& in, const Config& c) const {
        std::string problem = forward_memory_problem(c, in.B, in.S, in.S, false);
        if (!problem.empty()) {
            fail("inputs.input_ids", "a forward over B=" + std::to_string(in.B) + " x S=" + std::to_string(in.S) +
                                         " tokens " + problem);
        }
    }

    Config read_config(const json& root) const {
        const json& cfg = object_member(root, "", "config");
        auto required = [&](const char* name) { return dimension(member(cfg, "config", name), join_key("config", name)); };
        Config c{};
        c.hidden_size = required("hidden_size");
        c.num_layers = required("num_hidden_layers");
        c.num_heads = required("num_attention_heads");
        c.num_kv_heads = required("num_key_value_heads");
        c.vocab_size = required("vocab_size");
        c.intermediate_size = required("intermediate_size");
        c.rms_norm_eps = float_config(cfg, kRmsNormEps);
        c.rope_theta = float_config(cfg, kRopeTheta);
        // unknown until the RoPE tables are read when the config does not say
        const json* max_pos = find(cfg, "max_position_embeddings");
        c.max_position_embeddings = max_pos ? dimension(*max_pos, "config.max_position_embeddings") : 0;

        // head_dim is H / NH (docs/model.md); a file that states it, in config or meta, must agree
        if (c.hidden_size % c.num_heads != 0) {
            fail("config.num_attention_heads", std::to_string(c.num_heads) + " does not divide hidden_size " +
                                                   std::to_string(c.hidden_size));
        }
        c.head_dim = c.hidden_size / c.num_heads;
        const json* meta = find(root, "meta");
        for (const char* where : {"config", "meta"}) {
            const json* section = std::string(where) == "config" ? &cfg : meta;
            const json* stated = section && section->is_object() ? find(*section, "head_dim") : nullptr;
            std::string key = std::string(where) + ".head_dim";
            if (stated && dimension(*stated, key) != c.head_dim) {
                fail(key, "expected " + std::to_string(c.head_dim) + " (hidden_size / num_attention_heads), found " +
                              brief(*stated));
            }
        }

        if (c.num_heads % c.num_kv_heads != 0) {
            fail("config.num_key_value_heads", std::to_string(c.num_kv_heads) + " does not divide num_attention_heads " +
                                                   std::to_string(c.num_heads));
        }
        if (c.head_dim % 2 != 0) fail("config.head_dim", std::to_string(c.head_dim) + " must be even (RoPE rotates halves)");
        if ((int64_t)c.num_heads * c.head_dim > kMaxDim) {
            fail("config.num_attention_heads", "num_attention_heads * head_dim exceeds the supported maximum " +
                                                   std::to_string(kMaxDim));
        }
        return c;
    }

    // Reads the entry's encoding, dtype (must be `dtype`) and shape.
    TensorEntry entry(const json& parent, const std::string& parent_key, const char* name, const char* dtype) const {
        return entry(parent, parent_key, name, std::vector<std::string>{dtype});
    }

    // The same where any of `allowed` may stand (the messages are the Python reader's,
    // modelfile.py _check_dtype_and_shape).
    TensorEntry entry(const json& parent, const std::string& parent_key, const char* name,
                      const std::vector<std::string>& allowed) const {
        TensorEntry t;
        t.key = join_key(parent_key, name);
        const json& node = member(parent, parent_key, name);
        t.node = &node;
        if (!node.is_object()) fail(t.key, "expected a tensor object, found " + python_type(node));
        auto string_field = [&](const char* field) -> const std::string& {
            const json& value = member(node, t.key, field);
            if (!value.is_string()) fail(t.key, std::string(field) + " must be a string, found " + brief(value));
            return value.get_ref<const std::string&>();
        };
        // absent (or null) means base64, the only encoding (docs/model-format.md)
        if (const json* encoding = find(node, "encoding"); encoding && *encoding != "base64") {
            fail(t.key, "encoding expected 'base64', found " +
                            (encoding->is_string() ? quoted(encoding->get_ref<const std::string&>()) : brief(*encoding)));
        }
        const std::string& found = string_field("dtype");
        if (std::find(allowed.begin(), allowed.end(), found) == allowed.end()) {
            if (is_reserved_dtype(found)) {
                fail(t.key, "dtype " + found + " is not supported yet (format version " + std::to_string(kFormatVersion) +
                                " reads " + dtype_list(allowed) + " here)");
            }
            if (listed(spec::kMatrixOnlyDtypes, found) && allowed == weight_dtypes(false)) {
                fail(t.key, "dtype " + found + " is only allowed for 2-D weight matrices");
            }
            fail(t.key, "dtype expected " + dtype_list(allowed) + ", found " + quoted(found));
        }
        t.dtype = found;
        const json& shape = member(node, t.key, "shape");
        if (!shape.is_array()) fail(t.key, "shape must be a list of integers, found " + brief(shape));
        for (const json& d : shape) {
            if (!d.is_number_unsigned() || d.get<uint64_t>() > (uint64_t)kMaxDim) {
                fail(t.key, "shape " + brief(shape) + " must hold integers in [0, " + std::to_string(kMaxDim) + "]");
            }
            t.shape.push_back(d.get<int64_t>());
        }
        const json& data = member(node, t.key, "data");
        if (!mapped_.empty() && data.is_binary() && data.get_binary().has_subtype() &&
            data.get_binary().subtype() < mapped_.size()) {  // a safetensors tensor
            const MappedSpan& span = mapped_[data.get_binary().subtype()];
            t.base64 = nullptr;
            t.decoded = nullptr;
            t.mapped = span.data;
            t.mapped_bytes = span.nbytes;
        } else if (data.is_binary() && data.get_binary().has_subtype() && data.get_binary().subtype() < decoded_.size()) {
            t.base64 = nullptr;
            t.decoded = &decoded_[data.get_binary().subtype()];
        } else {
            t.base64 = &string_field("data");
            t.decoded = nullptr;
        }
        return t;
    }

    void expect_shape(const TensorEntry& t, const std::vector<int64_t>& expected) const {
        if (t.shape != expected) {
            fail(t.key, "shape expected " + shape_str(expected) + ", found " + shape_str(t.shape));  // the Python reader's words
        }
    }

    // Decodes the entry (shape already checked, so at most 3 bounded dimensions) into a
    // new array. The byte length is checked before anything is allocated.
    template <typename T>
    std::vector<T> decode(const TensorEntry& t) const {
        size_t numel = 1;
        for (int64_t d : t.shape) numel *= (size_t)d;
        if (t.decoded) return take_decoded<T>(t, numel);
        if (t.mapped) {  // a safetensors tensor, copied (used in place: see weight())
            expect_bytes(t, t.mapped_bytes, numel * sizeof(T));
            std::vector<T> values(numel);
            if (numel) std::memcpy(values.data(), t.mapped, numel * sizeof(T));
            return values;
        }
        const std::string& text = *t.base64;
        expect_chars(t, text.size(), numel * sizeof(T));
        size_t nbytes = base64::decoded_size(text.data(), text.size());
        expect_bytes(t, nbytes, numel * sizeof(T));
        std::vector<T> values(numel);
        size_t bad = base64::decode(text.data(), text.size(), reinterpret_cast<uint8_t*>(values.data()));
        if (bad != base64::npos) {
            fail(t.key, "invalid base64 character " + char_str((unsigned char)text[bad]) + " at offset " + std::to_string(bad));
        }
        return values;
    }

    // Checked before anything is decoded, in the Python reader's words: a base64 text of
    // `needed` bytes has exactly 4 * ceil(needed / 3) characters.
    void expect_chars(const TensorEntry& t, size_t chars, size_t needed) const {
        size_t want = 4 * ((needed + 2) / 3);
        if (chars != want) {
            fail(t.key, "data holds " + std::to_string(chars) + " base64 characters, expected " + std::to_string(want) +
                            " for shape " + shape_str(t.shape) + " " + t.dtype);
        }
    }

    void expect_bytes(const TensorEntry& t, size_t nbytes, size_t needed) const {
        if (nbytes != needed) {
            fail(t.key, "data holds " + std::to_string(nbytes) + " bytes, shape " + shape_str(t.shape) + " needs " +
                            std::to_string(needed));
        }
    }

    // The bytes decoded while parsing, as T: float32 tensors take the buffer itself.
    template <typename T>
    std::vector<T> take_decoded(const TensorEntry& t, size_t numel) const {
        expect_chars(t, t.decoded->chars, numel * sizeof(T));
        expect_bytes(t, t.decoded->nbytes, numel * sizeof(T));
        if constexpr (std::is_same_v<T, float>) {
            std::vector<float> values = std::move(t.decoded->values);
            values.resize(numel);
            return values;
        } else {
            std::vector<T> values(numel);
            std::memcpy(values.data(), t.decoded->values.data(), numel * sizeof(T));
            t.decoded->values = {};
            return values;
        }
    }

    // A float32 tensor of the given shape, decoded into `tensors`; all elements finite.
    const float* weight(const json& parent, const std::string& parent_key, const char* name,
                        const std::vector<int64_t>& shape, std::vector<std::vector<float>>& tensors) const {
        TensorEntry t = entry(parent, parent_key, name, "float32");
        expect_shape(t, shape);
        return float32_data(t, tensors);
    }

    // The float32 values of an entry (dtype and shape checked), all finite: in place in a
    // safetensors mapping when aligned, else decoded into `tensors`.
    const float* float32_data(const TensorEntry& t, std::vector<std::vector<float>>& tensors) const {
        if (const float* in_place = mapped_in_place<float>(t)) {
            check_finite(t, in_place, numel(t));
            return in_place;
        }
        std::vector<float> values = decode<float>(t);
        check_finite(t, values.data(), values.size());
        tensors.push_back(std::move(values));
        return tensors.back().data();  // stays valid as `tensors` grows: elements move, buffers do not
    }

    static size_t numel(const TensorEntry& t) {
        size_t n = 1;
        for (int64_t d : t.shape) n *= (size_t)d;
        return n;
    }

    // A safetensors tensor used where it is, no copy (the ModelFile keeps the mapping), when
    // its bytes are aligned for T; nullptr otherwise (then decode<T> copies it).
    template <typename T>
    const T* mapped_in_place(const TensorEntry& t) const {
        if (!t.mapped || reinterpret_cast<uintptr_t>(t.mapped) % alignof(T) != 0) return nullptr;
        expect_bytes(t, t.mapped_bytes, numel(t) * sizeof(T));
        return reinterpret_cast<const T*>(t.mapped);
    }

    // A weight matrix (rows, cols) in any weight dtype, kept as stored: float32 in `tensors`,
    // float16/bfloat16 bits in `halves`, int8 in `quantized` with its float32 scales in
    // `tensors` (or all of them in place in a safetensors mapping). Checked like the Python
    // reader checks it (modelfile.py decode_weight), in the same order and words: dtype,
    // shape, data, finite values; for int8 then its scales and block size.
    WeightMatrix matrix(const json& parent, const std::string& parent_key, const char* name, int64_t rows,
                        int64_t cols, ModelFile& file) const {
        TensorEntry t = entry(parent, parent_key, name, weight_dtypes(true));
        expect_shape(t, {rows, cols});
        WeightMatrix w;
        w.dtype = weight_dtype(t.dtype);
        w.rows = (int)rows;
        w.cols = (int)cols;
        switch (w.dtype) {
            case DType::f32: w.data = float32_data(t, file.tensors); break;
            case DType::f16:
            case DType::bf16: {
                std::vector<uint16_t> bits;
                w.data = half_bits(t, w.dtype, bits);
                if (!bits.empty()) file.halves.push_back(std::move(bits));  // the buffer moves, w.data stays valid
                break;
            }
            case DType::q8: {
                if (const int8_t* in_place = mapped_in_place<int8_t>(t)) {
                    w.data = in_place;
                } else {
                    file.quantized.push_back(decode<int8_t>(t));
                    w.data = file.quantized.back().data();
                }
                int64_t blocks = 0;
                w.block_size = block_size(t, cols, blocks);
                w.scales = scales(t, rows, blocks, file.tensors);
                break;
            }
        }
        return w;
    }

    // A norm vector (n) in float32, float16 or bfloat16, as float32: half-precision ones are
    // upcast here (n floats, exact) into `tensors`.
    const float* vector(const json& parent, const std::string& parent_key, const char* name, int64_t n,
                        ModelFile& file) const {
        TensorEntry t = entry(parent, parent_key, name, weight_dtypes(false));
        expect_shape(t, {n});
        DType dtype = weight_dtype(t.dtype);
        if (dtype == DType::f32) return float32_data(t, file.tensors);
        std::vector<uint16_t> owner;
        const uint16_t* bits = half_bits(t, dtype, owner);
        std::vector<float> values(n);
        for (int64_t i = 0; i < n; i++) values[i] = dtype == DType::f16 ? half_to_float(bits[i]) : bf16_to_float(bits[i]);
        file.tensors.push_back(std::move(values));
        return file.tensors.back().data();
    }

    // float16 or bfloat16 bits, all finite: in place when mapped and aligned, else decoded
    // into `owner`.
    const uint16_t* half_bits(const TensorEntry& t, DType dtype, std::vector<uint16_t>& owner) const {
        const uint16_t* data = mapped_in_place<uint16_t>(t);
        if (!data) {
            owner = decode<uint16_t>(t);
            data = owner.data();
        }
        // non-finite: exponent bits all ones (float16: 5 bits, bfloat16: 8)
        uint16_t exponent = dtype == DType::f16 ? 0x7c00 : 0x7f80;
        size_t n = numel(t), bad = 0, first = 0;
        for (size_t i = 0; i < n; i++) {
            if ((data[i] & exponent) == exponent && bad++ == 0) first = i;
        }
        if (bad) {
            float value = dtype == DType::f16 ? half_to_float(data[first]) : bf16_to_float(data[first]);
            fail_non_finite(t, value, first, bad);
        }
        return data;
    }

    // An int8 tensor's block size: the tensor object's "block_size", an integer in [1, cols];
    // `blocks` = ceil(cols / block size). The scales must be there too (checked first, as
    // the Python reader does).
    int block_size(const TensorEntry& t, int64_t cols, int64_t& blocks) const {
        const std::string scales_key = spec::kInt8ScalesKey, size_key = spec::kInt8BlockSizeKey;
        if (!find(*t.node, scales_key.c_str())) fail(t.key, "int8 tensor has no '" + scales_key + "'");
        const json* value = find(*t.node, size_key.c_str());
        if (!value) fail(t.key, "int8 tensor has no '" + size_key + "'");
        // (the parser keeps non-negative integers as unsigned: negatives, floats, bools fail here)
        if (!value->is_number_unsigned() || value->get<uint64_t>() < 1 || value->get<uint64_t>() > (uint64_t)cols) {
            fail(t.key, size_key + " must be an integer in [1, " + std::to_string(cols) + "], found " + brief(*value));
        }
        int64_t size = (int64_t)value->get<uint64_t>();
        blocks = (cols + size - 1) / size;
        return (int)size;
    }

    // An int8 tensor's scales: a float32 tensor object (rows, blocks), all finite.
    const float* scales(const TensorEntry& t, int64_t rows, int64_t blocks, std::vector<std::vector<float>>& tensors) const {
        TensorEntry s = entry(*t.node, t.key, spec::kInt8ScalesKey, spec::kInt8ScalesDtype);
        if (s.shape != std::vector<int64_t>{rows, blocks}) {
            fail(s.key, "shape expected " + shape_str({rows, blocks}) + ", found " + shape_str(s.shape));
        }
        return float32_data(s, tensors);
    }

    void check_finite(const TensorEntry& t, const float* values, size_t n) const {
        size_t bad = 0, first = 0;
        for (size_t i = 0; i < n; i++) {
            if (!std::isfinite(values[i]) && bad++ == 0) first = i;
        }
        if (bad) fail_non_finite(t, values[first], first, bad);
    }

    // "non-finite value nan at index [3, 1] (2 in all)": the Python reader's words (modelfile.py _finite).
    [[noreturn]] void fail_non_finite(const TensorEntry& t, float value, size_t flat, size_t count) const {
        std::vector<int64_t> index(t.shape.size());
        for (size_t d = t.shape.size(); d-- > 0;) {
            index[d] = (int64_t)(flat % (size_t)t.shape[d]);
            flat /= (size_t)t.shape[d];
        }
        std::string text = std::isnan(value) ? "nan" : value > 0 ? "inf" : "-inf";
        fail(t.key, "non-finite value " + text + " at index " + shape_str(index) + " (" + std::to_string(count) +
                        " in all)");
    }

    Weights read_weights(const json& root, Config& c, ModelFile& file) const {
        std::vector<std::vector<float>>& tensors = file.tensors;
        int64_t H = c.hidden_size, V = c.vocab_size, I = c.intermediate_size, hd = c.head_dim;
        int64_t q_dim = (int64_t)c.num_heads * hd, kv_dim = (int64_t)c.num_kv_heads * hd;
        Weights w{};

        // RoPE tables; their rows give max_position_embeddings when the config does not
        const json& rope = object_member(root, "", "rope");
        if (c.max_position_embeddings == 0) {
            TensorEntry cos = entry(rope, "rope", "cos", "float32");
            if (cos.shape.size() != 2 || cos.shape[0] < 1) {
                fail(cos.key, "shape " + shape_str(cos.shape) + " is not (max_position_embeddings, head_dim)");
            }
            c.max_position_embeddings = (int)cos.shape[0];
        }
        int64_t max_pos = c.max_position_embeddings;
        w.rope_cos = weight(rope, "rope", "cos", {max_pos, hd}, tensors);
        w.rope_sin = weight(rope, "rope", "sin", {max_pos, hd}, tensors);

        const json& weights = object_member(root, "", "weights");
        w.tok_embedding = matrix(weights, "weights", "tok_embedding", V, H, file);
        w.final_rms = vector(weights, "weights", "final_rms", H, file);
        // tied head: files may leave lm_head out, since it equals tok_embedding
        w.lm_head = find(weights, "lm_head") ? matrix(weights, "weights", "lm_head", V, H, file) : w.tok_embedding;

        const json& layers = member(weights, "weights", "layers");
        if (!layers.is_array() || layers.size() != (size_t)c.num_layers) {
            fail("weights.layers", "expected a list of num_hidden_layers = " + std::to_string(c.num_layers) +
                                       " layers, found " + (layers.is_array() ? std::to_string(layers.size()) + " entries" : brief(layers)));
        }
        for (int l = 0; l < c.num_layers; l++) {
            const json& layer = layers[l];
            std::string key = "weights.layers[" + std::to_string(l) + "]";
            LayerWeights lw{};
            lw.rms_attn = vector(layer, key, "rms_attn", H, file);
            lw.wq = matrix(layer, key, "wq", q_dim, H, file);
            lw.wk = matrix(layer, key, "wk", kv_dim, H, file);
            lw.wv = matrix(layer, key, "wv", kv_dim, H, file);
            lw.wo = matrix(layer, key, "wo", H, q_dim, file);
            lw.rms_ffn = vector(layer, key, "rms_ffn", H, file);
            lw.w_gate = matrix(layer, key, "w_gate", I, H, file);
            lw.w_up = matrix(layer, key, "w_up", I, H, file);
            lw.w_down = matrix(layer, key, "w_down", H, I, file);
            w.layers.push_back(lw);
        }
        return w;
    }

    // The file's inputs, checked like the kernel checks a call's: ids in the vocabulary,
    // a 0/1 mask, no more positions than the RoPE tables hold.
    Inputs read_inputs(const json& inputs, const Config& c) const {
        TensorEntry ids = entry(inputs, "inputs", "input_ids", "int32");
        if (ids.shape.size() != 2 || ids.shape[0] < 1 || ids.shape[1] < 1) {
            fail(ids.key, "shape " + shape_str(ids.shape) + " is not (B, S) with B, S >= 1");
        }
        TensorEntry mask = entry(inputs, "inputs", "attention_mask", "uint8");
        if (mask.shape != ids.shape) {
            fail(mask.key, "shape " + shape_str(mask.shape) + " differs from input_ids' " + shape_str(ids.shape));
        }
        Inputs in;
        in.B = (int)ids.shape[0];
        in.S = (int)ids.shape[1];
        in.input_ids = decode<int32_t>(ids);
        in.attention_mask = decode<uint8_t>(mask);
        if (in.S > c.max_position_embeddings) {
            fail(ids.key, std::to_string(in.S) + " positions exceed max_position_embeddings " +
                              std::to_string(c.max_position_embeddings));
        }
        auto where = [&](size_t i) {
            return "batch " + std::to_string(i / in.S) + ", position " + std::to_string(i % in.S);
        };
        for (size_t i = 0; i < in.input_ids.size(); i++) {
            int32_t id = in.input_ids[i];
            if (id < 0 || id >= c.vocab_size) {
                fail(ids.key, "id " + std::to_string(id) + " at " + where(i) + " is outside the vocabulary [0, " +
                                  std::to_string(c.vocab_size) + ")");
            }
        }
        for (size_t i = 0; i < in.attention_mask.size(); i++) {
            if (in.attention_mask[i] > 1) {
                fail(mask.key, "value " + std::to_string(in.attention_mask[i]) + " at " + where(i) + " (expected 0 or 1)");
            }
        }
        return in;
    }

    std::string path_;
    mutable std::vector<DecodedData> decoded_;  // see DecodedData; emptied as tensors are read
    std::vector<MappedSpan> mapped_;            // a safetensors file's tensors, by placeholder index
    size_t mapped_size_ = 0;
};

}  // namespace

static std::string printable(const std::string& text) {
    static const char* hex = "0123456789abcdef";
    std::string out;
    out.reserve(text.size());
    for (unsigned char ch : text) {
        if (ch >= 0x20 && ch < 0x7f) {
            out += (char)ch;
        } else {
            out += "\\x";
            out += hex[ch >> 4];
            out += hex[ch & 15];
        }
    }
    return out;
}

ModelFileError::ModelFileError(const std::string& message) : std::runtime_error(printable(message)) {}

// A json::exception past the parser would be a check missing above: still one line, still
// a ModelFileError.
template <typename Load>
static ModelFile guarded(const std::string& path, Load load) {
    try {
        return load();
    } catch (const nlohmann::json::exception& e) {
        throw ModelFileError(path + ": " + e.what());
    }
}

// A safetensors file: its 8-byte header length's top byte is 0 (JSON text holds no NUL byte);
// the Python reader's st_container.is_safetensors. Anything unreadable goes to the JSON
// reader, which reports it.
static bool is_safetensors_file(const std::string& path) {
    std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(std::fopen(path.c_str(), "rb"), std::fclose);
    unsigned char head[8];
    return file && std::fread(head, 1, 8, file.get()) == 8 && head[7] == 0;
}

ModelFile load_model_file(const std::string& path) {
    Reader reader(path);
    std::error_code ec;
    if (!std::filesystem::is_directory(path, ec) && is_safetensors_file(path)) {
        return guarded(path, [&] { return reader.load_safetensors(); });
    }
    return guarded(path, [&] { return reader.load_file(); });
}

ModelFile parse_model_file(const std::string& text, const std::string& path, JsonParse how) {
    Reader reader(path);
    return guarded(path, [&] { return reader.load_text(text, how); });
}

}  // namespace xvalid
