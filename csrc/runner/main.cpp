// xvalid-run: the C++ kernel without Python, on a model file's own inputs. The loop for
// gdb and valgrind (docs/cpp.md), and an engine with the seed's `engine MODEL OUT_DIR` shape.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
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
    "\n"
    "Runs the C++ kernel's forward pass on the model file's inputs and writes\n"
    "OUT_DIR/logits.npy, float32 (B, S, V); OUT_DIR is created if needed.\n"
    "\n"
    "  --intermediates  also write OUT_DIR/intermediates/NAME.npy for every named\n"
    "                   intermediate (docs/intermediates.md); captured in the first run\n"
    "  --threads N      OpenMP threads (default: OMP_NUM_THREADS, else all cores)\n"
    "  --repeat N       run the forward pass N times, report the median time (default 1)\n"
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
};

static int parse_count(const std::string& option, const char* text) {
    if (!text) throw UsageError(option + " needs a value");
    size_t used = 0;
    int n = 0;
    try {
        n = std::stoi(text, &used);
    } catch (const std::logic_error&) {
        used = 0;
    }
    if (used == 0 || text[used] != '\0' || n < 1) {
        throw UsageError(option + " needs a positive integer, got '" + text + "'");
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

static int run(const Options& opt) {
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

    xvalid::Transformer transformer(file.config, file.weights);
    xvalid::Intermediates captured;
    std::vector<double> forward_ms;
    const float* logits = nullptr;
    for (int r = 0; r < opt.repeat; r++) {
        start = std::chrono::steady_clock::now();
        logits = transformer.forward(in, opt.intermediates && r == 0 ? &captured : nullptr);
        forward_ms.push_back(ms_since(start));
    }

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

    std::printf("xvalid-run: B=%lld S=%lld V=%lld load %.1f ms, forward %.2f ms (median of %d), threads %d, wrote %s%s\n",
                (long long)in.B, (long long)in.T, (long long)V, load_ms, median(forward_ms), opt.repeat,
                xvalid::get_num_threads(), (out_dir / "logits.npy").string().c_str(),
                opt.intermediates ? (" + " + std::to_string(captured.size()) + " intermediates").c_str() : "");
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
