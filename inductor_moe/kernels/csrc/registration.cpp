// Registers the CUDA implementations with the dispatcher; the schemas are defined in inductor_moe/ops, the list
// of ops comes from kernels/families.py (families.h).
//
// Why C++ and not a Python custom op: a call dispatched to a C++ kernel costs ~7.5 us of host time on an H100
// VM, a Python custom op around the same launch ~52 us. torch/library.h alone takes ~6 s of g++ time, so it is
// kept in this file only and the other files compile beside it in parallel (kernels/jit.py).
#include <torch/library.h>

#include "families.h"
#include "ops.h"

TORCH_LIBRARY_IMPL(inductor_moe, CUDA, m) {
#define INDUCTOR_MOE_REGISTER(op) m.impl(#op, &inductor_moe::op##_cuda);
  INDUCTOR_MOE_CUDA_OPS(INDUCTOR_MOE_REGISTER)
#undef INDUCTOR_MOE_REGISTER
}
