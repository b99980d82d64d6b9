// xvalid._core: thin pybind11 bindings of the loader and the kernel. Arrays are
// converted and checked here; every semantic check lives in the kernel or the loader.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pybind11/stl/filesystem.h>

#include <cstring>
#include <filesystem>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "io/forward_memory.h"
#include "io/limits.h"
#include "io/model_file.h"
#include "kernel/ops.h"
#include "kernel/transformer.h"

namespace py = pybind11;

using Int64Matrix = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// Hands a vector to numpy without copying it: the array owns it through a capsule.
static py::array_t<float> to_numpy(std::vector<float>&& data, const std::vector<int64_t>& shape) {
    auto* owner = new std::vector<float>(std::move(data));
    py::capsule free_owner(owner, [](void* p) { delete static_cast<std::vector<float>*>(p); });
    return py::array_t<float>(std::vector<py::ssize_t>(shape.begin(), shape.end()), owner->data(), free_owner);
}

// Any 2-D integer array-like (bool too, for masks) as C-contiguous int64, the kernel's
// type, so no value is wrapped or truncated before the kernel checks it.
static Int64Matrix int64_matrix(py::handle obj, const char* name, bool allow_bool) {
    py::array array = py::array::ensure(obj);
    if (!array) throw py::value_error(std::string(name) + " must be an array of integers");
    char kind = array.dtype().kind();
    if (kind != 'i' && kind != 'u' && !(allow_bool && kind == 'b')) {
        throw py::value_error(std::string(name) + " must hold integers" + (allow_bool ? " or bools" : "") +
                              ", got dtype " + py::str(array.dtype()).cast<std::string>());
    }
    if (array.ndim() != 2) {
        throw py::value_error(std::string(name) + " must be 2-D (B, T), got " + std::to_string(array.ndim()) + "-D");
    }
    // uint64 beyond int64 would wrap to negative: still rejected, but shown as the wrong value
    if (kind == 'u' && array.itemsize() == 8 && array.size() > 0 &&
        array.attr("max")().cast<uint64_t>() > (uint64_t)std::numeric_limits<int64_t>::max()) {
        throw py::value_error(std::string(name) + " holds values above 2**63 - 1");
    }
    Int64Matrix converted = Int64Matrix::ensure(array);
    if (!converted) throw py::value_error(std::string(name) + " cannot be converted to int64");
    return converted;
}

// A model file and a Transformer over its weights. Calls are serialised by a mutex:
// forward() releases the GIL, and one RunState cannot serve two threads at once.
class Model {
public:
    Model(const std::filesystem::path& path, const std::string& kernel)
        : path_(path.string()),
          file_(xvalid::load_model_file(path_)),
          transformer_(file_.config, file_.weights, xvalid::find_kernel(kernel)) {}

    std::string kernel() const { return transformer_.kernel().name; }

    void set_profiling(bool on) {
        std::lock_guard<std::mutex> lock(mutex_);
        transformer_.set_profiling(on);
    }

    void reset_profile() {
        std::lock_guard<std::mutex> lock(mutex_);
        transformer_.reset_profile();
    }

    // One dict per op that ran since the last reset, in forward order.
    py::list profile() {
        std::lock_guard<std::mutex> lock(mutex_);
        py::list rows;
        const xvalid::Profile& p = transformer_.profile();
        for (int i = 0; i < (int)xvalid::Op::count; i++) {
            const xvalid::OpStats& s = p.ops[i];
            if (s.calls == 0) continue;
            py::dict row;
            row["op"] = xvalid::op_name((xvalid::Op)i);
            row["calls"] = s.calls;
            row["seconds"] = s.seconds;
            row["flops"] = s.flops;
            row["bytes"] = s.bytes;
            rows.append(row);
        }
        return rows;
    }

    py::dict config() const {
        const xvalid::Config& c = file_.config;
        py::dict d;
        d["hidden_size"] = c.hidden_size;
        d["num_hidden_layers"] = c.num_layers;
        d["num_attention_heads"] = c.num_heads;
        d["num_key_value_heads"] = c.num_kv_heads;
        d["head_dim"] = c.head_dim;
        d["vocab_size"] = c.vocab_size;
        d["intermediate_size"] = c.intermediate_size;
        d["max_position_embeddings"] = c.max_position_embeddings;
        d["rms_norm_eps"] = c.rms_norm_eps;
        d["rope_theta"] = c.rope_theta;
        return d;
    }

    py::array_t<int32_t> input_ids() const {
        const xvalid::Inputs& in = inputs();
        py::array_t<int32_t> out({in.B, in.S});
        std::memcpy(out.mutable_data(), in.input_ids.data(), in.input_ids.size() * sizeof(int32_t));
        return out;
    }

    py::array_t<uint8_t> attention_mask() const {
        const xvalid::Inputs& in = inputs();
        py::array_t<uint8_t> out({in.B, in.S});
        std::memcpy(out.mutable_data(), in.attention_mask.data(), in.attention_mask.size());
        return out;
    }

