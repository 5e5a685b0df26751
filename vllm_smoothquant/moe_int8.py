"""Int8 W8A8 experts that accumulate in int32 inside the MMA: a Triton grouped GEMM for the SmoothQuant MoE method.

vLLM's Triton fused-MoE kernel, on its int8 W8A8 path, adds every K step's int32 dot product to an fp32 accumulator
(``accumulator += tl.dot(a, b)`` in ``fused_moe.py``, vLLM 0.26 and 0.32): a conversion of the whole tile per step,
and an MMA that cannot chain its accumulation, where the fp8 path writes ``tl.dot(a, b, acc=accumulator)``. On the
H100 that leaves int8 experts at 0.91x FP8 on a Mixtral-8x7B shape, and makes 256-wide N tiles 2-3x slower; with
the accumulator in the MMA those tiles run 1.32-1.38x faster than vLLM's way at its best tile on Mixtral's gate/up
GEMM from 2,048 tokens (benchmarks/RESULTS.md, ``benchmarks/moe_int8_accum.py``). This kernel is the same
design (tokens sorted by expert in BLOCK_SIZE_M blocks, one expert's weights per block, grouped tile order) with the
accumulator an int32 MMA operand, scaled once at the end:

    C[t, n] = (sum_k A_q[t, k] * W_q[e, n, k]) * a_scale[t] * w_scale[e, n]    (* the router weight, in fp32)

The sum is exact: |sum| <= 128 * 127 * K < 2**31 for K <= MAX_K. The epilogue multiplies in vLLM's order, so where
vLLM's fp32 running sum is exact too (every partial sum below 2**24) the outputs should equal vLLM's bit for bit:
the A/B with vLLM's accumulation (``fp32_steps``) gave equal outputs in every cell on the H100, and the whole
experts layer equals vLLM's own ``fused_experts`` there (``tests/gpu/test_cuda_moe_int8.py``, passed on an H100).
Everything around the GEMM is vLLM's: per-token activation quant (``moe_kernel_quantize_input``), routing alignment
(``moe_align_block_size``), the activation and ``moe_sum``. The CUDA default for SmoothQuant experts
(``moe_kernel`` "auto" in ``engine_options.py``; "vllm" keeps vLLM's kernel).
"""

from __future__ import annotations

import functools

import torch

MAX_K = (2**31 - 1) // (128 * 127)  # longest reduction an int32 accumulator holds exactly (132,104)


