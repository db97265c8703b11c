// CUDA implementation of inductor_moe::act_and_mul and act_and_mul_out: argument checks, variant and launch
// configuration; the kernel is csrc/act_and_mul.cu.
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <string>
#include <vector>

#include "act_and_mul_params.h"
#include "host_common.h"
#include "launcher.h"
#include "message.h"
#include "ops.h"

namespace inductor_moe {
namespace {

// ---------------------------------------------------------------------------------------------------------
// Shape helpers. Each check mirrors one in ops.py (the fake and CPU implementations) with the same message.
// Row stride (elements) of `t` viewed as [rows, t.size(-1)], or -1 if its leading dims do not flatten to one
// stride. Size-1 dims never matter.
int64_t flat_row_stride(const at::Tensor& t) {
  const int64_t nd = t.dim();
  if (nd <= 1) return t.size(-1);
  int64_t stride = -1;
  int64_t expected = -1;
  for (int64_t i = nd - 2; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    if (stride < 0) {
      stride = t.stride(i);
    } else if (t.stride(i) != expected) {
      return -1;
    }
    expected = t.stride(i) * t.size(i);
  }
  return stride < 0 ? t.size(-1) : stride;
}

const char* kActivations[] = {"silu", "gelu", "gelu_tanh"};

int activation_code(c10::string_view activation) {
  for (int i = 0; i < 3; ++i) {
    if (activation == kActivations[i]) return i;
  }
  TORCH_CHECK(false, cat("inductor_moe.act_and_mul: activation must be one of 'silu', 'gelu', 'gelu_tanh', got '",
                         std::string(activation), "'"));
}

void check_layout(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() >= 1 && (t.size(-1) <= 1 || t.stride(-1) == 1) && flat_row_stride(t) >= 0,
              cat("inductor_moe.act_and_mul: ", name,
                  " must have a contiguous last dim and leading dims that flatten to one row stride; got strides ",
                  t.strides()));
}

// The filter's variant codes: ids (0 none, 1 int32, 2 int64) and the index that reaches them (same codes).
struct FilterCodes {
  int ids = 0;
  int index = 0;
};

// Checks an index-typed argument (expert_ids, expert_ids_index): int32/int64, on input's device, contiguous.
void check_index_tensor(const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong,
              cat("inductor_moe.act_and_mul: ", name, " must be int32 or int64, got ", t.scalar_type()));
  TORCH_CHECK(t.device() == input.device(),
              cat("inductor_moe.act_and_mul: ", name, " must be on ", input.device(), ", got ", t.device()));
  TORCH_CHECK(t.is_contiguous(), cat("inductor_moe.act_and_mul: ", name, " must be contiguous"));
}

