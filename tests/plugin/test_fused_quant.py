"""The RMSNorm -> int8 fusion pass on the CPU: its patterns match vLLM's own IR norm ops followed by vLLM's own
``scaled_int8_quant`` in a graph compiled as vLLM compiles (Inductor, auto_functionalized v1, dynamic token count),
and the replacement wires the fused op's outputs (int8, scales, new residual) where the pair's were.

vLLM's fused kernel (``rms_norm_dynamic_per_token_quant``) is CUDA-only, so here the pass calls a stand-in op with
its schema that runs the unfused pair (vLLM's norm, then vLLM's quant) eagerly: outputs equal to the unfused graph's show the wiring; the
CUDA kernel's own values are compared with the unfused pair in ``tests/gpu/test_cuda_fused_quant.py``. Engine
level (CPU keeps the unfused path): ``tests/integration/test_engine.py``. The option: ``test_engine_options.py``.
"""

from __future__ import annotations

import pytest
import torch

from vllm_smoothquant import fused_quant as fq

_LIB = None


def _stand_in_op():
    """``sqtest::rms_norm_dynamic_per_token_quant``: the CUDA kernel's schema; runs vLLM's norm, then vLLM's quant."""
    global _LIB
    if _LIB is None:
        _LIB = torch.library.Library("sqtest", "DEF")
        _LIB.define("rms_norm_dynamic_per_token_quant(Tensor! result, Tensor input, Tensor weight, Tensor! scale, "
                    "float epsilon, Tensor? scale_ub, Tensor!? residual) -> ()")

        def impl(result, input, weight, scale, epsilon, scale_ub, residual):
            from vllm import _custom_ops as ops
            from vllm import ir

            if residual is None:
                y = ir.ops.rms_norm(input, weight, epsilon)
            else:
                y, new_residual = ir.ops.fused_add_rms_norm(input, residual, weight, epsilon)
            q, s, _ = ops.scaled_int8_quant(y)
            result.copy_(q)
            scale.copy_(s)
            if residual is not None:
                residual.copy_(new_residual)

        _LIB.impl("rms_norm_dynamic_per_token_quant", impl, "CPU")
        _LIB.impl("rms_norm_dynamic_per_token_quant", lambda *args: None, "Meta")
    return torch.ops.sqtest.rms_norm_dynamic_per_token_quant.default


@pytest.fixture(scope="module")
def fusion_pass():
    from vllm.config import VllmConfig, set_current_vllm_config

    op = _stand_in_op()
    cfg = VllmConfig()
    with set_current_vllm_config(cfg):
        cls = type("StandInFusionPass", (fq._pass_class(),), {"FUSED_OP": op})
        return cls(cfg)


def _compile(fn, fusion_pass):
    options = {"post_grad_custom_post_pass": fusion_pass, "enable_auto_functionalized_v2": False}  # as vLLM
    return torch.compile(fn, backend="inductor", options=options, fullgraph=True)


@pytest.fixture(autouse=True)
def _no_compile_cache():
    with torch._inductor.config.patch(force_disable_caches=True):  # a cache hit would skip the pass
        yield


def _layer(eps: float, extra_user: bool = False):
    """Two norm -> quant pairs as in a decoder layer: add + RMSNorm (post-attention), then RMSNorm."""
    from vllm import _custom_ops as ops
    from vllm import ir

    def fn(x, residual, w):
        y, residual = ir.ops.fused_add_rms_norm(x, residual, w, eps)
        q1, s1, _ = ops.scaled_int8_quant(y.contiguous())
        y2 = ir.ops.rms_norm(residual, w, eps)
        q2, s2, _ = ops.scaled_int8_quant(y2)
        out = (q1, s1, residual, q2, s2)
        return (*out, y2 * 2) if extra_user else out
    return fn


def _inputs(tokens: int, dtype: torch.dtype, hidden: int = 64):
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    x[:, 3] *= 20  # an outlier channel
    return x, torch.randn(tokens, hidden, generator=g).to(dtype), (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)


def _run(fn, fusion_pass, dtype):
    torch._dynamo.reset()  # every _layer is one code object to dynamo
    compiled = _compile(fn, fusion_pass)
    before = fq.STATS["matched"]
    results = []
    for tokens in (7, 1, 33):  # the token count is dynamic, as in vLLM's graphs
        x, r, w = _inputs(tokens, dtype)
        torch._dynamo.maybe_mark_dynamic(x, 0)
        torch._dynamo.maybe_mark_dynamic(r, 0)
        results.append((fn(x, r.clone(), w), compiled(x, r.clone(), w)))
    return fq.STATS["matched"] - before, results


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_both_pairs_replaced_and_outputs_in_place(fusion_pass, dtype, eps):
    matched, results = _run(_layer(eps), fusion_pass, dtype)
    assert matched >= 2 and matched % 2 == 0  # both pairs, in every graph compiled (a recompile for dynamic M)
    for eager, compiled in results:
        for a, b in zip(eager, compiled, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_other_epsilon_not_replaced(fusion_pass):
    """The matcher ignores float arguments; the pass checks the norm's epsilon against the pattern's."""
    matched, _ = _run(_layer(1e-3), fusion_pass, torch.bfloat16)
    assert matched == 0


def test_norm_output_with_another_user_not_replaced(fusion_pass):
    """A norm whose output also feeds something else (a MoE router) keeps the unfused pair; the other pair fuses."""
    both, _ = _run(_layer(1e-5), fusion_pass, torch.bfloat16)
    matched, results = _run(_layer(1e-5, extra_user=True), fusion_pass, torch.bfloat16)
    assert matched >= 1 and 2 * matched == both  # one pair per compiled graph instead of two
    for eager, compiled in results:
        torch.testing.assert_close(compiled[-1], eager[-1], rtol=0, atol=0)


def test_model_epsilon_registered():
    from types import SimpleNamespace

    cfg = SimpleNamespace(model_config=SimpleNamespace(hf_text_config=SimpleNamespace(rms_norm_eps=3e-6)))
    assert fq._model_epsilons(cfg) == (1e-6, 3e-6, 1e-5)
    assert fq._model_epsilons(None) == (1e-6, 1e-5)


def test_cpu_engine_does_not_fuse():
    from vllm.config import VllmConfig

    asked = VllmConfig(additional_config={"smoothquant": {"fused_quant": True}})
    assert not fq.engine_fuses(asked)  # not CUDA: vLLM's quant kernel after the norm, even when asked
    assert not fq.engine_fuses(VllmConfig())
    assert not fq.engine_fuses(None)
