// xvalid-run: the C++ kernel without Python, on a model file's own inputs. The loop for
// gdb and valgrind (docs/cpp.md), and an engine with the seed's `engine MODEL OUT_DIR` shape
// that implements every extension of the engine protocol (docs/engines.md): decode through
// the KV cache, its own timing, threads.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "io/forward_memory.h"
#include "io/model_file.h"
#include "io/npy.h"
#include "kernel/ops.h"
#include "kernel/transformer.h"

namespace fs = std::filesystem;

static const char* const kUsage =
    "usage: xvalid-run MODEL OUT_DIR [--intermediates] [--threads N] [--repeat N]\n"
    "                  [--warmup N] [--decode N] [--timing] [--kernel fast|clear] [--profile]\n"
    "\n"
    "Runs the C++ kernel's forward pass on the model file's inputs and writes\n"
    "OUT_DIR/logits.npy, float32 (B, S, V); OUT_DIR is created if needed.\n"
    "\n"
    "  --intermediates  also write OUT_DIR/intermediates/NAME.npy for every named\n"
    "                   intermediate (docs/intermediates.md); captured in the first run\n"
    "  --threads N      OpenMP threads (default: OMP_NUM_THREADS, else all cores)\n"
    "  --repeat N       run the forward pass N times, report the median time (default 1)\n"
    "  --kernel NAME    fast (default: packed SIMD matmul, fused ops) or clear (naive)\n"
    "  --profile        print a per-op time table (calls, ms, share, GFLOP/s, GB/s)\n"
    "  --warmup N       untimed forward passes before those (default 0)\n"
    "  --decode N       also prefill S-N tokens, then decode N one at a time through the\n"
    "                   KV cache: OUT_DIR/decode_logits.npy, float32 (B, N, V) (default 0)\n"
    "  --timing         write OUT_DIR/timing.json: load_ms, forward_ms (the --repeat\n"
    "                   samples), warmup, threads, and prefill_ms, decode_ms with --decode\n"
    "  -h, --help       show this help\n"
    "\n"
    "Prints one summary line. Exit status: 0 ok, 2 bad usage or bad input (model file,\n"
    "inputs, a forward needing more than XVALID_MEMORY_LIMIT_MB, by default half the\n"
    "machine's memory), 1 any other failure (e.g. OUT_DIR not writable).\n";

// A command line this program cannot run: exit status 2, like a bad model file.
struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct Options {
    std::string model_path;
    std::string out_dir;
    bool intermediates = false;
    int threads = 0;  // 0 = the kernel's default
    int repeat = 1;
    std::string kernel = xvalid::default_kernel_name();
    bool profile = false;
    int warmup = 0;
    int decode = 0;   // decode steps after a prefill of S - decode tokens; 0 = none
    bool timing = false;
};

static int parse_count(const std::string& option, const char* text, int min = 1) {
    if (!text) throw UsageError(option + " needs a value");
    size_t used = 0;
    int n = 0;
    try {
        n = std::stoi(text, &used);
    } catch (const std::logic_error&) {
        used = 0;
    }
    if (used == 0 || text[used] != '\0' || n < min) {
        throw UsageError(option + " needs " + (min > 0 ? "a positive" : "a non-negative") +
                         " integer, got '" + text + "'");
    }
    return n;
}

// Returns false when --help was asked for.
static bool parse_args(int argc, char** argv, Options& opt) {
    std::vector<std::string> positional;
    for (int i = 1; i < argc; i++) {
        std::string arg = argv[i];
        if (arg == "-h" || arg == "--help") return false;
        if (arg == "--intermediates") {
            opt.intermediates = true;
        } else if (arg == "--threads") {
            opt.threads = parse_count(arg, argv[++i]);
        } else if (arg == "--repeat") {
            opt.repeat = parse_count(arg, argv[++i]);
        } else if (arg == "--warmup") {
            opt.warmup = parse_count(arg, argv[++i], 0);
        } else if (arg == "--decode") {
            opt.decode = parse_count(arg, argv[++i], 0);
        } else if (arg == "--timing") {
            opt.timing = true;
        } else if (arg == "--kernel") {
            if (i + 1 >= argc) throw UsageError("--kernel needs a value");
            opt.kernel = argv[++i];
        } else if (arg == "--profile") {
            opt.profile = true;
        } else if (arg.size() > 1 && arg[0] == '-') {
            throw UsageError("unknown option " + arg);
        } else {
            positional.push_back(arg);
        }
    }
    if (positional.size() != 2) throw UsageError("expected MODEL and OUT_DIR");
    opt.model_path = positional[0];
    opt.out_dir = positional[1];
    return true;
}

static double ms_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

static double median(std::vector<double> values) {
    std::sort(values.begin(), values.end());
    size_t n = values.size();
    return n % 2 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
}

