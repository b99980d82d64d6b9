#include "profile.h"

namespace xvalid {

const char* op_name(Op op) {
    static const char* const names[] = {"embedding", "rmsnorm", "q_proj", "k_proj", "v_proj", "rope",
                                        "attention", "o_proj", "gate_up_swiglu", "down_proj", "head"};
    static_assert(sizeof(names) / sizeof(names[0]) == (std::size_t)Op::count, "one name per Op");
    return names[(int)op];
}

}  // namespace xvalid
