"""On CUDA: the int32-accumulating int8 experts (``moe_int8.py``) against vLLM's own ``fused_experts`` with the int8
W8A8 per-token quant config the plugin uses, on the same weights, routing and tile config.

- Bit-identical where vLLM's fp32 running sum is exact too (K small enough that every partial sum stays below 2**24:
  K = 256 here), for both the gate/up and the down GEMM, with and without the router weight on the input.
- On Mixtral's expert shape (K = 4096 and 14,336, where vLLM's fp32 sum rounds) within the rounding of that sum.
- Expert parallelism: an ``expert_map`` with experts on another rank equals vLLM's.

Skipped where there is no CUDA. The engine-level check and the speed are in ``benchmarks/moe_tune.py --kernel``.
"""

from __future__ import annotations

import pytest
import torch

from vllm_smoothquant import moe_int8

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
CONFIG = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 8, "SPLIT_K": 1,
          "num_warps": 8, "num_stages": 3}


def _moe(experts, inter, hidden, tokens, top_k, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w13 = torch.randint(-127, 128, (experts, 2 * inter, hidden), dtype=torch.int8, device="cuda", generator=g)
    w2 = torch.randint(-127, 128, (experts, hidden, inter), dtype=torch.int8, device="cuda", generator=g)
    s13 = torch.rand(experts, 2 * inter, 1, device="cuda", generator=g) * 1e-3 + 1e-5
    s2 = torch.rand(experts, hidden, 1, device="cuda", generator=g) * 1e-3 + 1e-5
    x = torch.randn(tokens, hidden, device="cuda", generator=g).to(dtype)
    ids = torch.stack([torch.randperm(experts, device="cuda", generator=g)[:top_k] for _ in range(tokens)]).int()
    wts = torch.softmax(torch.randn(tokens, top_k, device="cuda", generator=g), -1)
    return x, w13, w2, s13, s2, wts, ids


def _both(x, w13, w2, s13, s2, wts, ids, on_input=False, expert_map=None, global_experts=-1):
    from vllm.model_executor.layers.fused_moe import override_config
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import int8_w8a8_moe_quant_config
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts

    experts = global_experts if global_experts > 0 else w13.shape[0]
    qc = int8_w8a8_moe_quant_config(w1_scale=s13, w2_scale=s2, a1_scale=None, a2_scale=None, per_act_token_quant=True)
    with override_config(CONFIG):
        ref = fused_experts(x, w13, w2, wts, ids, activation=MoEActivation.SILU, apply_router_weight_on_input=on_input,
                            global_num_experts=experts, expert_map=expert_map, quant_config=qc)
    ours = moe_int8.fused_experts(x, w13, w2, s13, s2, wts, ids, CONFIG, activation=MoEActivation.SILU,
                                  apply_router_weight_on_input=on_input, global_num_experts=experts,
                                  expert_map=expert_map)
    return ours, ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_bit_identical_to_vllm_where_its_fp32_sum_is_exact(dtype, tokens):
    ours, ref = _both(*_moe(8, 256, 256, tokens, 2, dtype))
    assert torch.equal(ours, ref)


def test_router_weight_on_the_input_is_vllms():
    x, w13, w2, s13, s2, wts, ids = _moe(8, 256, 256, 64, 1, torch.bfloat16, seed=1)  # vLLM: top-1 only
    ours, ref = _both(x, w13, w2, s13, s2, wts, ids, on_input=True)
    assert torch.equal(ours, ref)


def test_mixtral_shape_within_the_rounding_of_vllms_fp32_sum():
    """Same-sign inputs and weights, so the sums pass 2**24 and vLLM's fp32 running sum rounds (ours stays exact)."""
    x, w13, w2, s13, s2, wts, ids = _moe(8, 14336, 4096, 256, 2, torch.bfloat16, seed=2)
    x, w13, w2 = x.abs() + 1, w13.abs().clamp(min=64), w2.abs().clamp(min=64)
    ours, ref = _both(x, w13, w2, s13, s2, wts, ids)
    rel = ((ours.float() - ref.float()).norm() / ref.float().norm()).item()
    assert 0 < ours.float().abs().min() and rel < 1e-3, rel  # fp32 rounding of partial sums, then bf16 outputs


def test_experts_of_another_rank_are_vllms():
    x, w13, w2, s13, s2, wts, ids = _moe(8, 256, 256, 64, 2, torch.bfloat16, seed=3)
    expert_map = torch.tensor([0, -1, 1, -1, 2, 3, -1, 4], dtype=torch.int32, device="cuda")
    local = torch.tensor([0, 2, 4, 5, 7], device="cuda")
    ours, ref = _both(x, w13[local], w2[local], s13[local], s2[local], wts, ids, expert_map=expert_map,
                      global_experts=8)
    assert torch.equal(ours, ref)
