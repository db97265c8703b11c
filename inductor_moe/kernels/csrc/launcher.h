// Loading and launching NVRTC-built kernels from the host glue (launcher.cpp).
#pragma once

#include <c10/core/Device.h>

#include <cstdint>
#include <string>

namespace inductor_moe {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// Number of streaming multiprocessors of a CUDA device (cached).
int multiprocessor_count(const c10::Device& device);

// Launches entry point `inductor_moe_kernel` of variant `defines` ("NAME=VALUE;...") of csrc/<family>.cu on
// the current stream of `device`, with PDL on sm90+ (unless INDUCTOR_MOE_PDL=0). The first launch of a
// variant on a device compiles it (or reads it from the disk cache) through the Python callback. `variant`
// is the family's own integer encoding of `defines`, the key of the in-memory cache. `device` must be the
// current device (a c10::DeviceGuard in the caller).
void launch_kernel(const c10::Device& device, uint32_t family_id, const char* family, uint32_t variant,
                   const std::string& defines, Dim3 grid, Dim3 block, void** args);

}  // namespace inductor_moe