// Validates every argument, returns the variant's filter codes.
FilterCodes check_args(const at::Tensor& input, const at::Tensor* out, const std::optional<at::Tensor>& expert_ids,
                       int64_t expert_step, const std::optional<at::Tensor>& index) {
  TORCH_CHECK(input.dim() >= 1, cat("inductor_moe.act_and_mul: input must have at least one dim"));
  TORCH_CHECK(
      dtype_code(input.scalar_type()) >= 0,
      cat("inductor_moe.act_and_mul: input dtype must be float16, bfloat16 or float32, got ", input.scalar_type()));
  const int64_t two_d = input.size(-1);
  TORCH_CHECK(two_d % 2 == 0,
              cat("inductor_moe.act_and_mul: the last dim of input must be even (gate and up halves), got ", two_d));
  TORCH_CHECK(two_d <= kMaxIndex,
              cat("inductor_moe.act_and_mul: the last dim of input (", two_d, ") must be below 2**31"));
  check_layout("input", input);
  const int64_t rows = two_d == 0 ? 0 : input.numel() / two_d;
  TORCH_CHECK(rows <= kMaxIndex, cat("inductor_moe.act_and_mul: at most 2**31-1 rows are supported, got ", rows));
  if (out != nullptr) {
    TORCH_CHECK(out->scalar_type() == input.scalar_type(),
                cat("inductor_moe.act_and_mul: out dtype ", out->scalar_type(), " must match input dtype ",
                    input.scalar_type()));
    TORCH_CHECK(out->device() == input.device(),
                cat("inductor_moe.act_and_mul: out must be on ", input.device(), ", got ", out->device()));
    std::vector<int64_t> expected(input.sizes().begin(), input.sizes().end());
    expected.back() = two_d / 2;
    TORCH_CHECK(out->sizes().vec() == expected, cat("inductor_moe.act_and_mul: out must have shape ",
                                                    c10::IntArrayRef(expected), ", got ", out->sizes()));
    check_layout("out", *out);
  }
  TORCH_CHECK(expert_step >= 1, cat("inductor_moe.act_and_mul: expert_step must be >= 1, got ", expert_step));
  if (!expert_ids.has_value()) {
    TORCH_CHECK(!index.has_value(), cat("inductor_moe.act_and_mul: expert_ids_index needs expert_ids"));
    return {};
  }
  check_index_tensor("expert_ids", *expert_ids, input);
  if (index.has_value()) {
    check_index_tensor("expert_ids_index", *index, input);
    TORCH_CHECK(
        expert_ids->dim() == 1,
        cat("inductor_moe.act_and_mul: with expert_ids_index, expert_ids must be 1-D, got ", expert_ids->sizes()));
    TORCH_CHECK(expert_ids->numel() <= kMaxIndex,
                cat("inductor_moe.act_and_mul: at most 2**31-1 expert_ids, got ", expert_ids->numel()));
  }
  // the ids of the rows, one per row or per block: expert_ids, or the index that reaches them
  const at::Tensor& ids = index.has_value() ? *index : *expert_ids;
  const char* name = index.has_value() ? "expert_ids_index" : "expert_ids";
  const int64_t blocks = (rows + expert_step - 1) / expert_step;
  const bool per_row_shape =
      expert_step == 1 && ids.dim() == input.dim() - 1 && ids.sizes() == input.sizes().slice(0, input.dim() - 1);
  const bool per_block_shape =
      !(expert_step == 1 && ids.dim() == input.dim() - 1) && ids.dim() == 1 && ids.size(0) == blocks;
  TORCH_CHECK(per_row_shape || per_block_shape,
              cat("inductor_moe.act_and_mul: ", name, " must have shape input.shape[:-1] (expert_step=1) or [", blocks,
                  "] (= ceil(rows / expert_step)), got ", ids.sizes()));
  return {index_code(expert_ids->scalar_type()), index.has_value() ? index_code(index->scalar_type()) : 0};
}

