"""The int32-accumulating int8 expert GEMM (``moe_int8.py``), run by Triton's interpreter on the CPU: equal to the
exact integer reference dequantized in vLLM's order (``tests/reference.py``), for both GEMMs of an MoE layer, the
router weight, padding rows, K not a multiple of the tile, and experts of another rank. Its equality with vLLM's own
fused_experts on CUDA is in ``tests/gpu/test_cuda_moe_int8.py``.

Each ``check_*`` runs in a child Python with ``TRITON_INTERPRET=1`` set before Triton is imported: Triton binds its
standard-library functions (``tl.zeros``, ``tl.cdiv``) to the compiler at import, and vLLM imports Triton in the test
process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import int8_moe_gemm, moe_align_block_size

from vllm_smoothquant import moe_int8

CONFIG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 2}
HERE = Path(__file__).resolve().parent


def _interpreted(check: str, *args) -> None:
    pytest.importorskip("triton")
    code = (f"import sys; sys.path[:0] = [{str(HERE)!r}, {str(HERE.parent)!r}]; "
            f"import {Path(__file__).stem} as t; t.{check}(*{args!r})")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


def _case(tokens=11, experts=5, top_k=2, n=48, k=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    a_q = torch.randint(-128, 128, (tokens, k), dtype=torch.int8, generator=g)
    a_scale = torch.rand(tokens, 1, generator=g) * 0.01 + 1e-4
    w_q = torch.randint(-127, 128, (experts, n, k), dtype=torch.int8, generator=g)
    w_scale = torch.rand(experts, n, 1, generator=g) * 0.01 + 1e-4
    topk_ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)]).int()
    topk_weights = torch.softmax(torch.randn(tokens, top_k, generator=g), -1)
    return a_q, a_scale, w_q, w_scale, topk_ids, topk_weights


def check_first_gemm(mul_routed_weight: bool, dtype: str = "float32") -> None:
    """fp32 output: equal to the reference; 16-bit output: the reference's fp32 value rounded once to it."""
    a_q, a_scale, w_q, w_scale, topk_ids, topk_weights = _case()
    out = torch.full((*topk_ids.shape, w_q.shape[1]), float("nan"), dtype=getattr(torch, dtype))
    moe_int8.grouped_gemm(a_q, a_scale, w_q, w_scale, out, topk_weights,
                          *moe_align_block_size(topk_ids, CONFIG["BLOCK_SIZE_M"], w_q.shape[0]),
                          mul_routed_weight=mul_routed_weight, top_k=topk_ids.shape[1], config=CONFIG)
    ref = int8_moe_gemm(a_q, a_scale, w_q, w_scale, topk_ids, topk_weights if mul_routed_weight else None)
    assert torch.equal(out, ref.to(out.dtype)), (out.float() - ref).abs().max()


def check_second_gemm() -> None:
    """The down projection: its input has a row per (token, choice), so top_k is 1 in the kernel's indexing."""
    _, _, w_q, w_scale, topk_ids, topk_weights = _case(seed=1)
    tokens, top_k = topk_ids.shape
    g = torch.Generator().manual_seed(3)
    h_q = torch.randint(-128, 128, (tokens * top_k, w_q.shape[2]), dtype=torch.int8, generator=g)
    h_scale = torch.rand(tokens * top_k, 1, generator=g) * 0.01 + 1e-4
    out = torch.full((tokens, top_k, w_q.shape[1]), float("nan"))
    moe_int8.grouped_gemm(h_q, h_scale, w_q, w_scale, out, topk_weights,
                          *moe_align_block_size(topk_ids, CONFIG["BLOCK_SIZE_M"], w_q.shape[0]),
                          mul_routed_weight=True, top_k=1, config=CONFIG)
    assert torch.equal(out, int8_moe_gemm(h_q, h_scale, w_q, w_scale, topk_ids, topk_weights, a_rows_per_pair=top_k))


def check_remote_experts() -> None:
    """Expert parallelism: blocks of experts on another rank (expert id -1) write zeros; the others compute."""
    a_q, a_scale, w_q, w_scale, topk_ids, topk_weights = _case(seed=2)
    to_local = torch.tensor([0, -1, 1, -1, 2])  # global expert -> this rank's index; 1 and 3 live elsewhere
    local = torch.tensor([0, 2, 4])
    out = torch.full((*topk_ids.shape, w_q.shape[1]), float("nan"))
    moe_int8.grouped_gemm(a_q, a_scale, w_q[local], w_scale[local], out, topk_weights,
                          *moe_align_block_size(topk_ids, CONFIG["BLOCK_SIZE_M"], w_q.shape[0], to_local),
                          mul_routed_weight=False, top_k=topk_ids.shape[1], config=CONFIG)
    remote = (topk_ids == 1) | (topk_ids == 3)
    assert remote.any() and (out[remote] == 0).all()
    ref = int8_moe_gemm(a_q, a_scale, w_q, w_scale, topk_ids)
    assert torch.equal(out[~remote], ref[~remote])


# no bfloat16 here: Triton's CPU interpreter casts fp32 -> bf16 by truncation (checked: its output equals the reference
# truncated, not rounded), where the GPU rounds to nearest; the bf16 path is in tests/gpu/test_cuda_moe_int8.py
@pytest.mark.parametrize("mul_routed_weight, dtype", [(False, "float32"), (True, "float32"), (True, "float16")])
def test_first_gemm_equals_the_exact_reference(mul_routed_weight, dtype):
    _interpreted("check_first_gemm", mul_routed_weight, dtype)


def test_second_gemm_reads_one_row_per_routed_pair():
    _interpreted("check_second_gemm")


def test_experts_of_another_rank_give_zeros():
    _interpreted("check_remote_experts")


def test_the_int32_accumulator_is_exact_up_to_max_k():
    assert 128 * 127 * moe_int8.MAX_K < 2**31 <= 128 * 127 * (moe_int8.MAX_K + 1)