@functools.cache
def gemm_kernel():
    """The Triton kernel, built on first use (importing this module needs no Triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def int8_moe_gemm(
        a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, topk_weights_ptr,
        sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
        N, K, EM, num_valid_tokens,
        stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn, stride_asm, stride_bse, stride_bsn,
        BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
        GROUP_SIZE_M: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr, top_k: tl.constexpr, compute_type: tl.constexpr,
        FP32_STEPS: tl.constexpr = False,  # vLLM's accumulation (each step converted, added in fp32): A/B only
    ):
        # grouped order of the (M block, N block) tiles, for L2 reuse of the weight tiles
        pid = tl.program_id(axis=0)
        # (ceil divisions written out: triton.language's cdiv is a jit function the CPU interpreter cannot call
        # once Triton was imported without TRITON_INTERPRET, as vLLM imports it)
        num_pid_m = (EM + BLOCK_SIZE_M - 1) // BLOCK_SIZE_M
        num_pid_n = (N + BLOCK_SIZE_N - 1) // BLOCK_SIZE_N
        num_pid_in_group = GROUP_SIZE_M * num_pid_n
        first_pid_m = (pid // num_pid_in_group) * GROUP_SIZE_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_SIZE_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m
        if pid_m * BLOCK_SIZE_M >= tl.load(num_tokens_post_padded_ptr):
            return
        # this block's rows: (token, k-th choice) pairs routed to one expert; padding rows point past the end
        offs_token = tl.load(sorted_token_ids_ptr + pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)).to(tl.int64)
        token_mask = offs_token < num_valid_tokens
        offs_cn = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
        c_ptrs = c_ptr + stride_cm * offs_token[:, None] + stride_cn * offs_cn[None, :]
        c_mask = token_mask[:, None] & (offs_cn[None, :] < N)
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        if expert == -1:  # an expert of another rank (expert parallelism): its rows are zeros here
            tl.store(c_ptrs, tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=compute_type), mask=c_mask)
            return
        offs_bn = offs_cn.to(tl.int64) % N
        offs_k = tl.arange(0, BLOCK_SIZE_K)
        a_ptrs = a_ptr + (offs_token[:, None] // top_k) * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + expert * stride_be + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn
        acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32 if FP32_STEPS else tl.int32)
        for k in range(0, (K + BLOCK_SIZE_K - 1) // BLOCK_SIZE_K):
            k_left = K - k * BLOCK_SIZE_K
            a = tl.load(a_ptrs, mask=token_mask[:, None] & (offs_k[None, :] < k_left), other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
            if FP32_STEPS:
                acc += tl.dot(a, b)
            else:
                acc = tl.dot(a, b, acc=acc, out_dtype=tl.int32)  # int8 x int8 -> int32, accumulated in the MMA
            a_ptrs += BLOCK_SIZE_K * stride_ak
            b_ptrs += BLOCK_SIZE_K * stride_bk
        a_scale = tl.load(a_scale_ptr + (offs_token // top_k) * stride_asm, mask=token_mask, other=0.0)
        b_scale = tl.load(b_scale_ptr + expert * stride_bse + offs_bn * stride_bsn)
        out = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
        if MUL_ROUTED_WEIGHT:
            out = out * tl.load(topk_weights_ptr + offs_token, mask=token_mask, other=0.0)[:, None]
        tl.store(c_ptrs, out.to(compute_type), mask=c_mask)

    return int8_moe_gemm


def grouped_gemm(a_q, a_scale, w_q, w_scale, out, topk_weights, sorted_token_ids, expert_ids, num_tokens_post_padded,
                 *, mul_routed_weight: bool, top_k: int, config: dict, fp32_steps: bool = False) -> None:
    """``out[t, j, :] = dequant(a_q[t] @ w_q[expert of (t, j)].T)`` for every routed pair, into ``out`` (M, top_k, N).

    ``a_q`` int8 (rows, K) with per-row fp32 ``a_scale`` (rows, 1); ``w_q`` int8 (E, N, K) with per-channel fp32
    ``w_scale`` (E, N, 1); ``sorted_token_ids`` / ``expert_ids`` / ``num_tokens_post_padded`` from vLLM's
    ``moe_align_block_size`` with ``config["BLOCK_SIZE_M"]``; ``config`` a vLLM fused-MoE tile config.
    """
    import triton
    import triton.language as tl

    compute = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[out.dtype]
    bm, bn = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"]
    em = sorted_token_ids.shape[0]
    if a_q.shape[0] < bm:  # few tokens: at most rows * top_k blocks hold any (vLLM's bound)
        em = min(em, a_q.shape[0] * top_k * bm)
    n, k = w_q.shape[1], w_q.shape[2]
    grid = (triton.cdiv(em, bm) * triton.cdiv(n, bn),)
    gemm_kernel()[grid](
        a_q, w_q, out, a_scale, w_scale, topk_weights, sorted_token_ids, expert_ids, num_tokens_post_padded,
        n, k, em, a_q.shape[0] * top_k,  # valid (token, choice) pairs; padding ids are >= this
        a_q.stride(0), a_q.stride(1), w_q.stride(0), w_q.stride(2), w_q.stride(1), out.stride(1), out.stride(2),
        a_scale.stride(0), w_scale.stride(0), w_scale.stride(1),
        BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=config["BLOCK_SIZE_K"], GROUP_SIZE_M=config.get("GROUP_SIZE_M", 1),
        MUL_ROUTED_WEIGHT=mul_routed_weight, top_k=top_k, compute_type=compute, FP32_STEPS=fp32_steps,
        num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 3),
    )


def fused_experts(x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids, config: dict, *, activation,
                  apply_router_weight_on_input: bool, global_num_experts: int, expert_map) -> torch.Tensor:
    """vLLM's ``fused_experts`` for int8 W8A8 per-token / per-channel experts, with :func:`grouped_gemm` as the GEMM."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation, apply_moe_activation
    from vllm.model_executor.layers.fused_moe.moe_align_block_size import moe_align_block_size
    from vllm.model_executor.layers.fused_moe.utils import moe_kernel_quantize_input

    tokens, hidden = x.shape
    top_k, n2 = topk_ids.shape[1], w13.shape[1]
    global_num_experts = w13.shape[0] if global_num_experts == -1 else global_num_experts  # vLLM's convention
    act = MoEActivation.from_str(activation) if isinstance(activation, str) else activation
    n = n2 // 2 if act.is_gated else n2

    def quant(a):
        return moe_kernel_quantize_input(A=a, A_scale=None, quant_dtype=torch.int8, per_act_token_quant=True,
                                         block_shape=None)

    sorted_ids, expert_ids, padded = moe_align_block_size(topk_ids, config["BLOCK_SIZE_M"], global_num_experts,
                                                          expert_map, ignore_invalid_experts=True)
    x_q, x_scale = quant(x)
    cache1 = torch.empty(tokens, top_k, n2, dtype=x.dtype, device=x.device)
    grouped_gemm(x_q, x_scale, w13, w13_scale, cache1, topk_weights, sorted_ids, expert_ids, padded,
                 mul_routed_weight=apply_router_weight_on_input, top_k=top_k, config=config)
    cache2 = torch.empty(tokens * top_k, n, dtype=x.dtype, device=x.device)
    apply_moe_activation(act, cache2, cache1.view(-1, n2))
    h_q, h_scale = quant(cache2)
    cache3 = (torch.zeros if expert_map is not None else torch.empty)(tokens, top_k, hidden, dtype=x.dtype,
                                                                      device=x.device)
    grouped_gemm(h_q, h_scale, w2, w2_scale, cache3, topk_weights, sorted_ids, expert_ids, padded,
                 mul_routed_weight=not apply_router_weight_on_input, top_k=1, config=config)
    out = torch.empty_like(x)
    ops.moe_sum(cache3, out)
    return out