    int cache_len() {
        std::lock_guard<std::mutex> lock(mutex_);
        return transformer_.cache_len();
    }

    void reset_cache() {
        std::lock_guard<std::mutex> lock(mutex_);
        transformer_.reset_cache();
    }

    // forward() when from_start (reset + step), else step(); logits (B, T, V) and, with
    // capture, a dict name -> array in forward order.
    py::object run(py::handle ids_obj, py::handle mask_obj, bool from_start, bool capture) {
        Int64Matrix ids = int64_matrix(ids_obj, "input_ids", false);
        std::optional<Int64Matrix> mask;
        if (!mask_obj.is_none()) mask = int64_matrix(mask_obj, "attention_mask", true);
        xvalid::StepInput in;
        in.ids = ids.data();
        in.B = ids.shape(0);
        in.T = ids.shape(1);
        if (mask) {
            in.mask = mask->data();
            in.mask_rows = mask->shape(0);
            in.mask_cols = mask->shape(1);
        }

        std::vector<float> logits;
        xvalid::Intermediates captured;
        {
            py::gil_scoped_release no_gil;
            std::lock_guard<std::mutex> lock(mutex_);
            check_forward_memory(in, from_start ? 0 : transformer_.cache_len(), capture);
            xvalid::Intermediates* sink = capture ? &captured : nullptr;
            const float* out = from_start ? transformer_.forward(in, sink) : transformer_.step(in);
            logits.assign(out, out + (size_t)in.B * in.T * file_.config.vocab_size);
        }
        py::array_t<float> result = to_numpy(std::move(logits), {in.B, in.T, file_.config.vocab_size});
        if (!capture) return std::move(result);
        py::dict named;
        for (xvalid::Intermediate& t : captured) named[py::str(t.name)] = to_numpy(std::move(t.data), t.shape);
        return py::make_tuple(result, named);
    }

    std::string repr() const {
        const xvalid::Config& c = file_.config;
        return "<xvalid._core.Model '" + path_ + "' kernel=" + kernel() + " H=" + std::to_string(c.hidden_size) + " L=" +
               std::to_string(c.num_layers) + " NH=" + std::to_string(c.num_heads) + " KVH=" +
               std::to_string(c.num_kv_heads) + " V=" + std::to_string(c.vocab_size) + ">";
    }

private:
    // Refuses, before the kernel allocates anything, a call whose forward would need more
    // memory than the limit (forward_memory.h).
    void check_forward_memory(const xvalid::StepInput& in, int64_t cached, bool capture) const {
        std::string problem = xvalid::forward_memory_problem(file_.config, in.B, in.T, cached + in.T, capture);
        if (!problem.empty()) {
            throw xvalid::InputError("input_ids (" + std::to_string(in.B) + ", " + std::to_string(in.T) + ")" +
                                     (cached ? " after " + std::to_string(cached) + " cached position" + (cached == 1 ? "" : "s") : "") + ": " +
                                     problem);
        }
    }

    const xvalid::Inputs& inputs() const {
        if (!file_.inputs) throw xvalid::ModelFileError(path_ + ": inputs: missing from the model file");
        return *file_.inputs;
    }

    std::string path_;
    xvalid::ModelFile file_;            // owns the tensors that transformer_ borrows
    xvalid::Transformer transformer_;
    std::mutex mutex_;
};

