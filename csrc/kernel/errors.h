#pragma once

#include <stdexcept>

namespace xvalid {

// A bad argument to the kernel API: a token id outside the vocabulary, a mask of the
// wrong width, a batch that does not match the KV cache, ... The message is one line
// naming the offending value; the kernel's state is unchanged.
struct InputError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

}  // namespace xvalid
