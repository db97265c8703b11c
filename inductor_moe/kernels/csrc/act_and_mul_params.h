// Kernel parameters of act_and_mul, one struct passed by value. Included by the device source (NVRTC) and by
// the host glue (g++), so the layout the launcher writes is the layout the kernel reads.
#pragma once

namespace inductor_moe {

// Blocks of 256 threads an SM that the sm_90 kernel is built to keep resident (its __launch_bounds__), which caps
// its registers at 65536 / (blocks * 256), rounded down to 8: 8 blocks (a full SM, 32 registers) for every
// variant but unfiltered silu, which gets 6 (40; it uses 37). 40 registers help unfiltered silu only (H200 bf16,
// 1024x2048: 4.82 -> 4.55 us) and cost the others (gelu_tanh 8192x2048: 26.1 -> 27.3).
constexpr int kActAndMulBlocksPerSm = 8;
constexpr int kUnfilteredSiluBlocksPerSm = 6;

#if defined(__CUDACC_RTC__)
#define IM_HOST_DEVICE __host__ __device__  // NVRTC compiles no host-only function
#else
#define IM_HOST_DEVICE
#endif

// The blocks an SM keeps resident for activation `act` (0 silu) with filter code `filter` (0 none).
IM_HOST_DEVICE constexpr int act_and_mul_blocks_per_sm(int act, int filter) {
  return act == 0 && filter == 0 ? kUnfilteredSiluBlocksPerSm : kActAndMulBlocksPerSm;
}

struct ActAndMulParams {
  const void* input;             // [rows, 2d] with row stride in_row_stride (elements), last dim contiguous
  void* out;                     // [rows, d] with row stride out_row_stride
  const void* expert_ids;        // int32 or int64 [ceil(rows / expert_step)] (or [num_ids], through the index), or null
  const void* expert_ids_index;  // int32 or int64 [ceil(rows / expert_step)] into expert_ids, or null
  long long num_ids;             // expert_ids' length: the index's bound
  long long rows;
  long long in_row_stride;
  long long out_row_stride;
  long long expert_step;
  long long expert_lo;
  long long expert_hi;
  int d;           // output columns; 2d < 2**31 is checked on the host, so column offsets fit 32 bits
  int zero_dead;   // 1: dead rows are written with zeros (act_and_mul); 0: left untouched (act_and_mul_out)
  int read_ahead;  // 1: load a thread's first pack before its row's expert id (filtered kernels only)
};

}  // namespace inductor_moe
