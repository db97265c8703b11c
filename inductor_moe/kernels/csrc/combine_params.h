// Kernel parameters of moe_combine, one struct passed by value; shared by the device source (NVRTC) and the
// host glue (g++) so both agree on the layout.
#pragma once

namespace inductor_moe {

struct CombineParams {
  const void* expert_out;  // [expert_rows, h], row stride expert_row_stride (elements), last dim contiguous
  const void* weights;     // [tokens, k], any strides
  const void* topk_ids;    // [tokens, k] int32/int64, any strides, or null (every pair live)
  const void* src_rows;    // [tokens, k] int32/int64, any strides, or null (row of (t, j) is t * k + j)
  void* out;               // [tokens, h] contiguous
  long long tokens;
  long long expert_rows;
  long long expert_row_stride;
  long long w_strides[2];
  long long ids_strides[2];
  long long rows_strides[2];
  long long expert_lo;
  long long expert_hi;
  int k;
  int h;  // < 2**31, checked on the host
  int early_trigger;  // 1: let the next grid launch right after the wait (grids of one wave; combine.cpp)
};

}  // namespace inductor_moe
