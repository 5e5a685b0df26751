"""Mixtures of experts in a real vLLM engine: CLI-made Mixtral / Qwen3-MoE / Qwen2-MoE / GLM-4.5 (layer 0 dense, sigmoid
router with correction bias, shared expert) checkpoints served with int8
experts (vLLM's int8 fused-MoE kernel, or the per-expert int8 linear path where the CPU has none), against the fp32
fake-quant reference (tests/reference.py). One engine per family, shared by its tests.

Mixtral's checkpoint is also served as a compressed-tensors checkpoint in llm-compressor's schema with
``--quantization smoothquant`` (issue 24): equal to the native one, which needs no exact int8, so on CPUs without
AVX-512 Mixtral's engine still starts (the reference comparison skips) and the other families do not."""

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

pytestmark = pytest.mark.engine
EXACT_INT8 = torch.cpu._is_avx512_supported()
needs_exact_int8 = pytest.mark.skipif(
    not EXACT_INT8, reason="oneDNN's int8 GEMM is inexact on CPUs without AVX-512 (AVX2 only): no reference comparison")
ENGINE_ARCHS = MOE_ARCHS if EXACT_INT8 else ("MixtralForCausalLM",)  # Mixtral's for the compressed-tensors test
EXACT = dict(max_model_len=256, enforce_eager=True, gpu_memory_utilization=0.1, enable_prefix_caching=False, seed=0,
             dtype="float32")
TOL_MEAN, TOL_MAX = 0.03, 0.15  # as the dense engine tests (tests/integration/test_engine.py)
MOE_METHODS = {"SmoothQuantMoEMethod", "SmoothQuantExpertLoopMoEMethod"}


def _cli_quantize(model: Path, out: Path, calib: Path) -> Path:
    cli = Path(sys.executable).with_name("vllm-smoothquant")
    # without exact int8 only the compressed-tensors equality runs, which any α serves: a fixed α instead of the
    # default search (measured here for the tiny Mixtral: 32 s instead of 142 s on 2 shared cores)
    alpha = [] if EXACT_INT8 else ["--alpha", "0.8"]
    subprocess.run([str(cli), "quantize", str(model), str(out), "--calib", str(calib), "--num-samples", "8",
                    "--seq-len", "64", *alpha], check=True, capture_output=True, text=True)
    return out


def _extra(arch: str) -> dict:
    # Mixtral's engine also asks for the CUDA-only int32 expert kernel (moe_int8.py): on the CPU the option is
    # validated and declined with a warning, and the experts below still match the reference
    return {"additional_config": {"smoothquant": {"moe_kernel": "int32_acc"}}} if arch == "MixtralForCausalLM" else {}


@pytest.fixture(scope="module", params=ENGINE_ARCHS, ids=lambda a: a.removesuffix("ForCausalLM"))
def engine(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    ckpt = _cli_quantize(save_tiny(arch, root / "model", hidden=128), root / "sq", calib_text(root / "calib.txt"))
    llm = harness.make_llm(str(ckpt), "smoothquant", **EXACT, **_extra(arch))
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


@needs_exact_int8
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


def test_compressed_tensors_checkpoint_serves_like_the_native_one(engine, tmp_path):
    """The native checkpoint's tensors under llm-compressor's W8A8 config (router ignored by its ``re:`` pattern),
    served with ``--quantization smoothquant``: experts through the plugin's MoE method, attention through its
    linear method, routers unquantized, and bit-equal prompt logprobs (same int8 tensors and scales, same kernels)."""
    import json

    from ct_schema import llmcompressor_w8a8, with_quantization_config

    from vllm_smoothquant.linear_method import quant_methods
    from vllm_smoothquant.moe_method import moe_quant_methods

    arch, ckpt, llm = engine
    if arch != "MixtralForCausalLM":
        pytest.skip("one compressed-tensors MoE engine (Mixtral's); the translation is per family-independent")
    native = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert native.get("rotation") is None and native["activations"]["dynamic"]  # what llm-compressor's preset holds
    ct = with_quantization_config(ckpt, tmp_path / "ct", llmcompressor_w8a8(ignore=["lm_head",
                                                                                    "re:.*block_sparse_moe.gate$"]))
    prompts = torch.randint(3, 512, (4, 48), generator=torch.Generator().manual_seed(1)).tolist()
    want = harness.prompt_logprobs(llm, prompts)
    ct_llm = harness.make_llm(str(ct), "smoothquant", **EXACT, **_extra(arch))
    try:
        assert ct_llm.llm_engine.vllm_config.model_config.quantization == "smoothquant"
        assert ct_llm.apply_model(moe_quant_methods)[0] == llm.apply_model(moe_quant_methods)[0]
        assert ct_llm.apply_model(quant_methods)[0] == llm.apply_model(quant_methods)[0]
        got = harness.prompt_logprobs(ct_llm, prompts)
    finally:
        del ct_llm
        gc.collect()
    assert got == want  # bit-equal
