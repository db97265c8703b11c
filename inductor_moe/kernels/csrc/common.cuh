// Device helpers shared by every inductor_moe kernel. Compiled by NVRTC (kernels/jit.py), so no CUDA
// headers are included: half/bfloat16 conversions are single PTX instructions and storage is raw bits,
// which keeps a cold compile at a fraction of a second (cuda_bf16.h alone costs more to parse).
#pragma once

namespace inductor_moe {

// Element types by the code the host passes in (-DIM_DTYPE=...): see dtype_code in host_common.h.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

template <int DTYPE>
struct Storage {
  using type = unsigned short;
};
template <>
struct Storage<kFloat32> {
  using type = float;
};

template <int DTYPE>
__device__ __forceinline__ float to_float(typename Storage<DTYPE>::type v) {
  if constexpr (DTYPE == kFloat32) {
    return v;
  } else if constexpr (DTYPE == kBFloat16) {
    return __uint_as_float(static_cast<unsigned int>(v) << 16);
  } else {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
  }
}

// Round to nearest even, as torch's .to(dtype) does.
template <int DTYPE>
__device__ __forceinline__ typename Storage<DTYPE>::type from_float(float f) {
  if constexpr (DTYPE == kFloat32) {
    return f;
  } else if constexpr (DTYPE == kBFloat16) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
  } else {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
  }
}

// VEC elements moved as one access: 16 bytes when the host found every address aligned, else 1 element.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Makes every word of `a` depend on the first word of `b` without changing it (prmt with selector 0x3210
// returns its first operand). Called right after loading a pair of packs, it keeps ptxas from delaying the
// second load past the math on the first to save registers: under act_and_mul's 32-register cap it did that
// for the bf16 variants (sm_90a, NVRTC 13.0), two memory latencies a pack instead of one. The prmt is folded
// away after scheduling; the order stays (tests/test_jit.py checks the SASS).
template <typename P>
__device__ __forceinline__ void tie(P& a, const P& b) {
  if constexpr (sizeof(P) >= 4) {
    unsigned int* aw = reinterpret_cast<unsigned int*>(&a);
    const unsigned int bw = *reinterpret_cast<const unsigned int*>(&b);
#pragma unroll
    for (int i = 0; i < sizeof(P) / 4; ++i) asm("prmt.b32 %0, %0, %1, 0x3210;" : "+r"(aw[i]) : "r"(bw));
  }
}

// Programmatic dependent launch (sm90+). wait: block until the previous grid in the stream has finished and
// its writes are visible; it must come before the first global read. launch_dependents: let the next grid
// start its prologue. Both are no-ops when the kernel was not launched with programmatic serialization.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// row / step, skipping the division when step is 1 (ids per row): a 64-bit division is a software routine
// (a few dozen instructions even on its 32-bit fast path), on the way to every filtered row's first load.
__device__ __forceinline__ long long step_slot(long long row, long long step) { return step == 1 ? row : row / step; }

// Element `offset` of an int32 (CODE 1) or int64 (CODE 2) array, widened: expert ids, the index into them and
// the combine's source rows are all coded so (index_code in host_common.h).
template <int CODE>
__device__ __forceinline__ long long load_expert_id(const void* expert_ids, long long offset) {
  return CODE == 1 ? static_cast<long long>(static_cast<const int*>(expert_ids)[offset])
                   : static_cast<const long long*>(expert_ids)[offset];
}

// The expert filter (docs/design.md): an id is live iff it lies in [lo, hi), a range that wraps around when lo > hi
// (live iff id >= lo or id < hi; that is how the lowerings express `id != c`). One unsigned compare of the
// differences mod 2^64 covers both cases.
__device__ __forceinline__ bool id_is_live(long long id, long long lo, long long hi) {
  return static_cast<unsigned long long>(id) - static_cast<unsigned long long>(lo) <
         static_cast<unsigned long long>(hi) - static_cast<unsigned long long>(lo);
}

}  // namespace inductor_moe
