// CUDA implementation of inductor_moe::moe_combine: argument checks, variant and launch configuration; the
// kernel is csrc/combine.cu. Each check mirrors one in ops.py (fake and CPU implementations), same message.
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <string>

#include "combine_params.h"
#include "host_common.h"
#include "launcher.h"
#include "message.h"
#include "ops.h"

namespace inductor_moe {
namespace {

constexpr uint32_t kCombineFamily = 1;

// An optional [tokens, k] index tensor: its variant code (0 absent, 1 int32, 2 int64) after the checks.
int check_pairs(const char* name, const std::optional<at::Tensor>& t, const at::Tensor& weights) {
  if (!t.has_value()) return 0;
  TORCH_CHECK(index_code(t->scalar_type()) != 0,
              cat("inductor_moe.moe_combine: ", name, " must be int32 or int64, got ", t->scalar_type()));
  TORCH_CHECK(t->device() == weights.device(),
              cat("inductor_moe.moe_combine: ", name, " must be on ", weights.device(), ", got ", t->device()));
  TORCH_CHECK(t->sizes() == weights.sizes(), cat("inductor_moe.moe_combine: ", name, " must have topk_weights' shape ",
                                                 weights.sizes(), ", got ", t->sizes()));
  return index_code(t->scalar_type());
}

}  // namespace

at::Tensor moe_combine_cuda(const at::Tensor& expert_out, const at::Tensor& topk_weights,
                            const std::optional<at::Tensor>& topk_ids, int64_t expert_lo, int64_t expert_hi,
                            const std::optional<at::Tensor>& src_rows, bool zero_dead_rows, bool renormalize) {
  TORCH_CHECK(expert_out.dim() == 2,
              cat("inductor_moe.moe_combine: expert_out must be 2-D [rows, hidden], got shape ", expert_out.sizes()));
  TORCH_CHECK(dtype_code(expert_out.scalar_type()) >= 0,
              cat("inductor_moe.moe_combine: expert_out dtype must be float16, bfloat16 or float32, got ",
                  expert_out.scalar_type()));
  TORCH_CHECK(
      expert_out.size(1) <= 1 || expert_out.stride(1) == 1,
      cat("inductor_moe.moe_combine: expert_out must have a contiguous last dim; got strides ", expert_out.strides()));
  TORCH_CHECK(topk_weights.dim() == 2,
              cat("inductor_moe.moe_combine: topk_weights must be 2-D [tokens, k], got shape ", topk_weights.sizes()));
  TORCH_CHECK(dtype_code(topk_weights.scalar_type()) >= 0,
              cat("inductor_moe.moe_combine: topk_weights dtype must be float16, bfloat16 or float32, got ",
                  topk_weights.scalar_type()));
  TORCH_CHECK(topk_weights.device() == expert_out.device(), cat("inductor_moe.moe_combine: topk_weights must be on ",
                                                                expert_out.device(), ", got ", topk_weights.device()));
  const int filter = check_pairs("topk_ids", topk_ids, topk_weights);
  const int rows_code = check_pairs("src_rows", src_rows, topk_weights);
  const int64_t tokens = topk_weights.size(0);
  const int64_t k = topk_weights.size(1);
  const int64_t h = expert_out.size(1);
  TORCH_CHECK(rows_code != 0 || expert_out.size(0) == tokens * k,
              cat("inductor_moe.moe_combine: without src_rows, expert_out must have tokens * k = ", tokens * k,
                  " rows (token-major), got ", expert_out.size(0)));
  TORCH_CHECK(
      h <= kMaxIndex && tokens <= kMaxIndex && k <= kMaxIndex,
      cat("inductor_moe.moe_combine: hidden size, tokens and k must be below 2**31, got ", h, ", ", tokens, ", ", k));

  at::Tensor out = empty_cuda_like(expert_out, {tokens, h});
  if (tokens == 0 || h == 0) return out;
  if (k == 0) return out.zero_();

  const int dtype = dtype_code(expert_out.scalar_type());
  const int wdtype = dtype_code(topk_weights.scalar_type());
  // Elements a thread accumulates per access: 4 (8-byte accesses for 16-bit types) unless the kernel stages
  // pairs and has enough work to fill the GPU, then 8. Four shortens each thread's chain of loads and FMAs,
  // which is what a latency-bound launch waits for. H100, K=8, H=7168 bf16, CUDA graph, 8 -> 4 elements:
  // unfiltered token-major T=1 1.55 -> 1.39 us, T=64 4.40 -> 4.26, T=8192 348.7 -> 349.5; half the pairs
  // dead T=1 2.51 -> 2.04, T=16 2.62 -> 2.53, but T=64 3.18 -> 3.64 and T=8192 237 -> 304 (each staged pair
  // is then loaded by twice the threads), so the staged paths keep 8 from 256 threads' worth an SM.
  const int64_t sms = multiprocessor_count(expert_out.device());
  const bool staged = filter != 0 || rows_code != 0;
  const int64_t packs8 = (h + 7) / 8;
  const int64_t elements = staged && tokens * packs8 >= sms * 256 ? 8 : 4;
  const int vec = vector_width(expert_out.element_size(), elements, {h, expert_out.stride(0)},
                               {expert_out.data_ptr(), out.data_ptr()});
  c10::DeviceGuard guard(expert_out.device());

  // One thread per output pack, up to 256 a block; at least 64 when the kernel stages (row, weight) pairs
  // 64 at a time in shared memory (filter or src_rows), else 32. Few tokens get smaller blocks, so the work
  // spreads over more SMs: at T=1, H=7168 bf16 (896 packs) four 256-thread blocks left 128 of 132 SMs idle.
  const int64_t min_threads = staged ? 64 : 32;
  const int64_t packs = h / vec;
  const int64_t wanted = 2 * sms;
  int64_t threads = 256;
  while (threads > min_threads && tokens * ((packs + threads - 1) / threads) < wanted) threads /= 2;
  threads = std::min<int64_t>(threads, std::max<int64_t>(min_threads, (packs + 31) / 32 * 32));
  const int64_t chunks = (packs + threads - 1) / threads;
  TORCH_CHECK(chunks <= 65535, cat("inductor_moe.moe_combine: hidden size ", h, " is too large"));

  CombineParams p;
  p.expert_out = expert_out.data_ptr();
  p.weights = topk_weights.data_ptr();
  p.topk_ids = topk_ids.has_value() ? topk_ids->data_ptr() : nullptr;
  p.src_rows = src_rows.has_value() ? src_rows->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.tokens = tokens;
  p.expert_rows = expert_out.size(0);
  p.expert_row_stride = expert_out.stride(0);
  p.w_strides[0] = topk_weights.stride(0);
  p.w_strides[1] = topk_weights.stride(1);
  p.ids_strides[0] = topk_ids.has_value() ? topk_ids->stride(0) : 0;
  p.ids_strides[1] = topk_ids.has_value() ? topk_ids->stride(1) : 0;
  p.rows_strides[0] = src_rows.has_value() ? src_rows->stride(0) : 0;
  p.rows_strides[1] = src_rows.has_value() ? src_rows->stride(1) : 0;
  p.expert_lo = expert_lo;
  p.expert_hi = expert_hi;
  p.k = static_cast<int>(k);
  p.h = static_cast<int>(h);
  void* args[] = {&p};
  launch_kernel(expert_out.device(), kCombineFamily, "combine",
                {{"IM_DTYPE", dtype, 2},
                 {"IM_WDTYPE", wdtype, 2},
                 {"IM_FILTER", filter, 2},
                 {"IM_ROWS", rows_code, 2},
                 {"IM_RENORM", renormalize ? 1 : 0, 1},
                 {"IM_ZERO_DEAD", zero_dead_rows && filter != 0 ? 1 : 0, 1},
                 {"IM_VEC", vec, 4}},
                Dim3{static_cast<unsigned>(tokens), static_cast<unsigned>(chunks)},
                Dim3{static_cast<unsigned>(threads)}, args);
  return out;
}

}  // namespace inductor_moe
