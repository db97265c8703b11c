// Weighted top-k combine: out[t] = sum_j live(t, j) * w[t, j] * expert_out[row(t, j)], fp32 accumulation,
// output in expert_out's dtype. One templated body; kernels/jit.py compiles one variant per (output dtype,
// weight dtype, filter, row source, renormalisation, dead pairs' weighing, vector width) from -DIM_DTYPE/
// -DIM_WDTYPE/-DIM_FILTER/-DIM_ROWS/-DIM_RENORM/-DIM_ZERO_DEAD/-DIM_VEC.
//
// Grid: x = tokens, y = column chunks; each thread owns one VEC-wide pack of a token's output row and keeps
// its VEC partial sums in registers across all k. A token's k (row, weight) pairs are staged in shared
// memory, 64 at a time, so the inner loop issues only the expert_out loads, eight at a time.
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
    const long long offset = t * p.rows_strides[0] + j * p.rows_strides[1];
    return ROWS == 1 ? static_cast<long long>(static_cast<const int*>(p.src_rows)[offset])
                     : static_cast<const long long*>(p.src_rows)[offset];
  }
}

// acc += sum over pairs s in [0, n) of w(s) * expert_out[row(s)][pack], eight pairs at a time, where w(s) is
// weight_of(s), divided by divisor_of() with RENORM (renormalized above). The eight row loads (and weight loads,
// when those come from global memory) are all issued before any arithmetic, the divisor and the divisions
// included: a division between two row loads (the IEEE sequence branches to its slow path) waited for its
// weight before the next row load left, one memory latency a pair. H200, token-major, renormalised, bf16 in a
// CUDA graph: T=1, K=2, H=4096 1.78 -> 1.49 us (1.20 without renormalising); K=8, H=2048 3.08 -> 1.95; T=16,
// K=2 2.33 -> 2.11. row(s) < 0 marks a dead pair, whose row is not read; with ZERO_DEAD (zero_dead_rows) it
// adds w(s) * 0, which is +0 (no change: acc starts at +0 and a sum never turns it into -0) unless the weight is
// NaN or infinite.
template <int DTYPE, int WDTYPE, int VEC, int RENORM, int ZERO_DEAD, typename RowFn, typename WeightFn,
          typename DivisorFn>
__device__ __forceinline__ void accumulate(const CombineParams& p, int pack, int n, RowFn row_of, WeightFn weight_of,
                                           DivisorFn divisor_of, float (&acc)[VEC]) {
  using T = typename Storage<DTYPE>::type;
  using P = Pack<T, VEC>;
  constexpr bool weigh_dead = ZERO_DEAD != 0;
  float divisor = 1.0f;
  for (int s0 = 0; s0 < n; s0 += 8) {
    P x[8];
    float w[8];
    bool read[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const long long row = s0 + u < n ? row_of(s0 + u) : -1;
      read[u] = row >= 0;
      if (read[u]) {
        x[u] = reinterpret_cast<const P*>(static_cast<const T*>(p.expert_out) + row * p.expert_row_stride)[pack];
        w[u] = weight_of(s0 + u);
      } else if (weigh_dead && s0 + u < n) {
        w[u] = weight_of(s0 + u);
      }
    }
    if (RENORM && s0 == 0) divisor = divisor_of();
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      if (read[u]) {  // not a weight test: a live pair of weight 0 still turns a NaN row into NaN
        const float wu = renormalized<WDTYPE, RENORM>(w[u], divisor);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += wu * to_float<DTYPE>(x[u].v[i]);
      } else if (weigh_dead && s0 + u < n) {
        const float wu = renormalized<WDTYPE, RENORM>(w[u], divisor);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += wu * 0.0f;
      }
    }
  }
}

template <int DTYPE, int WDTYPE, int FILTER, int ROWS, int RENORM, int ZERO_DEAD, int VEC>
__device__ __forceinline__ void combine_kernel(const CombineParams& p) {
  using T = typename Storage<DTYPE>::type;
  using P = Pack<T, VEC>;
  pdl_wait();  // before the first global read (weights, ids, rows)
  const long long t = blockIdx.x;
  const int pack = blockIdx.y * blockDim.x + threadIdx.x;
  const bool owns_pack = pack < p.h / VEC;
  float acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;

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
        accumulate<DTYPE, WDTYPE, VEC, 0, 0>(
            p, pack, p.k, [&](int j) { return t * p.k + j; },
            [&](int j) { return renormalized<WDTYPE, RENORM>(raw_weight(j), divisor); }, [] { return 1.0f; }, acc);
      } else {
        accumulate<DTYPE, WDTYPE, VEC, RENORM, 0>(
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
        // then row and weight. H100, gathered, filtered and renormalised as a grouped MoE block combines
        // (bf16, 7/8 of the experts remote): T=1, K=8, H=2048 2.33 -> 2.09 us, T=16 2.54 -> 2.29. The division
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
        if (live && (src < 0 || src >= p.expert_rows)) {  // a live pair must name a row of expert_out
          printf("inductor_moe.moe_combine: src_rows[%lld, %d] = %lld is outside expert_out's %lld rows\n", t, j, src,
                 p.expert_rows);
          __trap();
        }
        stage_row[threadIdx.x] = live ? src : -1;
        // a dead pair's weight is what it multiplies its zero row by (ZERO_DEAD), else unused
        stage_weight[threadIdx.x] = live || ZERO_DEAD ? weight : 0.0f;
      }
      __syncthreads();
      if (owns_pack) {
        // Eight pairs at a time, read from shared memory into registers before accumulate sees them: read
        // there, each pair's row and weight sat in a branch of its own, and every row load waited for its
        // shared-memory read before the next pair's left (one branch a pair in the SASS). H200, bf16 in a
        // CUDA graph: K=8, H=7168, half the pairs dead, T=64 2.72 -> 2.67 us, T=1024 24.5 -> 23.6, T=8192
        // 183.7 -> 179.4; as a grouped block calls it (gathered, sentinel ids, 7/8 remote) Mixtral-like T=1
        // 1.58 -> 1.49, Qwen3-like T=1 1.76 -> 1.67, all experts T=16 2.12 -> 1.96. (The same three passes
        // inside accumulate cost the token-major path 13-20%: ptxas then issued the eight weight loads first.)
        for (int s0 = 0; s0 < n; s0 += 8) {
          long long row[8];
          float weight[8];
#pragma unroll
          for (int u = 0; u < 8; ++u) {
            row[u] = s0 + u < n ? stage_row[s0 + u] : -1;
            weight[u] = s0 + u < n ? stage_weight[s0 + u] : 0.0f;
          }
          accumulate<DTYPE, WDTYPE, VEC, 0, ZERO_DEAD>(
              p, pack, min(8, n - s0), [&](int u) { return row[u]; }, [&](int u) { return weight[u]; },
              [] { return 1.0f; }, acc);
        }
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
  pdl_launch_dependents();  // after the last write
}

}  // namespace inductor_moe

// At most 64 registers (4 blocks of 256 threads an SM): the staged path took 69 without the cap and lost a
// quarter of its resident threads (8192x8x7168 bf16, half the pairs dead: 215 -> 247 us).
extern "C" __global__ void __launch_bounds__(256, 4) inductor_moe_kernel(const inductor_moe::CombineParams p) {
  inductor_moe::combine_kernel<IM_DTYPE, IM_WDTYPE, IM_FILTER, IM_ROWS, IM_RENORM, IM_ZERO_DEAD, IM_VEC>(p);
}