void act_and_mul_launch(const at::Tensor& input, const at::Tensor& out, int act, FilterCodes codes,
                        const std::optional<at::Tensor>& expert_ids, int64_t expert_step, int64_t expert_lo,
                        int64_t expert_hi, const std::optional<at::Tensor>& index, bool zero_dead) {
  const int64_t two_d = input.size(-1);
  const int64_t d = two_d / 2;
  const int64_t rows = two_d == 0 ? 0 : input.numel() / two_d;
  if (rows == 0 || d == 0) return;
  const int64_t in_stride = flat_row_stride(input);
  const int64_t out_stride = flat_row_stride(out);
  const int dtype = dtype_code(input.scalar_type());
  const int filter = codes.ids;

  // Filtered rows of at most 2048 elements get one warp each, eight rows a block, so dead rows cost a block per
  // 8 instead of per 1-3 (H100 bf16, 32768x768 with 7/8 dead sorted last: 13.89 -> 5.61 us); longer rows keep
  // the wide blocks (one warp a row was 4% slower at 8192x14336).
  const bool warp_per_row = filter != 0 && d <= 2048;

  // Elements a thread moves per access: 4 (8 bytes for 16-bit types, 16 for fp32) for fewer than 1024 rows,
  // 8 (16 bytes) from there, when every row of gate, up and out is aligned to that; else one element at a
  // time. Few rows do not fill the GPU, and there fewer elements a thread shortens each thread's chain of loads
  // and math (H100 bf16, 1x2048 silu: 1.41 us with 8, 1.20 with 4); from 1024 rows the kernel streams and 16-byte
  // accesses win (silu 1024x768: 2.25 us against 2.59). Unfiltered inputs of at most 32768 output elements move 2
  // (H200 bf16, gelu 1x2048: 1.20 -> 1.12 us).
  const int64_t elements = rows >= 1024 ? 8 : filter == 0 && rows * d <= 32768 ? 2 : 4;
  const int vec =
      vector_width(input.element_size(), elements, {d, in_stride, out_stride}, {input.data_ptr(), out.data_ptr()});

  c10::DeviceGuard guard(input.device());

  // Threads: x covers a row's packs (32..256), y stacks rows up to 256 threads a block; one block row per
  // row of the tensor. Rows are split into column chunks only while there are fewer row blocks than two
  // waves of resident blocks. Not a row-strided grid capped at two waves: with random dead rows its blocks
  // got uneven work (4096x2048 bf16, 87.5% dead: 6.30 us against 4.96 us with one row per block row).
  constexpr int64_t kThreads = 256;  // the kernel's __launch_bounds__
  const int64_t packs = d / vec;
  const int64_t tx = warp_per_row ? 32 : std::min<int64_t>(kThreads, (packs + 31) / 32 * 32);
  const int64_t ty = std::max<int64_t>(1, kThreads / tx);
  const int64_t row_blocks = (rows + ty - 1) / ty;
  const int64_t wanted = multiprocessor_count(input.device()) * act_and_mul_blocks_per_sm(act, filter) * 2;
  const int64_t chunks =
      std::clamp<int64_t>((wanted + row_blocks - 1) / row_blocks, 1, std::min<int64_t>(65535, (packs + tx - 1) / tx));

  ActAndMulParams p;
  p.input = input.data_ptr();
  p.out = out.data_ptr();
  p.expert_ids = expert_ids.has_value() ? expert_ids->data_ptr() : nullptr;
  p.expert_ids_index = index.has_value() ? index->data_ptr() : nullptr;
  p.num_ids = expert_ids.has_value() ? expert_ids->numel() : 0;
  p.rows = rows;
  p.in_row_stride = in_stride;
  p.out_row_stride = out_stride;
  p.expert_step = expert_step;
  p.expert_lo = expert_lo;
  p.expert_hi = expert_hi;
  p.d = static_cast<int>(d);
  p.zero_dead = zero_dead ? 1 : 0;
  // Filtered inputs of at most 2 MiB read their first pack ahead of the expert id, so the id and the data
  // arrive together instead of one after the other; larger inputs read only live rows, whose bandwidth is the
  // filter's point. With 1/8 of the rows live it wins up to 1.75 MiB and breaks even at 3.5 MiB (H200 bf16,
  // 32x14336: 1.86 -> 1.82 us; 64x14336: 2.11 -> 2.14).
  p.read_ahead = filter != 0 && rows * two_d * static_cast<int64_t>(input.element_size()) <= (int64_t{2} << 20);
  void* args[] = {&p};
  // The next kernel is the down projection's GEMM, launched plain: captured after a plain kernel (the up
  // projection's GEMM), this launch is plain too and saves PDL's 0.2 us there (launcher.h).
  launch_kernel(input.device(), Family::act_and_mul,
                {{"IM_DTYPE", dtype, 2},
                 {"IM_ACT", act, 2},
                 {"IM_FILTER", filter, 2},
                 {"IM_INDEX", codes.index, 2},
                 {"IM_VEC", vec, 4}},
                Dim3{static_cast<unsigned>(row_blocks), static_cast<unsigned>(chunks)},
                Dim3{static_cast<unsigned>(tx), static_cast<unsigned>(ty)}, args, Pdl::kAfterPdlLaunches);
}

}  // namespace

at::Tensor act_and_mul_cuda(const at::Tensor& input, c10::string_view activation,
                            const std::optional<at::Tensor>& expert_ids, int64_t expert_step, int64_t expert_lo,
                            int64_t expert_hi, const std::optional<at::Tensor>& expert_ids_index) {
  const int act = activation_code(activation);
  const FilterCodes codes = check_args(input, nullptr, expert_ids, expert_step, expert_ids_index);
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() /= 2;
  at::Tensor out = empty_cuda_like(input, shape);
  act_and_mul_launch(input, out, act, codes, expert_ids, expert_step, expert_lo, expert_hi, expert_ids_index,
                     /*zero_dead=*/true);
  return out;
}

void act_and_mul_out_cuda(const at::Tensor& input, const at::Tensor& out, c10::string_view activation,
                          const std::optional<at::Tensor>& expert_ids, int64_t expert_step, int64_t expert_lo,
                          int64_t expert_hi, const std::optional<at::Tensor>& expert_ids_index) {
  const int act = activation_code(activation);
  const FilterCodes codes = check_args(input, &out, expert_ids, expert_step, expert_ids_index);
  act_and_mul_launch(input, out, act, codes, expert_ids, expert_step, expert_lo, expert_hi, expert_ids_index,
                     /*zero_dead=*/false);
}

}  // namespace inductor_moe
