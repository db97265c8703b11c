// Small helpers shared by the ops' host code (<family>.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_ops.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

namespace inductor_moe {

constexpr int64_t kMaxIndex = 2147483647;  // 2**31 - 1: grid.x and 32-bit column offsets

// The element-type code the kernels take (-DIM_DTYPE, see common.cuh), or -1 if there is no kernel for it.
inline int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return 0;
    case at::kHalf:
      return 1;
    case at::kBFloat16:
      return 2;
    default:
      return -1;
  }
}

// Index tensors (expert ids, row indices): 1 for int32, 2 for int64, 0 for anything else.
inline int index_code(at::ScalarType t) { return t == at::kInt ? 1 : t == at::kLong ? 2 : 0; }

// Elements moved per access: `wanted` (at most 16 bytes' worth) when every extent (row length, row strides,
// in elements) is a multiple of it and every pointer aligned to its bytes, else one element.
inline int vector_width(int64_t element_size, int64_t wanted, std::initializer_list<int64_t> extents,
                        std::initializer_list<const void*> pointers) {
  const int64_t vec = std::min<int64_t>(wanted, 16 / element_size);
  for (int64_t e : extents) {
    if (e % vec != 0) return 1;
  }
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % (vec * element_size) != 0) return 1;
  }
  return static_cast<int>(vec);
}

// An uninitialised contiguous tensor of `like`'s dtype on its (CUDA) device: aten::empty's CUDA kernel called
// directly. Tensor::new_empty dispatches twice (new_empty, then empty) to get there, ~0.4 us of an eager call's
// ~7 on an H200 VM; the CUDA kernel is still torch's, so the allocator in use
// (torch.cuda.memory.change_current_allocator) and the deterministic fill of uninitialised memory apply.
inline at::Tensor empty_cuda_like(const at::Tensor& like, c10::IntArrayRef shape) {
  return at::_ops::empty_memory_format::redispatch(c10::DispatchKeySet(c10::DispatchKey::CUDA),
                                                   c10::fromIntArrayRefSlow(shape), like.scalar_type(), at::kStrided,
                                                   like.device(), std::nullopt, std::nullopt);
}

}  // namespace inductor_moe
