// Loading and launching NVRTC-built kernels from the host glue (launcher.cpp).
#pragma once

#include <c10/core/Device.h>

#include <cstdint>
#include <initializer_list>

#include "families.h"  // generated from kernels/families.py by the host build (kernels/jit.py)

namespace inductor_moe {

// The kernel families, numbered as kernels/families.py lists them; csrc/<name>.cu holds each one's device code.
enum class Family : uint32_t {
#define INDUCTOR_MOE_FAMILY_ID(name) name,
  INDUCTOR_MOE_FAMILIES(INDUCTOR_MOE_FAMILY_ID)
#undef INDUCTOR_MOE_FAMILY_ID
};

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// Number of streaming multiprocessors of a CUDA device (cached).
int multiprocessor_count(const c10::Device& device);

// One compile-time switch of a kernel variant: -D`name`=`value`, with 0 <= value < 2**bits.
struct Define {
  const char* name;
  int value;
  int bits;
};

// When a launch uses PDL (programmatic dependent launch: it may start while the kernel before it finishes, and
// waits for it before its first global read). Only on sm90+, and never with INDUCTOR_MOE_PDL=0.
//
// In a CUDA graph PDL pays only after a kernel that was itself launched with it, and a kernel launched plain
// takes that gain from the next launch if that one uses PDL (H200, the grouped block's decode activation: 1.38 us
// with PDL against 2.07 plain after a PDL launch, but 1.81 against 1.59 after a plain one, a GEMM).
enum class Pdl {
  kAlways,
  // Plain when captured after a node that was not launched with PDL: for kernels whose next kernel is plain
  // anyway, as the gated activation's is (the down projection's GEMM), so the plain launch costs nothing after.
  kAfterPdlLaunches,
};

// Launches entry point `inductor_moe_kernel` of the variant `defines` of csrc/<family>.cu on the current
// stream of `device`, with PDL as `pdl` says. The defines are packed into the key of
// the in-memory kernel cache; only the first launch of a variant on a device formats them ("NAME=VALUE;...")
// and compiles it (or reads it from the disk cache) through the Python callback. `device` must be the
// current device (a c10::DeviceGuard in the caller).
void launch_kernel(const c10::Device& device, Family family, std::initializer_list<Define> defines, Dim3 grid,
                   Dim3 block, void** args, Pdl pdl);

}  // namespace inductor_moe
