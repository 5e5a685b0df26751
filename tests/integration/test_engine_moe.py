"""Mixtures of experts in a real vLLM engine: CLI-made Mixtral / Qwen3-MoE / Qwen2-MoE / GLM-4.5 (layer 0 dense, sigmoid
router with correction bias, shared expert) checkpoints served with int8
experts (vLLM's int8 fused-MoE kernel, or the per-expert int8 linear path where the CPU has none), against the fp32
fake-quant reference (tests/reference.py). One engine per family, shared by its tests."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import load_fake_quant_model, prompt_logprobs
from tiny_models import MOE_ARCHS, calib_text, save_tiny

from vllm_smoothquant.offline import harness

pytestmark = [pytest.mark.engine, pytest.mark.skipif(
    not torch.cpu._is_avx512_supported(),
    reason="oneDNN's int8 GEMM is inexact on CPUs without AVX-512 (AVX2 only): no reference comparison")]
EXACT = dict(max_model_len=256, enforce_eager=True, gpu_memory_utilization=0.1, enable_prefix_caching=False, seed=0,
             dtype="float32")
TOL_MEAN, TOL_MAX = 0.03, 0.15  # as the dense engine tests (tests/integration/test_engine.py)
MOE_METHODS = {"SmoothQuantMoEMethod", "SmoothQuantExpertLoopMoEMethod"}


def _cli_quantize(model: Path, out: Path, calib: Path) -> Path:
    cli = Path(sys.executable).with_name("vllm-smoothquant")
    subprocess.run([str(cli), "quantize", str(model), str(out), "--calib", str(calib), "--num-samples", "8",
                    "--seq-len", "64"], check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="module", params=MOE_ARCHS, ids=lambda a: a.removesuffix("ForCausalLM"))
def engine(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    ckpt = _cli_quantize(save_tiny(arch, root / "model", hidden=128), root / "sq", calib_text(root / "calib.txt"))
    # Mixtral's engine also asks for the CUDA-only int32 expert kernel (moe_int8.py): on the CPU the option is
    # validated and declined with a warning, and the experts below still match the reference
    extra = {"additional_config": {"smoothquant": {"moe_kernel": "int32_acc"}}} if arch == "MixtralForCausalLM" else {}
    llm = harness.make_llm(str(ckpt), "smoothquant", **EXACT, **extra)
    yield arch, ckpt, llm
    del llm
    gc.collect()


def test_experts_are_int8_and_routers_stay_unquantized(engine):
    from vllm_smoothquant.linear_method import quant_methods
    from vllm_smoothquant.moe_method import moe_quant_methods

    arch, _, llm = engine
    moe = llm.apply_model(moe_quant_methods)[0]
    moe_layers = 1 if arch == "Glm4MoeForCausalLM" else 2  # GLM-4.5's layer 0 is dense (first_k_dense_replace)
    assert len(moe) == moe_layers and set(moe.values()) <= MOE_METHODS, moe  # one experts layer per MoE layer
    linears = llm.apply_model(quant_methods)[0]
    routers = {n: m for n, m in linears.items() if n.endswith((".gate", ".shared_expert_gate"))}
    assert routers and set(routers.values()) == {"UnquantizedLinearMethod"}, routers
    attention = {n: m for n, m in linears.items() if ".self_attn." in n or ".shared_expert" in n or
                 ".layers.0.mlp." in n and moe_layers == 1}  # + the dense layer's MLP
    assert attention and set(attention.values()) == {"SmoothQuantLinearMethod"}, attention


def test_prompt_logprobs_and_greedy_tokens_match_fake_quant_reference(engine):
    arch, ckpt, llm = engine
    prompts = torch.randint(3, 512, (4, 48), generator=torch.Generator().manual_seed(0)).tolist()
    got = harness.greedy(llm, prompts, max_tokens=4, prompt_logprobs=True)
    ref = load_fake_quant_model(ckpt)
    diff = torch.cat([torch.tensor(g.prompt_logprobs) - prompt_logprobs(ref, p) for g, p in zip(got, prompts)]).abs()
    print(f"{arch}: mean {diff.mean():.4f} max {diff.max():.4f}")
    assert diff.mean() < TOL_MEAN and diff.max() < TOL_MAX, (diff.mean(), diff.max())
    with torch.no_grad():
        first = [int(ref(torch.tensor([p])).logits[0, -1].argmax()) for p in prompts]
    assert sum(g.token_ids[0] == f for g, f in zip(got, first)) >= 3, ([g.token_ids[0] for g in got], first)
