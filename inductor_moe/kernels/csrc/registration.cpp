// Registers the CUDA implementations with the dispatcher; the schemas are defined in ops.py.
//
// Why C++ and not a Python custom op: a call dispatched to a C++ kernel costs ~7.5 us of host time on the
// device VM, a Python custom op around the same launch ~52 us (FACTS.md). torch/library.h alone takes ~6 s
// of g++ time, so it is kept in this file only and the other files compile beside it in parallel
// (kernels/jit.py).
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(inductor_moe, CUDA, m) {
  m.impl("act_and_mul", &inductor_moe::act_and_mul_cuda);
  m.impl("act_and_mul_out", &inductor_moe::act_and_mul_out_cuda);
  m.impl("moe_combine", &inductor_moe::moe_combine_cuda);
}
