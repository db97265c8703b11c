// Kernel parameters of act_and_mul, one struct passed by value. Included by the device source (NVRTC) and by
// the host glue (g++), so the layout the launcher writes is the layout the kernel reads.
#pragma once

namespace inductor_moe {

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