PYBIND11_MODULE(_core, m) {
    m.doc() = "xvalid's C++ kernel: a fp32 Llama/MiniMind2 decoder reading xvalid model files.";

    py::register_exception<xvalid::ModelFileError>(m, "ModelFileError", PyExc_ValueError);
    py::register_exception<xvalid::InputError>(m, "InputError", PyExc_ValueError);

    py::class_<Model>(m, "Model")
        .def(py::init([](const std::filesystem::path& path, const std::string& kernel) {
                 xvalid::find_kernel(kernel);  // an unknown name fails before the file is read
                 py::gil_scoped_release no_gil;  // loading a large file takes a while
                 return std::make_unique<Model>(path, kernel);
             }),
             py::arg("path"), py::arg("kernel") = xvalid::default_kernel_name(),
             "Loads and checks a model file; raises ModelFileError (a ValueError).\n"
             "kernel: one of kernels() ('fast', the default, or 'clear'); InputError otherwise.")
        .def_property_readonly("kernel", &Model::kernel, "The kernel this model computes with.")
        .def("set_profiling", &Model::set_profiling, py::arg("on"),
             "Turn the per-op timers on or off (off: they cost nothing).")
        .def("reset_profile", &Model::reset_profile, "Zero the per-op timers.")
        .def("profile", &Model::profile,
             "Per-op totals since the last reset: [{op, calls, seconds, flops, bytes}] in forward order.")
        .def_property_readonly("config", &Model::config, "The model's hyperparameters as a dict.")
        .def_property_readonly("input_ids", &Model::input_ids, "The file's input_ids, int32 (B, S).")
        .def_property_readonly("attention_mask", &Model::attention_mask, "The file's attention_mask, uint8 (B, S).")
        .def_property_readonly("cache_len", &Model::cache_len, "Positions in the KV cache.")
        .def("reset_cache", &Model::reset_cache, "Empties the KV cache.")
        .def(
            "forward",
            [](Model& self, py::handle ids, py::handle mask, bool capture) { return self.run(ids, mask, true, capture); },
            py::arg("ids"), py::arg("mask") = py::none(), py::arg("capture") = false,
            "Logits float32 (B, S, V) of the whole sequences from an empty cache (mask None = all ones);\n"
            "with capture=True, (logits, {name: array}) for every intermediate of docs/intermediates.md.\n"
            "Leaves the sequences in the KV cache for step(). Raises InputError (a ValueError).")
        .def(
            "step",
            [](Model& self, py::handle ids, py::handle mask) { return self.run(ids, mask, false, false); },
            py::arg("ids"), py::arg("mask") = py::none(),
            "Appends ids (B, T) to the KV cache and returns their logits float32 (B, T, V);\n"
            "mask is (B, cache_len + T) over cached and new tokens, None = all ones.")
        .def("__repr__", &Model::repr);

    m.def(
        "_load_text",
        [](const py::bytes& text, const std::string& path, bool whole) {
            std::string bytes = text;
            xvalid::ModelFile file;
            {
                py::gil_scoped_release no_gil;
                file = xvalid::parse_model_file(bytes, path, whole ? xvalid::JsonParse::whole : xvalid::JsonParse::fast);
            }
            py::list tensors;
            for (const std::vector<float>& t : file.tensors) tensors.append(py::bytes((const char*)t.data(), t.size() * sizeof(float)));
            const xvalid::Inputs& in = *file.inputs;
            tensors.append(py::bytes((const char*)in.input_ids.data(), in.input_ids.size() * sizeof(int32_t)));
            tensors.append(py::bytes((const char*)in.attention_mask.data(), in.attention_mask.size()));
            return tensors;
        },
        py::arg("text"), py::arg("path"), py::arg("whole"),
        "For the tests: loads a JSON model file's text the fast way or, whole=True, the plain way\n"
        "(xvalid::JsonParse); the bytes of every tensor it decoded, in order, then of the inputs.\n"
        "Raises ModelFileError.");
    m.def("kernels", &xvalid::kernel_names, "Names of the kernels a Model can use; the first is the default.");
    m.def("set_num_threads", &xvalid::set_num_threads, py::arg("n"), "Threads for the kernel (OpenMP).");
    m.def("get_num_threads", &xvalid::get_num_threads, "Threads the kernel uses (1 without OpenMP).");
    m.def("limits", []() {
        py::dict d;
        d["max_dim"] = xvalid::kMaxDim;
        d["max_json_depth"] = xvalid::kMaxJsonDepth;
        for (const xvalid::FloatRange& r : xvalid::kFloatConfig) {
            d[r.name] = py::dict(py::arg("low") = r.low, py::arg("high") = r.high, py::arg("low_included") = r.low_included,
                                 py::arg("high_included") = r.high_included, py::arg("default") = r.fallback);
        }
        d["memory_limit_mib"] = xvalid::memory_limit_mib();
        // the rest of the format description the loader was built from (io/format_spec.h)
        namespace spec = xvalid::spec;
        d["format"] = spec::kFormatName;
        d["format_version"] = spec::kFormatVersion;
        d["max_safetensors_header_bytes"] = spec::kMaxSafetensorsHeaderBytes;
        py::dict dtypes;
        for (const spec::StorageDtype& t : spec::kStorageDtypes) {
            dtypes[t.name] = py::dict(py::arg("itemsize") = t.itemsize, py::arg("safetensors") = t.safetensors);
        }
        d["storage_dtypes"] = dtypes;
        auto names = [](const auto& list) {
            py::list out;
            for (const char* name : list) out.append(name);
            return out;
        };
        d["reserved_dtypes"] = names(spec::kReservedDtypes);
        d["required_sections"] = names(spec::kRequiredSections);
        d["required_config"] = names(spec::kRequiredConfig);
        return d;
    }, "The loader's limits and format description (docs/model-format.md): max_dim, max_json_depth,\n"
       "the float config ranges, memory_limit_mib (XVALID_MEMORY_LIMIT_MB, else half the machine's\n"
       "memory), format, format_version, storage_dtypes, reserved_dtypes, required sections and config.");
    m.def("build_info", []() {
        py::dict d;
        d["compiler"] = XVALID_COMPILER;
        d["build_type"] = XVALID_BUILD_TYPE;
        d["openmp"] = xvalid::openmp_enabled();
        d["fast_kernel_isa"] = xvalid::fast_kernel_isa();
        return d;
    }, "How this module was built: compiler, build_type, openmp, and the fast kernel's instruction set.");
}