// The per-op table of --profile, over every timed forward.
static void print_profile(const xvalid::Profile& profile) {
    double total = 0;
    for (const xvalid::OpStats& s : profile.ops) total += s.seconds;
    std::printf("%-16s %7s %10s %6s %9s %8s\n", "op", "calls", "ms", "share", "GFLOP/s", "GB/s");
    for (int i = 0; i < (int)xvalid::Op::count; i++) {
        const xvalid::OpStats& s = profile.ops[i];
        if (s.calls == 0) continue;
        std::printf("%-16s %7lld %10.3f %5.1f%% %9.2f %8.2f\n", xvalid::op_name((xvalid::Op)i),
                    (long long)s.calls, s.seconds * 1e3, total > 0 ? 100 * s.seconds / total : 0.0,
                    s.seconds > 0 ? s.flops / s.seconds * 1e-9 : 0.0, s.seconds > 0 ? s.bytes / s.seconds * 1e-9 : 0.0);
    }
    std::printf("%-16s %7s %10.3f\n", "total", "", total * 1e3);
}

// a[:, from:to] of a row-major (rows, cols) array, contiguous: the kernel's (B, T) inputs.
static std::vector<int64_t> columns(const std::vector<int64_t>& a, int64_t rows, int64_t cols,
                                    int64_t from, int64_t to) {
    std::vector<int64_t> out;
    out.reserve((size_t)(rows * (to - from)));
    for (int64_t r = 0; r < rows; r++) {
        out.insert(out.end(), a.begin() + r * cols + from, a.begin() + r * cols + to);
    }
    return out;
}

struct DecodeResult {
    std::vector<float> logits;   // (B, N, V): step i is position S - N + i
    double prefill_ms = 0;
    std::vector<double> step_ms;  // (N)
};

// The protocol's decode: prefill the first S - N tokens, then feed one token a step through
// the KV cache, each step's mask covering every key so far (B, p0 + 1).
static DecodeResult decode(xvalid::Transformer& transformer, const std::vector<int64_t>& ids,
                           const std::vector<int64_t>& mask, int64_t B, int64_t S, int64_t V,
                           int n) {
    DecodeResult result;
    result.logits.resize((size_t)(B * n * V));
    transformer.reset_cache();
    for (int64_t t = S - n - 1; t < S; t++) {  // t = S-N-1: the prefill of S-N tokens
        int64_t from = t < S - n ? 0 : t, to = t < S - n ? S - n : t + 1;
        std::vector<int64_t> step_ids = columns(ids, B, S, from, to);
        std::vector<int64_t> step_mask = columns(mask, B, S, 0, to);
        xvalid::StepInput in;
        in.ids = step_ids.data();
        in.B = B;
        in.T = to - from;
        in.mask = step_mask.data();
        in.mask_rows = B;
        in.mask_cols = to;
        auto start = std::chrono::steady_clock::now();
        const float* logits = transformer.step(in);
        double ms = ms_since(start);
        if (t < S - n) {
            result.prefill_ms = ms;
            continue;
        }
        result.step_ms.push_back(ms);
        int64_t i = t - (S - n);
        for (int64_t b = 0; b < B; b++) {
            std::copy(logits + b * V, logits + (b + 1) * V, result.logits.begin() + (b * n + i) * V);
        }
    }
    return result;
}

static std::string json_list(const std::vector<double>& values) {
    std::string out = "[";
    char buf[32];
    for (size_t i = 0; i < values.size(); i++) {
        std::snprintf(buf, sizeof buf, "%s%.6f", i ? ", " : "", values[i]);
        out += buf;
    }
    return out + "]";
}

// OUT_DIR/timing.json (docs/engines.md), written to a temporary file and renamed.
static void write_timing(const fs::path& out_dir, double load_ms, int warmup,
                         const std::vector<double>& forward_ms, const DecodeResult* decoded) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "{\"load_ms\": %.6f, \"warmup\": %d, \"threads\": %d, ",
                  load_ms, warmup, xvalid::get_num_threads());
    std::string text = buf + std::string("\"forward_ms\": ") + json_list(forward_ms);
    if (decoded) {
        std::snprintf(buf, sizeof buf, ", \"prefill_ms\": %.6f", decoded->prefill_ms);
        text += buf + std::string(", \"decode_ms\": ") + json_list(decoded->step_ms);
    }
    text += "}\n";
    fs::path path = out_dir / "timing.json", tmp = out_dir / ".timing.json.tmp";
    {
        std::ofstream file(tmp, std::ios::binary);
        file << text;
        if (!file.flush()) throw std::runtime_error(tmp.string() + ": cannot write");
    }
    fs::rename(tmp, path);
}

