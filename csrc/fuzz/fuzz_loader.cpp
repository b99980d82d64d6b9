// libFuzzer harness for the model-file loader, plus a forward pass (and one decode step)
// on what it accepts when that is small. Built and run with ASan + UBSan by
// scripts/fuzz_loader.sh (docs/cpp.md, "Fuzzing the loader"). A finding is a crash, a
// sanitizer report, a leak, or an exception other than ModelFileError from the loader or
// InputError from the kernel: anything the runner would not turn into one line and exit 2.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "io/forward_memory.h"
#include "io/model_file.h"
#include "kernel/ops.h"
#include "kernel/transformer.h"

// A forward is run only when it needs at most this much memory, so that each input stays
// fast and the fuzzer's RSS limit measures the loader, not the model.
constexpr double kMaxForwardBytes = 16.0 * 1024 * 1024;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
    xvalid::set_num_threads(1);
    setenv("XVALID_MEMORY_LIMIT_MB", "256", 1);  // the loader's own limit, far below the fuzzer's RSS limit
    return 0;
}

static void forward_and_step(const xvalid::ModelFile& file, bool capture) {
    const xvalid::Inputs& in = *file.inputs;
    if (xvalid::forward_memory_bytes(file.config, in.B, in.S + 1, in.S + 1, capture) > kMaxForwardBytes) return;
    std::vector<int64_t> ids(in.input_ids.begin(), in.input_ids.end());
    std::vector<int64_t> mask(in.attention_mask.begin(), in.attention_mask.end());
    xvalid::StepInput step_in;
    step_in.ids = ids.data();
    step_in.B = in.B;
    step_in.T = in.S;
    step_in.mask = mask.data();
    step_in.mask_rows = in.B;
    step_in.mask_cols = in.S;
    xvalid::Transformer transformer(file.config, file.weights, xvalid::clear_kernel);  // the one linked in
    xvalid::Intermediates captured;
    try {
        transformer.forward(step_in, capture ? &captured : nullptr);
        // one decode step: each sequence's first token again, mask all ones (nullptr)
        std::vector<int64_t> next(in.B);
        for (int b = 0; b < in.B; b++) next[b] = ids[(size_t)b * in.S];
        xvalid::StepInput one;
        one.ids = next.data();
        one.B = in.B;
        one.T = 1;
        transformer.step(one);
    } catch (const xvalid::InputError&) {
        // refused by the kernel's own checks (e.g. no room for one more position): fine
    }
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    std::string text(reinterpret_cast<const char*>(data), size);
    try {
        xvalid::ModelFile file = xvalid::parse_model_file(text, "fuzz.json");
        if (file.inputs) forward_and_step(file, size % 2 == 1);
    } catch (const xvalid::ModelFileError& e) {
        // the expected refusal: must be one printable line
        for (const char* p = e.what(); *p; p++) {
            if ((unsigned char)*p < 0x20 || (unsigned char)*p >= 0x7f) std::abort();
        }
    }
    return 0;
}
