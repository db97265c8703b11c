// The CUDA implementations of the ops, one <family>.cpp each, registered in registration.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace inductor_moe {

at::Tensor act_and_mul_cuda(const at::Tensor& input, c10::string_view activation,
                            const std::optional<at::Tensor>& expert_ids, int64_t expert_step, int64_t expert_lo,
                            int64_t expert_hi, const std::optional<at::Tensor>& expert_ids_index);

void act_and_mul_out_cuda(const at::Tensor& input, const at::Tensor& out, c10::string_view activation,
                          const std::optional<at::Tensor>& expert_ids, int64_t expert_step, int64_t expert_lo,
                          int64_t expert_hi, const std::optional<at::Tensor>& expert_ids_index);

at::Tensor moe_combine_cuda(const at::Tensor& expert_out, const at::Tensor& topk_weights,
                            const std::optional<at::Tensor>& topk_ids, int64_t expert_lo, int64_t expert_hi,
                            const std::optional<at::Tensor>& src_rows, bool zero_dead_rows, bool renormalize);

}  // namespace inductor_moe