static int run(const Options& opt) {
    const xvalid::KernelOps& kernel = xvalid::find_kernel(opt.kernel);  // bad name: exit 2 before loading
    if (opt.threads > 0) xvalid::set_num_threads(opt.threads);

    auto start = std::chrono::steady_clock::now();
    xvalid::ModelFile file = xvalid::load_model_file(opt.model_path);
    double load_ms = ms_since(start);
    if (!file.inputs) throw xvalid::ModelFileError(opt.model_path + ": inputs: missing; xvalid-run needs the file's input_ids and attention_mask");
    const xvalid::Inputs& inputs = *file.inputs;
    if (opt.intermediates) {  // the loader checked the memory of a forward without them
        std::string problem = xvalid::forward_memory_problem(file.config, inputs.B, inputs.S, inputs.S, true);
        if (!problem.empty()) {
            throw xvalid::ModelFileError(opt.model_path + ": inputs.input_ids: a forward over B=" + std::to_string(inputs.B) +
                                         " x S=" + std::to_string(inputs.S) + " tokens " + problem);
        }
    }

    // the kernel takes int64 ids and mask, like torch
    std::vector<int64_t> ids(inputs.input_ids.begin(), inputs.input_ids.end());
    std::vector<int64_t> mask(inputs.attention_mask.begin(), inputs.attention_mask.end());
    xvalid::StepInput in;
    in.ids = ids.data();
    in.B = inputs.B;
    in.T = inputs.S;
    in.mask = mask.data();
    in.mask_rows = inputs.B;
    in.mask_cols = inputs.S;

    if (opt.decode >= inputs.S) {
        throw UsageError("--decode " + std::to_string(opt.decode) + " needs at least one prefill token (the inputs have S = " + std::to_string(inputs.S) + " tokens)");
    }

    xvalid::Transformer transformer(file.config, file.weights, kernel);
    xvalid::Intermediates captured;
    std::vector<double> forward_ms;
    const float* logits = nullptr;
    if (opt.intermediates) logits = transformer.forward(in, &captured);  // untimed: capture costs
    for (int r = 0; r < opt.warmup; r++) transformer.forward(in);
    transformer.set_profiling(opt.profile);  // the profile covers the timed forwards only
    for (int r = 0; r < opt.repeat; r++) {
        start = std::chrono::steady_clock::now();
        logits = transformer.forward(in);
        forward_ms.push_back(ms_since(start));
    }
    transformer.set_profiling(false);

    fs::path out_dir(opt.out_dir);
    fs::create_directories(out_dir);
    int64_t V = file.config.vocab_size;
    xvalid::write_npy((out_dir / "logits.npy").string(), logits, {in.B, in.T, V});
    if (opt.intermediates) {
        fs::create_directories(out_dir / "intermediates");
        for (const xvalid::Intermediate& t : captured) {
            xvalid::write_npy((out_dir / "intermediates" / (t.name + ".npy")).string(), t.data.data(), t.shape);
        }
    }
    // After the logits are written: a step() call reuses their buffer.
    std::string decode_note;
    DecodeResult decoded;
    if (opt.decode > 0) {
        decoded = decode(transformer, ids, mask, in.B, in.T, V, opt.decode);
        xvalid::write_npy((out_dir / "decode_logits.npy").string(), decoded.logits.data(),
                          {in.B, (int64_t)opt.decode, V});
        char buf[128];
        std::snprintf(buf, sizeof buf, ", decode %d steps (prefill %.2f ms, %.3f ms/step median)",
                      opt.decode, decoded.prefill_ms, median(decoded.step_ms));
        decode_note = buf;
    }
    if (opt.timing) write_timing(out_dir, load_ms, opt.warmup, forward_ms, opt.decode > 0 ? &decoded : nullptr);

    std::printf("xvalid-run: kernel %s, B=%lld S=%lld V=%lld load %.1f ms, forward %.2f ms (median of %d), threads %d%s, wrote %s%s\n",
                kernel.name, (long long)in.B, (long long)in.T, (long long)V, load_ms, median(forward_ms), opt.repeat,
                xvalid::get_num_threads(), decode_note.c_str(), (out_dir / "logits.npy").string().c_str(),
                opt.intermediates ? (" + " + std::to_string(captured.size()) + " intermediates").c_str() : "");
    if (opt.profile) print_profile(transformer.profile());
    return 0;
}

int main(int argc, char** argv) {
    try {
        Options opt;
        if (!parse_args(argc, argv, opt)) {
            std::fputs(kUsage, stdout);
            return 0;
        }
        return run(opt);
    } catch (const UsageError& e) {
        std::fprintf(stderr, "xvalid-run: error: %s (see xvalid-run --help)\n", e.what());
        return 2;
    } catch (const xvalid::ModelFileError& e) {
        std::fprintf(stderr, "xvalid-run: error: %s\n", e.what());
        return 2;
    } catch (const xvalid::InputError& e) {
        std::fprintf(stderr, "xvalid-run: error: %s\n", e.what());
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "xvalid-run: error: %s\n", e.what());
        return 1;
    }
}
