// Reads the model file, JSON or safetensors container, told apart by content
// (layout: docs/model-format.md): config, RoPE tables and
// weights as base64 tensors, and optionally an example batch. The text is checked before it
// is parsed (nesting depth), every number while it is parsed (overflow), and every value
// after: config ranges (limits.h), each tensor (present, base64, dtype, shape against the
// config, byte length, finite), and the memory a forward on the inputs would need
// (forward_memory.h), all before the kernel sees anything.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernel/transformer.h"

namespace xvalid {

// A model file that cannot be used: missing, not JSON, a missing key, a wrong dtype or
// shape, bad base64, a non-finite weight, an unsupported format_version, ... The message
// is one line: "<path>: <key>: <what is wrong>", e.g. "m.json: weights.layers[1].wk: ...".
struct ModelFileError : std::runtime_error {
    // The message quotes bits of a possibly hostile file: it is made printable ASCII on one
    // line (other bytes as \xNN), so that Python can turn it into a str and a terminal can
    // show it.
    explicit ModelFileError(const std::string& message);
};

// The example batch a model file may carry: inputs.input_ids and inputs.attention_mask.
// Values are not checked here; the kernel checks them when they are used.
struct Inputs {
    int B = 0;
    int S = 0;
    std::vector<int32_t> input_ids;       // (B, S)
    std::vector<uint8_t> attention_mask;  // (B, S) 1 = keep, 0 = padding
};

// A loaded model file. It owns the tensors that `weights` points into, so it can be
// moved (the buffers move with it) but not copied. Weight matrices keep their stored dtype
// (float32, float16, bfloat16, int8 + scales: dtype.h); nothing is expanded to float32 but
// the norm vectors (H floats each).
struct ModelFile {
    Config config;
    Weights weights;
    std::optional<Inputs> inputs;      // always set by the loaders ("inputs" is required)
    // The decoded tensors, one buffer each: float32 ones (RoPE tables, float32 weights, int8
    // scales, norm vectors upcast from half precision), float16/bfloat16 bits, int8 values.
    std::vector<std::vector<float>> tensors;
    std::vector<std::vector<uint16_t>> halves;
    std::vector<std::vector<int8_t>> quantized;
    // A safetensors file's memory mapping: its tensors are used in place when aligned for
    // their dtype, so `weights` may point into it. Unmapped when the last owner goes.
    std::shared_ptr<const void> mapping;

    ModelFile() = default;
    ModelFile(ModelFile&&) = default;
    ModelFile& operator=(ModelFile&&) = default;
    ModelFile(const ModelFile&) = delete;
    ModelFile& operator=(const ModelFile&) = delete;
};

// Loads and checks the model file at `path`. Throws ModelFileError.
ModelFile load_model_file(const std::string& path);

// How the JSON container's text is parsed. fast: the long "data" strings are decoded straight
// from the text and the parser reads the rest (what load_model_file does). whole: the parser
// reads all of it, decoding each "data" string as it goes: the plain way, which the tests and
// the fuzz harness hold the fast one to (same tensors, same messages).
enum class JsonParse { fast, whole };

// The same for a file's text already in memory (the fuzz harness's entry point); `path`
// only names the file in messages.
ModelFile parse_model_file(const std::string& text, const std::string& path, JsonParse how = JsonParse::fast);

}  // namespace xvalid
