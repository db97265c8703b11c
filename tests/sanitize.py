"""Driver for compute-sanitizer (memcheck, racecheck) on the device machine; not collected by pytest.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python tests/sanitize.py

Without the caching allocator every tensor is its own allocation, so a read or write one element past a
tensor is an error memcheck reports. Small shapes cover each kernel variant path: 16-, 8-byte and
element-wise accesses, a partial last column chunk, both filter modes, per-block ids, ids reached through an
index and a PDL chain; the packing kernel; the combine kernel with gathered rows, the filter (dead pairs
skipped or weighing zero rows), renormalised weights and k above one shared-memory stage (64), and
token-major rows in blocks of 160 and 192 threads whose last column chunk is partial; the grouping kernel up to
its largest program.
"""

import torch

import inductor_moe as im
from inductor_moe import reference
from inductor_moe.kernels.triton import fused_experts as kernel
from inductor_moe.ops.fused_experts import run_kernels


def main():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for rows, d in ((1, 8), (7, 13), (37, 264), (65, 4100), (1030, 72)):  # the last: 16-byte accesses
            x = torch.randn(rows, 2 * d, device="cuda").to(dtype)
            ids = torch.randint(-1, 4, (rows,), device="cuda", dtype=torch.int32)
            blocks = torch.randint(-1, 4, ((rows + 15) // 16,), device="cuda")
            out = torch.empty(rows, d, device="cuda", dtype=dtype)
            for act in reference.ACTIVATIONS:
                y = im.act_and_mul(act, x)
                im.act_and_mul(act, x, out=out, expert_ids=ids)
                z = im.act_and_mul(act, x, expert_ids=blocks, expert_step=16)
                im.act_and_mul(act, x, out=out, expert_ids=ids, expert_ids_index=torch.randperm(rows, device="cuda"))
                misaligned = im.act_and_mul(act, torch.cat([x.flatten(), x.new_zeros(1)])[1:].view(rows, 2 * d))
                torch.testing.assert_close(y, reference.act_and_mul_ref(x, act), rtol=1e-2, atol=1e-3)
                del z, misaligned
            h = x
            for _ in range(3):
                if h.shape[-1] % 2:
                    break
                h = im.silu_and_mul(h)
    for k, h in ((15, 13), (70, 264), (8, 7168)):  # 15 = groups of 8, 4, 2 and 1 pairs
        for ids_dtype in (None, torch.int32):
            t = 9
            eo = torch.randn(t * k, h, device="cuda", dtype=torch.bfloat16)
            w = torch.rand(t, k, device="cuda")
            ids = None if ids_dtype is None else torch.randint(-1, 4, (t, k), device="cuda", dtype=ids_dtype)
            rows = torch.randperm(t * k, device="cuda").view(t, k)
            for zero_dead_rows, renormalize in ((False, False), (True, False), (False, True)):
                y = im.moe_combine(eo, w, ids, (0, 4), rows, zero_dead_rows, renormalize)
                ref = reference.moe_combine_ref(eo, w, ids, 0, 4, rows, zero_dead_rows, renormalize)
                torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2)
            packed = im.pack_topk_ids_weights(rows, w)
            assert torch.equal(packed, reference.pack_topk_ids_weights_ref(rows, w))
    for t, k, h in ((12, 8, 7000), (24, 8, 3000)):  # token-major: blocks of 160 and 192 threads, partial chunks
        eo = torch.randn(t * k, h, device="cuda", dtype=torch.bfloat16)
        w = torch.rand(t, k, device="cuda")
        torch.testing.assert_close(im.moe_combine(eo, w), reference.moe_combine_ref(eo, w), rtol=1e-2, atol=1e-2)
    for shape, (lo, hi) in (((1, 2), (0, 8)), ((37, 8), (16, 32)), ((128, 8), (0, 128)), ((7, 3), (4, 4))):
        ids = torch.randint(-1, 40, shape, device="cuda")  # expert_sort: one program, its largest, no groups
        for t in (ids, ids.t().contiguous().t()):
            got = im.expert_sort(t, (lo, hi))
            assert all(torch.equal(a, b) for a, b in zip(got, reference.expert_sort_ref(t, lo, hi)))
    # fused_experts: partial row blocks, dead pairs, w3, a transposed w2, the heuristic's small and large tiles
    for t, e, k, lo in ((1, 8, 2, 0), (37, 9, 4, 3), (300, 16, 6, 0)):
        x = torch.randn(t, 72, device="cuda", dtype=torch.bfloat16)
        w13 = torch.randn(e, 80, 72, device="cuda", dtype=torch.bfloat16) / 8
        w2 = (torch.randn(e, 40, 72, device="cuda", dtype=torch.bfloat16) / 6).transpose(1, 2)
        w, ids = torch.topk(torch.rand(t, e + 4, device="cuda"), k)
        out = im.fused_experts(x, w13, w2, w, ids, "silu", (lo, lo + e), True)
        split = im.fused_experts(x, w13[:, :40], w2, w, ids, "gelu", (lo, lo + e), False, w13[:, 40:])
        ref = reference.fused_experts_ref(x, w13, w2, w, ids, "silu", lo, True)
        torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=3e-2)
        del split
        # TMA boxes for the weights and the down GEMM's rows (their last box partial in every dim)
        tma = kernel.Config(kernel.Tile(64, 64, 64, tma=True), kernel.Tile(64, 64, 64, tma=True))
        got = run_kernels(x, w13, w2.contiguous(), w, ids, "silu", lo, True, None, tiles=tma)
        torch.testing.assert_close(got.float(), ref.float(), rtol=3e-2, atol=3e-2)
        # rows in pair order (the decode path): every row block one pair, dead pairs' rows never touched; and
        # the combine in the down GEMM (arrival counts, the last program reading the other programs' rows)
        # and both GEMMs in one kernel (the down one split over the intermediate columns, partial rows summed
        # by the combine)
        for path in ("pairs", "pairs_combine", "decode"):
            got = run_kernels(
                x, w13, w2.contiguous(), w, ids, "silu", lo, True, None, tiles=kernel.Config(tma.up, tma.down, path)
            )
            torch.testing.assert_close(got.float(), ref.float(), rtol=3e-2, atol=3e-2)
    # route: E not a power of two, a few tokens a program with the last program partial, groups, k not one
    for tokens, experts, k, groups in ((1, 8, 2, 1), (37, 160, 7, 8), (300, 512, 16, 1)):
        logits = torch.randn(tokens, experts, device="cuda", dtype=torch.bfloat16)
        scoring = "sigmoid" if groups > 1 else "softmax"
        bias = torch.randn(experts, device="cuda") if groups > 1 else None
        got = im.route(logits, k, scoring, True, bias, groups, groups // 2 or 1)
        want = reference.route_ref(logits, k, scoring, True, bias, groups, groups // 2 or 1)
        assert torch.equal(got[1], want[1])
    torch.cuda.synchronize()
    print("sanitize: done")


if __name__ == "__main__":
    main()
