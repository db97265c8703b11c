// CUDA implementation of inductor_moe::moe_combine: argument checks, variant and launch configuration; the
// kernel is csrc/combine.cu. Each check mirrors one in ops.py (fake and CPU implementations), same message.
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>
#include <string>

#include "combine_params.h"
#include "host_common.h"
#include "launcher.h"
#include "message.h"
#include "ops.h"

namespace inductor_moe {
namespace {

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

// Threads a block, one an output pack of a token's row: 128 to 256 (at least 64 either way: the staged path loads
// a round's 64 pairs one a thread).
// - Staged pairs: 256 once 256-thread blocks give every SM one, else 128. Blocks of 128 beat smaller ones
//   (more, on more SMs) at every decode size measured (H200, gathered Mixtral-like T=1: 1.54 us against 1.58
//   with 32); the token-major rule below lost 1-1.7% here, where it picks 256 over 128 with fewer blocks than SMs.
// - Token-major, past two waves' worth of 256-thread blocks: 256. The launch streams, and the most resident
//   threads win (224, whose chunks fit 896 packs exactly, lost 1.5-4% at T=128-256, K=8, H=7168).
// - Token-major, below that: the grid is one wave, and a launch takes its busiest SM's loads plus a cost a
//   block (its dispatch; ~1.5 ns a block: K=2, H=4096 T=16 took 1.31 / 1.26 / 1.25 / 1.21 / 1.21 us at
//   128 / 112 / 96 / 80 / 64 blocks of 128 / 160 / 192 / 224 / 256 threads), so the count is the one of least
//       96 * blocks + ceil(blocks / SMs) * threads * bytes a thread loads,
//   the smaller on a tie (H200 bf16, K=8, H=7168, T=48: 2.46 us against 2.62 with the staged rule).
int64_t block_threads(int64_t tokens, int64_t packs, int64_t sms, bool staged, int64_t bytes_per_thread) {
  if (staged) return packs > 128 && tokens * ((packs + 255) / 256) >= sms ? 256 : 128;
  if (tokens * ((packs + 255) / 256) > 2 * sms) return 256;
  int64_t threads = 128;
  int64_t best = std::numeric_limits<int64_t>::max();
  for (int64_t t = 128; t <= 256; t += 32) {
    const int64_t blocks = tokens * ((packs + t - 1) / t);
    const int64_t cost = 96 * blocks + (blocks + sms - 1) / sms * t * bytes_per_thread;
    if (cost < best) {
      best = cost;
      threads = t;
    }
  }
  return threads;
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
  // Elements a thread accumulates per access: 8 (16-byte accesses for 16-bit types) once the tokens give
  // 256 threads' worth an SM, 2 for staged pairs while they give fewer than 64, else 4: a latency-bound launch
  // waits for each thread's chain of loads and FMAs, and a thread reading its eight rows' weights itself
  // (token-major) gains less from a shorter one (H200 bf16, token-major K=8, H=7168, T=16: 1.81 us against 2.04
  // with 4; staged Qwen3-like T=128 with 4 rather than 2: 2.39 against 2.87, at T=16 2.09 with 2, 2.14 with 4).
  const int64_t sms = multiprocessor_count(expert_out.device());
  const bool staged = filter != 0 || rows_code != 0;
  const int64_t packs8 = (h + 7) / 8;
  const int64_t elements = tokens * packs8 >= sms * 256 ? 8 : staged && tokens * packs8 < sms * 64 ? 2 : 4;
  const int vec = vector_width(expert_out.element_size(), elements, {h, expert_out.stride(0)},
                               {expert_out.data_ptr(), out.data_ptr()});
  c10::DeviceGuard guard(expert_out.device());

  const int64_t packs = h / vec;
  const int64_t threads = block_threads(tokens, packs, sms, staged, k * vec * expert_out.element_size());
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
  // Grids of at most two blocks an SM (one wave, all resident from the start) let the next grid launch right
  // after their wait: its blocks then take the free slots and sit in their own wait, which returns only once
  // this grid has completed and its writes are visible, instead of launching when this one ends. That needs
  // every PDL launch after it to wait before its first read, as the packing kernel's trigger at once does: ours
  // do, and so do Inductor's under backend="inductor_moe" (backend.py; stock Inductor with its PDL on has
  // kernels that skip the wait, unsafe with any trigger). H200, a combine followed by an Inductor add, gathered
  // Mixtral-like T=16 with 1/8 local: 2.97 us with the trigger at the end, 2.61 after the wait. Larger grids keep
  // the trigger at the end: the activation lost with an early one at 6.8 blocks an SM (act_and_mul.cu).
  p.early_trigger = tokens * chunks <= 2 * sms ? 1 : 0;
  void* args[] = {&p};
  // Always PDL: the next kernel is the model's, under backend="inductor_moe" usually an Inductor kernel launched
  // with PDL, which a plain launch here would cost more (~0.45 us) than it saves (0.2; launcher.h).
  launch_kernel(expert_out.device(), Family::combine,
                {{"IM_DTYPE", dtype, 2},
                 {"IM_WDTYPE", wdtype, 2},
                 {"IM_FILTER", filter, 2},
                 {"IM_ROWS", rows_code, 2},
                 {"IM_RENORM", renormalize ? 1 : 0, 1},
                 {"IM_ZERO_DEAD", zero_dead_rows && filter != 0 ? 1 : 0, 1},
                 {"IM_VEC", vec, 4}},
                Dim3{static_cast<unsigned>(tokens), static_cast<unsigned>(chunks)},
                Dim3{static_cast<unsigned>(threads)}, args, Pdl::kAlways);
  return out;
}

}  // namespace inductor_moe
