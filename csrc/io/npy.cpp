#include "npy.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "write_npy declares '<f4' (little-endian) and writes floats as they are in memory"
#endif

namespace xvalid {

// The NPY v1.0 preamble: magic, version, header length, then a Python dict literal
// padded with spaces and a newline so that the data starts at a multiple of 64 bytes.
static std::string npy_header(const std::vector<int64_t>& shape) {
    std::string dims;
    for (int64_t d : shape) dims += std::to_string(d) + ", ";
    if (shape.size() > 1) dims.erase(dims.size() - 2);  // "(2, 5)"; a 1-D shape keeps "(5,)"
    else if (shape.size() == 1) dims.pop_back();
    std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
    const size_t preamble = 10;  // magic (6) + version (2) + header length (2)
    size_t total = (preamble + dict.size() + 1 + 63) / 64 * 64;
    dict.append(total - preamble - dict.size() - 1, ' ');
    dict += '\n';
    uint16_t len = (uint16_t)dict.size();
    std::string header("\x93NUMPY\x01\x00", 8);
    header += (char)(len & 0xff);
    header += (char)(len >> 8);
    return header + dict;
}

// Writes all n bytes, retrying short writes; false with errno set on failure.
static bool write_all(int fd, const void* data, size_t n) {
    const char* bytes = static_cast<const char*>(data);
    while (n > 0) {
        ssize_t written = ::write(fd, bytes, n);
        if (written < 0 && errno == EINTR) continue;
        if (written < 0) return false;
        bytes += written;
        n -= (size_t)written;
    }
    return true;
}

void write_npy(const std::string& path, const float* data, const std::vector<int64_t>& shape) {
    static std::atomic<unsigned> counter{0};
    std::string tmp = path + ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(counter++);
    auto fail = [&](int err) {
        ::unlink(tmp.c_str());
        throw std::runtime_error("cannot write " + path + ": " + std::strerror(err));
    };
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0) fail(errno);
    size_t numel = 1;
    for (int64_t d : shape) numel *= (size_t)d;
    std::string header = npy_header(shape);
    if (!write_all(fd, header.data(), header.size()) || !write_all(fd, data, numel * sizeof(float))) {
        int err = errno;
        ::close(fd);
        fail(err);
    }
    if (::close(fd) != 0) fail(errno);
    if (std::rename(tmp.c_str(), path.c_str()) != 0) fail(errno);
}

}  // namespace xvalid
