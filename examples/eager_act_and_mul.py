"""A short eager tour of the gated-activation ops: the plain op, the expert filter, and out= with dead rows left
untouched.

Runs on CUDA when there is a GPU (the first call builds the kernels, later runs load them from the cache)
and on the CPU reference otherwise.
"""

import time

import torch

import inductor_moe as im
from inductor_moe import reference


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    tokens, top_k, num_experts, d = 64, 8, 128, 768
    # rows = (token, expert slot) pairs after routing; an expert-parallel rank owns experts [32, 48)
    gate_up = torch.randn(tokens * top_k, 2 * d, device=device, dtype=torch.bfloat16)
    expert_ids = torch.randint(0, num_experts, (tokens * top_k,), device=device, dtype=torch.int32)
    local = (32, 48)

    start = time.perf_counter()
    y = im.silu_and_mul(gate_up)
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"device: {device}; first call {time.perf_counter() - start:.3f} s (kernel build or cache load on CUDA)")
    print(
        f"silu_and_mul {tuple(gate_up.shape)} -> {tuple(y.shape)}, "
        f"max |err| vs reference {(y.float() - reference.act_and_mul_ref(gate_up, 'silu').float()).abs().max():.2e}"
    )

    filtered = im.silu_and_mul(gate_up, expert_ids=expert_ids, expert_range=local)
    live = (expert_ids >= local[0]) & (expert_ids < local[1])
    print(
        f"expert filter {local}: {int(live.sum())}/{live.numel()} rows live, dead rows zero: "
        f"{bool((filtered[~live] == 0).all())}, live rows equal the unfiltered result: "
        f"{bool(torch.equal(filtered[live], y[live]))}"
    )

    out = torch.full_like(y, float("nan"))
    im.gelu_and_mul(gate_up, out=out, expert_ids=expert_ids, expert_range=local)
    print(f"gelu_and_mul with out=: dead rows left untouched (still NaN): {bool(out[~live].isnan().all())}")


if __name__ == "__main__":
    main()
