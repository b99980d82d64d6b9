// Writes float32 arrays as .npy files (NPY format v1.0, '<f4', C order), readable with
// numpy.load.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace xvalid {

// Writes data (prod(shape) floats) to path. Atomic: the bytes go to a temporary file
// beside path ("path.tmp-PID-N") that is renamed over path only once complete, so path
// never holds a half-written array. Throws std::runtime_error naming the path.
void write_npy(const std::string& path, const float* data, const std::vector<int64_t>& shape);

}  // namespace xvalid
