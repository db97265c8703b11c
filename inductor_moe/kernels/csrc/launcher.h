// Loading and launching NVRTC-built kernels from the host glue (launcher.cpp).
#pragma once

#include <c10/core/Device.h>

#include <cstdint>
#include <initializer_list>

namespace inductor_moe {

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

// Launches entry point `inductor_moe_kernel` of the variant `defines` of csrc/<family>.cu on the current
// stream of `device`, with PDL on sm90+ (unless INDUCTOR_MOE_PDL=0). The defines are packed into the key of
// the in-memory kernel cache; only the first launch of a variant on a device formats them ("NAME=VALUE;...")
// and compiles it (or reads it from the disk cache) through the Python callback. `device` must be the
// current device (a c10::DeviceGuard in the caller).
void launch_kernel(const c10::Device& device, uint32_t family_id, const char* family,
                   std::initializer_list<Define> defines, Dim3 grid, Dim3 block, void** args);

}  // namespace inductor_moe
