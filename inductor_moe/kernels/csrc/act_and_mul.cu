// Gated activation: out[r, :] = act(input[r, :d]) * input[r, d:], with the optional expert filter.
// One templated body; kernels/jit.py compiles one variant per (dtype, activation, filter, vector width),
// choosing them with -DIM_DTYPE/-DIM_ACT/-DIM_FILTER/-DIM_INDEX/-DIM_VEC, and the host glue launches the entry point
// inductor_moe_kernel.
//
// Block: threadIdx.x walks the columns of a row, threadIdx.y picks one of blockDim.y rows. Grid: x covers
// the rows, y splits each row into column chunks only when there are too few rows to fill the device.
// Each thread moves VEC elements of the output per step: two loads (gate, up), fp32 math, one store.
#include "act_and_mul_params.h"
#include "common.cuh"

namespace inductor_moe {

enum Activation : int { kSilu = 0, kGelu = 1, kGeluTanh = 2 };

// Same formulas as torch's CUDA kernels, in fp32, a few fp32 ulps from them at most (see the tolerances in
// tests/helpers.py): accurate erff and tanhf; for silu an approximate reciprocal, and for 16-bit inputs an
// approximate exp too.
template <int DTYPE, int ACT>
__device__ __forceinline__ float activation(float x) {
  if constexpr (ACT == kSilu) {
    // __fdividef (reciprocal + multiply, 2 ulp) instead of IEEE division, whose refinement made silu the slowest
    // activation at T=1 (H100, 1x2048 bf16: 1.63 us against gelu's 1.42). For 16-bit inputs exp is one
    // ex2.approx of -x * log2(e) (~1e-6 relative at |x| = 20, 2**-13 of a bf16 ulp), not expf's range reduction
    // (H200, 1024x2048 bf16: 4.74 -> 4.55 us); fp32 keeps expf. x -> -inf gives 0, as torch's x / (1 + exp(-x)).
    float e;
    if constexpr (DTYPE == kFloat32) {
      e = expf(-x);
    } else {
      asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(x * -1.44269504088896340736f));
    }
    return __fdividef(x, 1.0f + e);
  } else if constexpr (ACT == kGelu) {
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f));
  } else {
    const float inner = 0.79788456080286535588f * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.0f + tanhf(inner));
  }
}

template <int DTYPE, int ACT, typename P>
__device__ __forceinline__ P act_and_mul_pack(const P& gate, const P& up) {
  P out;
#pragma unroll
  for (int i = 0; i < sizeof(P::v) / sizeof(P::v[0]); ++i) {
    out.v[i] = from_float<DTYPE>(activation<DTYPE, ACT>(to_float<DTYPE>(gate.v[i])) * to_float<DTYPE>(up.v[i]));
  }
  return out;
}

// Where `row`'s expert id is in expert_ids: row / step, or index[row / step] through the index (INDEX: 0 none,
// 1 int32, 2 int64), which must lie in [0, num_ids).
template <int INDEX>
__device__ __forceinline__ long long act_id_slot(const ActAndMulParams& p, long long row) {
  const long long slot = step_slot(row, p.expert_step);
  if constexpr (INDEX == 0) {
    return slot;
  } else {
    const long long at = load_expert_id<INDEX>(p.expert_ids_index, slot);
    if (at < 0 || at >= p.num_ids) {
      printf("inductor_moe.act_and_mul: expert_ids_index[%lld] = %lld is outside expert_ids' %lld entries\n", slot, at,
             p.num_ids);
      __trap();
    }
    return at;
  }
}

template <int DTYPE, int ACT, int FILTER, int INDEX, int VEC>
__device__ __forceinline__ void act_and_mul_kernel(const ActAndMulParams& p) {
  using T = typename Storage<DTYPE>::type;
  using P = Pack<T, VEC>;
  pdl_wait();  // before the first global read, the expert id (and its index) included

  const long long row = static_cast<long long>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= p.rows) return;
  // the row's expert id is at expert_ids[slot] (found through the index first, if there is one: its bounds
  // check comes before anything else is live, so its printf spills nothing)
  long long slot = 0;
  if constexpr (FILTER != 0) slot = act_id_slot<INDEX>(p, row);
  const T* row_in = static_cast<const T*>(p.input) + row * p.in_row_stride;
  const P* gate = reinterpret_cast<const P*>(row_in);
  const P* up = reinterpret_cast<const P*>(row_in + p.d);
  P* out = reinterpret_cast<P*>(static_cast<T*>(p.out) + row * p.out_row_stride);
  const int packs = p.d / VEC;
  const int step = gridDim.y * blockDim.x;
  int j = blockIdx.y * blockDim.x + threadIdx.x;
  // Reading ahead (small inputs, see the host): a thread's first pack is loaded before its row's expert id is
  // known, so the id and the data arrive together instead of one after the other. A dead row's pack is then
  // read for nothing, which costs no time while the launch waits on latency.
  P g, u;
  const bool ahead = FILTER != 0 && p.read_ahead && j < packs;
  if (ahead) {
    g = gate[j];
    u = up[j];
  }
  bool live = true;
  if constexpr (FILTER != 0) live = id_is_live(load_expert_id<FILTER>(p.expert_ids, slot), p.expert_lo, p.expert_hi);
  if (!live && !p.zero_dead) return;  // untouched mode; an exiting thread counts as having triggered
  if (!live) {                        // zero mode: write zeros, read nothing more
    P zero;
#pragma unroll
    for (int i = 0; i < VEC; ++i) zero.v[i] = from_float<DTYPE>(0.0f);
    for (; j < packs; j += step) out[j] = zero;
    return;
  }
  // One pack per iteration, its two loads tied together (tie() in common.cuh): a loop of two packs saw ptxas
  // issue each load behind the previous one's math under the 32-register cap (H100, 8192x768 bf16: 13.02 us
  // against 12.09 this way).
  if (ahead) {
    tie(g, u);
    out[j] = act_and_mul_pack<DTYPE, ACT>(g, u);
    j += step;
  }
  for (; j < packs; j += step) {
    g = gate[j];
    u = up[j];
    tie(g, u);
    out[j] = act_and_mul_pack<DTYPE, ACT>(g, u);
  }
  // Trigger after the last write. Triggering right after the wait was slower on H100 (64x14336 bf16 in a
  // CUDA graph: 3.04 us vs 2.54 us): the next grid's blocks then sit resident while this one still streams.
  pdl_launch_dependents();
}

}  // namespace inductor_moe

// 256 threads x 8 blocks fill an SM's 2048 threads, which caps registers at 32 a thread; unfiltered silu keeps 6
// blocks (act_and_mul_params.h). Without a cap gelu (erff) took 42 and ran at 5/8 occupancy: 8192x2048 bf16
// 37.95 us against Inductor's 35.08 us (H100). sm_100's ptxas spills at the 32-register cap (8 bytes in 6
// variants), so there the compiler chooses; not measured on such a device.
#if __CUDA_ARCH__ >= 1000
#define IM_MIN_BLOCKS_PER_SM 1
#else
#define IM_MIN_BLOCKS_PER_SM inductor_moe::act_and_mul_blocks_per_sm(IM_ACT, IM_FILTER)
#endif
extern "C" __global__ void __launch_bounds__(256, IM_MIN_BLOCKS_PER_SM)
    inductor_moe_kernel(const inductor_moe::ActAndMulParams p) {
  inductor_moe::act_and_mul_kernel<IM_DTYPE, IM_ACT, IM_FILTER, IM_INDEX, IM_VEC>(p);
}
