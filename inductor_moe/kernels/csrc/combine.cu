// Weighted top-k combine: out[t] = sum_j live(t, j) * w[t, j] * expert_out[row(t, j)], fp32 accumulation,
// output in expert_out's dtype. One templated body; kernels/jit.py compiles one variant per (output dtype,
// weight dtype, filter, row source, renormalisation, dead pairs' weighing, vector width) from -DIM_DTYPE/
// -DIM_WDTYPE/-DIM_FILTER/-DIM_ROWS/-DIM_RENORM/-DIM_ZERO_DEAD/-DIM_VEC.
//
// Grid: x = tokens, y = column chunks; each thread owns one VEC-wide pack of a token's output row and keeps
// its VEC partial sums in registers across all k. A token's k (row, weight) pairs are staged in shared
// memory, 64 at a time, so the inner loop issues only the expert_out loads, up to eight at a time.
#include "combine_params.h"
#include "common.cuh"

namespace inductor_moe {

constexpr int kStage = 64;

template <int WDTYPE>
__device__ __forceinline__ float load_weight(const void* weights, long long offset) {
  return to_float<WDTYPE>(static_cast<const typename Storage<WDTYPE>::type*>(weights)[offset]);
}

// The divisor of renormalised weights: their sum over k, in fp32 pair by pair, rounded to their dtype (what
// w / w.sum(-1, keepdim=True) divides by in that dtype).
template <int WDTYPE>
__device__ __forceinline__ float weight_sum(const CombineParams& p, long long t) {
  float sum = load_weight<WDTYPE>(p.weights, t * p.w_strides[0]);
  for (int j = 1; j < p.k; ++j) sum += load_weight<WDTYPE>(p.weights, t * p.w_strides[0] + j * p.w_strides[1]);
  return to_float<WDTYPE>(from_float<WDTYPE>(sum));
}

// A pair's weight `w`; with RENORM divided by `divisor` and rounded to the weights' dtype, as the division there
// does. A compile-time switch: as a run-time one, the division sat on every T=1 launch's critical path
// (K=8, H=7168 bf16 on H100: 1.40 -> 1.64 us, half the pairs dead 2.09 -> 2.37).
template <int WDTYPE, int RENORM>
__device__ __forceinline__ float renormalized(float w, float divisor) {
  if constexpr (RENORM) {
    return to_float<WDTYPE>(from_float<WDTYPE>(w / divisor));
  } else {
    return w;
  }
}

template <int ROWS>
__device__ __forceinline__ long long source_row(const CombineParams& p, long long t, int j) {
  if constexpr (ROWS == 0) {
    return t * p.k + j;
  } else {
    return load_expert_id<ROWS>(p.src_rows, t * p.rows_strides[0] + j * p.rows_strides[1]);  // int32/int64 by code
  }
}

// acc += sum over the pairs s in [s0, s0 + G) (FULL) or [s0, min(s0 + G, n)) of w(s) * expert_out[row(s)][pack],
// where w(s) is weight_of(s), divided by `divisor` with RENORM (renormalized above; the first group, s0 = 0,
// sets it from divisor_of()). The G rows are read first (in the staged path, from shared memory: read next to
// each row load, each pair's read and load sat in a branch of their own, and every row load waited for its
// read). Then the G row loads (and weight loads, when those come from global memory) are all issued before any
// arithmetic, the divisor and the divisions included: a division between two row loads (the IEEE sequence
// branches to its slow path) waited for its weight before the next row load left, one memory latency a pair
// (H200 bf16, token-major, renormalised, T=1, K=8, H=2048: 3.08 us against 1.95). row(s) < 0 marks a dead pair, whose row is not read; with
// ZERO_DEAD (zero_dead_rows) it adds w(s) * 0, which is +0 (no change: acc starts at +0 and a sum never turns
// it into -0) unless the weight is NaN or infinite.
template <int G, bool FULL, int DTYPE, int WDTYPE, int VEC, int RENORM, int ZERO_DEAD, typename RowFn,
          typename WeightFn, typename DivisorFn>
__device__ __forceinline__ void accumulate_group(const CombineParams& p, int pack, int s0, int n, RowFn row_of,
                                                 WeightFn weight_of, DivisorFn divisor_of, float& divisor,
                                                 float (&acc)[VEC]) {
  using T = typename Storage<DTYPE>::type;
  using P = Pack<T, VEC>;
  constexpr bool weigh_dead = ZERO_DEAD != 0;
  long long row[G];
#pragma unroll
  for (int u = 0; u < G; ++u) row[u] = FULL || s0 + u < n ? row_of(s0 + u) : -1;
  P x[G];
  float w[G];
  bool read[G];
#pragma unroll
  for (int u = 0; u < G; ++u) {
    read[u] = row[u] >= 0;
    if (read[u]) {
      x[u] = reinterpret_cast<const P*>(static_cast<const T*>(p.expert_out) + row[u] * p.expert_row_stride)[pack];
    }
    // live or dead, so that no branch separates two row loads (a dead pair's weight is unused without ZERO_DEAD)
    w[u] = FULL || s0 + u < n ? weight_of(s0 + u) : 0.0f;
  }
  if (RENORM && s0 == 0) divisor = divisor_of();
#pragma unroll
  for (int u = 0; u < G; ++u) {
    if (read[u]) {  // not a weight test: a live pair of weight 0 still turns a NaN row into NaN
      const float wu = renormalized<WDTYPE, RENORM>(w[u], divisor);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += wu * to_float<DTYPE>(x[u].v[i]);
    } else if (weigh_dead && (FULL || s0 + u < n)) {
      const float wu = renormalized<WDTYPE, RENORM>(w[u], divisor);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += wu * 0.0f;
    }
  }
}

// accumulate_group over the pairs [0, n) in order. EXACT: groups of eight, then at most one each of four, two
// and one, every group unrolled with no slot predicated off. One group of eight with the slots past n
// predicated off issued all eight slots' address arithmetic and loads for K=2 as well: ~740 instructions a warp
// in the staged T=1 launch (Nsight Compute, H200, Mixtral-like decode block, 7/8 of the experts remote), whose
// busiest SM then ran 2468 cycles against 1656 for Inductor's fused gather of the same data. Not EXACT: groups
// of eight, the last one partial, a single body, for the staged 16-byte packs: there the four bodies made ptxas
// spill 128-176 bytes in 97 of those variants under the 64-register cap (with one body, 4-64 bytes in 32).
template <bool EXACT, int DTYPE, int WDTYPE, int VEC, int RENORM, int ZERO_DEAD, typename RowFn, typename WeightFn,
          typename DivisorFn>
__device__ __forceinline__ void accumulate(const CombineParams& p, int pack, int n, RowFn row_of, WeightFn weight_of,
                                           DivisorFn divisor_of, float (&acc)[VEC]) {
  float divisor = 1.0f;
  if constexpr (EXACT) {
    int s0 = 0;
    for (; s0 + 8 <= n; s0 += 8)
      accumulate_group<8, true, DTYPE, WDTYPE, VEC, RENORM, ZERO_DEAD>(p, pack, s0, n, row_of, weight_of,
                                                                       divisor_of, divisor, acc);
    if (s0 + 4 <= n) {
      accumulate_group<4, true, DTYPE, WDTYPE, VEC, RENORM, ZERO_DEAD>(p, pack, s0, n, row_of, weight_of,
                                                                       divisor_of, divisor, acc);
      s0 += 4;
    }
    if (s0 + 2 <= n) {
      accumulate_group<2, true, DTYPE, WDTYPE, VEC, RENORM, ZERO_DEAD>(p, pack, s0, n, row_of, weight_of,
                                                                       divisor_of, divisor, acc);
      s0 += 2;
    }
    if (s0 < n)
      accumulate_group<1, true, DTYPE, WDTYPE, VEC, RENORM, ZERO_DEAD>(p, pack, s0, n, row_of, weight_of,
                                                                       divisor_of, divisor, acc);
  } else {
    for (int s0 = 0; s0 < n; s0 += 8)
      accumulate_group<8, false, DTYPE, WDTYPE, VEC, RENORM, ZERO_DEAD>(p, pack, s0, n, row_of, weight_of,
                                                                        divisor_of, divisor, acc);
  }
}

// The cold end of a staging thread that found a live pair naming a row outside expert_out: find the first
// such pair of those it staged (threadIdx.x, + kStage, ...), report it and trap, which poisons the context, so
// the output, written with that pair read as dead, is never used. Checked where it was staged instead, the
// compare and its branch to the printf sat between the pair loads and the shared-memory stage of every staged
// launch (H200 bf16, the Mixtral-like grouped block with 1/8 of the experts local, T=16: 2.37 us there, 2.02
// here).
// Its arguments are scalars: a reference to the kernel's parameters would make ptxas copy them to the stack (176
// bytes) in every launch.
template <int ROWS, int FILTER>
__device__ __noinline__ void report_bad_rows(const void* topk_ids, long long ids_stride0, long long ids_stride1,
                                             long long expert_lo, long long expert_hi, const void* src_rows,
                                             long long rows_stride0, long long rows_stride1, int k,
                                             long long expert_rows, long long t) {
  for (int j = threadIdx.x; j < k; j += kStage) {
    bool live = true;
    if constexpr (FILTER != 0) {
      live = id_is_live(load_expert_id<FILTER>(topk_ids, t * ids_stride0 + j * ids_stride1), expert_lo, expert_hi);
    }
    const long long src = load_expert_id<ROWS>(src_rows, t * rows_stride0 + j * rows_stride1);
    if (live && static_cast<unsigned long long>(src) >= static_cast<unsigned long long>(expert_rows)) {
      printf("inductor_moe.moe_combine: src_rows[%lld, %d] = %lld is outside expert_out's %lld rows\n", t, j, src,
             expert_rows);
      __trap();
    }
  }
}

template <int DTYPE, int WDTYPE, int FILTER, int ROWS, int RENORM, int ZERO_DEAD, int VEC>
__device__ __forceinline__ void combine_kernel(const CombineParams& p) {
  using T = typename Storage<DTYPE>::type;
  using P = Pack<T, VEC>;
  pdl_wait();  // before the first global read (weights, ids, rows)
  if (p.early_trigger) pdl_launch_dependents();
  const long long t = blockIdx.x;
  const int pack = blockIdx.y * blockDim.x + threadIdx.x;
  const bool owns_pack = pack < p.h / VEC;
  float acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;

  bool bad = false;  // set by a staging thread whose live pair's row is outside expert_out (src_rows only)
  if constexpr (FILTER == 0 && ROWS == 0) {
    // Unfiltered and token-major: the rows are t * k + j, known without a load, so a thread reads weights
    // and rows in one round trip instead of staging's two (T=1, H=7168 bf16: 2.19 us staged).
    const auto raw_weight = [&](int j) {
      return load_weight<WDTYPE>(p.weights, t * p.w_strides[0] + j * p.w_strides[1]);
    };
    if (owns_pack) {
      if constexpr (RENORM && sizeof(P) > 8) {
        // 16-byte packs (fp32 output) hold the eight rows in twice the registers: divided after their loads,
        // the weights spilled them (36 bytes), so there the sum and the divisions come first
        const float divisor = weight_sum<WDTYPE>(p, t);
        accumulate<true, DTYPE, WDTYPE, VEC, 0, 0>(
            p, pack, p.k, [&](int j) { return t * p.k + j; },
            [&](int j) { return renormalized<WDTYPE, RENORM>(raw_weight(j), divisor); }, [] { return 1.0f; }, acc);
      } else {
        accumulate<true, DTYPE, WDTYPE, VEC, RENORM, 0>(
            p, pack, p.k, [&](int j) { return t * p.k + j; }, raw_weight, [&] { return weight_sum<WDTYPE>(p, t); },
            acc);
      }
    }
  } else {
    __shared__ float stage_weight[kStage];
    __shared__ long long stage_row[kStage];  // -1: dead pair, not read
    for (int base = 0; base < p.k; base += kStage) {
      const int n = min(kStage, p.k - base);
      if (threadIdx.x < n) {
        const int j = base + threadIdx.x;
        // The pair's id, source row and weight (and the weights' sum) are loaded together, live or not (they
        // are [T, K] arrays, in bounds for every pair): one memory latency instead of a chain of the sum, the id,
        // then row and weight (H100 bf16, as a grouped block with 7/8 remote combines, T=1, K=8, H=2048: 2.33 us
        // against 2.09). The division
        // stays here, ahead of the barrier, rather than after every thread's row loads: there its IEEE sequence
        // (and the call of its slow path) made ptxas spill the eight rows under the 64-register cap (92-196
        // bytes in the 16-byte variants that large T uses).
        bool live = true;
        if constexpr (FILTER != 0) {
          const long long id = load_expert_id<FILTER>(p.topk_ids, t * p.ids_strides[0] + j * p.ids_strides[1]);
          live = id_is_live(id, p.expert_lo, p.expert_hi);
        }
        const long long src = source_row<ROWS>(p, t, j);
        const float raw_weight = load_weight<WDTYPE>(p.weights, t * p.w_strides[0] + j * p.w_strides[1]);
        const float weight = renormalized<WDTYPE, RENORM>(raw_weight, RENORM ? weight_sum<WDTYPE>(p, t) : 1.0f);
        // a live pair must name a row of expert_out: one that does not is read as dead and reported at the end
        const bool out_of_range =
            ROWS != 0 && live && static_cast<unsigned long long>(src) >= static_cast<unsigned long long>(p.expert_rows);
        bad |= out_of_range;
        stage_row[threadIdx.x] = live && !out_of_range ? src : -1;
        // a dead pair's weight is what it multiplies its zero row by (ZERO_DEAD), else unused
        stage_weight[threadIdx.x] = live || ZERO_DEAD ? weight : 0.0f;
      }
      __syncthreads();
      if (owns_pack) {
        // exact groups but for 16-byte packs (see accumulate); the weights are divided already
        accumulate<sizeof(P) <= 8, DTYPE, WDTYPE, VEC, 0, ZERO_DEAD>(
            p, pack, n, [&](int s) { return stage_row[s]; }, [&](int s) { return stage_weight[s]; },
            [] { return 1.0f; }, acc);
      }
      __syncthreads();  // the stage is rewritten by the next round
    }
  }
  if (owns_pack) {
    P o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = from_float<DTYPE>(acc[i]);
    reinterpret_cast<P*>(static_cast<T*>(p.out) + t * p.h)[pack] = o;
  }
  if constexpr (ROWS != 0) {
    if (bad) {
      report_bad_rows<ROWS, FILTER>(p.topk_ids, p.ids_strides[0], p.ids_strides[1], p.expert_lo, p.expert_hi,
                                    p.src_rows, p.rows_strides[0], p.rows_strides[1], p.k, p.expert_rows, t);
    }
  }
  pdl_launch_dependents();  // after the last write (a no-op after the early trigger)
}

}  // namespace inductor_moe

// At most 64 registers (4 blocks of 256 threads an SM): the staged path took 69 without the cap and lost a
// quarter of its resident threads (8192x8x7168 bf16, half the pairs dead: 215 -> 247 us).
extern "C" __global__ void __launch_bounds__(256, 4) inductor_moe_kernel(const inductor_moe::CombineParams p) {
  inductor_moe::combine_kernel<IM_DTYPE, IM_WDTYPE, IM_FILTER, IM_ROWS, IM_RENORM, IM_ZERO_DEAD, IM_VEC>(p);
}
