"""A real vLLM engine (CPU: oneDNN int8 kernels; CUDA: CUTLASS) loading CLI-made checkpoints. No mocks."""

from __future__ import annotations

import gc
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from reference import load_fake_quant_model, prompt_logprobs
from safetensors.torch import load_file, save_file
from tiny_models import calib_text, save_tiny

pytestmark = pytest.mark.engine
ARCHS = ["OPTForCausalLM", "LlamaForCausalLM"]
ENGINE = dict(max_model_len=256, enforce_eager=True, gpu_memory_utilization=0.1, enable_prefix_caching=False,
              seed=0)
# Comparisons with the fp32 fake-quant reference run the engine in fp32 too (the CPU int8 kernel takes fp32
# activations); bf16 activations flip more int8 roundings (Qwen2 all-pairs: mean |d| 0.064, max 0.35).
EXACT = dict(ENGINE, dtype="float32")
TOL_MEAN, TOL_MAX = 0.03, 0.15  # measured in fp32: OPT 0.015 / 0.066, Llama 0.011 / 0.053, Qwen2 0.001 / 0.052


def _cli_quantize(model: Path, out: Path, calib: Path, *extra: str) -> Path:
    cli = Path(sys.executable).with_name("vllm-smoothquant")  # the console script of this environment
    cmd = [str(cli), "quantize", str(model), str(out), "--calib", str(calib), "--num-samples", "8",
           "--seq-len", "64", *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    calib = calib_text(root / "calib.txt")
    return {a: _cli_quantize(save_tiny(a, root / a, hidden=128), root / f"{a}-sq", calib) for a in ARCHS}


@pytest.fixture(scope="module", params=ARCHS, ids=lambda a: a.removesuffix("ForCausalLM"))
def engine(request, ckpts):
    from vllm import LLM

    llm = LLM(model=str(ckpts[request.param]), quantization="smoothquant", **EXACT)
    yield request.param, ckpts[request.param], llm
    del llm
    gc.collect()


def _vllm_prompt_logprobs(llm, prompts):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=False)
    return [torch.tensor([o.prompt_logprobs[t][p[t]].logprob for t in range(1, len(p))]) for o, p in zip(outs, prompts)]


def _reference_diff(ckpt: Path, got: list[torch.Tensor], prompts: list[list[int]]) -> torch.Tensor:
    """|vLLM prompt logprob - fp32 fake-quant reference logprob| over all predicted tokens."""
    ref_model = load_fake_quant_model(ckpt)
    return torch.cat([a - prompt_logprobs(ref_model, p) for a, p in zip(got, prompts)]).abs()


def test_every_decoder_linear_uses_smoothquant(engine):
    from vllm_smoothquant.linear_method import quant_methods

    arch, _, llm = engine
    methods = llm.apply_model(quant_methods)[0]
    decoder = {n: m for n, m in methods.items() if ".layers." in n or ".h." in n}
    assert len(decoder) == 2 * 4  # per layer: qkv, o, gate_up | fc1, down | fc2
    assert set(decoder.values()) == {"SmoothQuantLinearMethod"}


def test_prompt_logprobs_match_fake_quant_reference(engine):
    arch, ckpt, llm = engine
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 512, (4, 48), generator=g).tolist()
    diff = _reference_diff(ckpt, _vllm_prompt_logprobs(llm, prompts), prompts)
    assert diff.mean() < TOL_MEAN and diff.max() < TOL_MAX, (diff.mean(), diff.max())


def test_checkpoint_loads_without_quantization_flag(ckpts):
    """quant_method: smoothquant in config.json is picked up with no --quantization."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(ckpts["LlamaForCausalLM"]), **ENGINE)
    assert llm.llm_engine.vllm_config.model_config.quantization == "smoothquant"
    assert len(llm.generate(["the of and"], SamplingParams(max_tokens=4), use_tqdm=False)[0].outputs[0].token_ids)
    del llm
    gc.collect()


def _break(ckpt: Path, dst: Path, how: str) -> Path:
    shutil.copytree(ckpt, dst)
    sd = load_file(dst / "model.safetensors")
    n = "model.layers.1.self_attn.k_proj"
    if how == "missing-scale":
        del sd[f"{n}.weight_scale"]
    elif how == "bf16-weight":
        sd[f"{n}.weight"] = sd[f"{n}.weight"].to(torch.bfloat16)
    elif how == "nan-scale":
        sd[f"{n}.weight_scale"][3] = float("nan")
    elif how == "zero-scale":
        sd[f"{n}.weight_scale"][0] = 0.0
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing-scale", "model.layers.1.self_attn.qkv_proj.weight_scale: missing from the checkpoint"),
        ("bf16-weight", "model.layers.1.self_attn.qkv_proj.weight (shard 'k'): checkpoint tensor has dtype torch.bfloat16"),
        ("nan-scale", "qkv_proj.weight_scale: missing from the checkpoint or holds NaN"),
        ("zero-scale", "qkv_proj.weight_scale: missing from the checkpoint or holds NaN/inf/zero"),
    ],
    ids=lambda v: v if " " not in v else "",
)
def test_malformed_checkpoint_fails_at_load_naming_the_tensor(ckpts, tmp_path, how, message):
    bad = _break(ckpts["LlamaForCausalLM"], tmp_path / how, how)
    code = textwrap.dedent(f"""
        from vllm import LLM
        if __name__ == "__main__":
            LLM(model={str(bad)!r}, quantization="smoothquant", **{ENGINE!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr


FAMILIES = ["MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM", "BloomForCausalLM",
            "FalconForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"]


@pytest.mark.parametrize("arch", FAMILIES, ids=lambda a: a.removesuffix("ForCausalLM"))
def test_more_families_serve_with_all_smoothing_pairs(arch, tmp_path):
    """Mistral, Qwen2 (qkv bias), Qwen3 (q/k norms): every pair (incl. v->o, up->down) smoothed by default;
    Phi-3: fused qkv_proj / gate_up_proj in the checkpoint, split into vLLM's fused layers by its loader;
    Gemma: norms with gain 1 + w, folded in bf16 storage exactly (storable_norm_scales)."""
    from vllm import LLM

    from vllm_smoothquant.linear_method import quant_methods

    ckpt = _cli_quantize(save_tiny(arch, tmp_path / arch, hidden=128), tmp_path / "sq", calib_text(tmp_path / "c.txt"))
    llm = LLM(model=str(ckpt), quantization="smoothquant", **EXACT)
    methods = llm.apply_model(quant_methods)[0]
    prompts = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(0)).tolist()
    got = _vllm_prompt_logprobs(llm, prompts)
    del llm
    gc.collect()
    assert {m for n, m in methods.items() if ".layers." in n or ".h." in n} == {"SmoothQuantLinearMethod"}
    diff = _reference_diff(ckpt, got, prompts)
    assert diff.mean() < TOL_MEAN and diff.max() < TOL_MAX, (diff.mean(), diff.max())


@pytest.mark.parametrize("override", [None, "down_proj=token"], ids=["all-static", "down_proj-per-token"])
def test_static_activation_scales_serve(ckpts, tmp_path, override):
    """--activations static: calibrated per-tensor input_scale, loaded and used by vLLM's int8 kernel;
    with an override, down_proj runs dynamic per-token beside the static layers."""
    from vllm import LLM

    src = ckpts["LlamaForCausalLM"].parent / "LlamaForCausalLM"
    extra = ["--activation-override", override] if override else []
    ckpt = _cli_quantize(src, tmp_path / "static", calib_text(tmp_path / "c.txt"), "--activations", "static", *extra)
    sd = load_file(ckpt / "model.safetensors")
    assert "model.layers.0.self_attn.o_proj.input_scale" in sd
    assert ("model.layers.0.mlp.down_proj.input_scale" in sd) == (override is None)
    llm = LLM(model=str(ckpt), quantization="smoothquant", **EXACT)
    prompts = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(0)).tolist()
    got = _vllm_prompt_logprobs(llm, prompts)
    del llm
    gc.collect()
    diff = _reference_diff(ckpt, got, prompts)
    assert diff.mean() < TOL_MEAN and diff.max() < TOL_MAX, (diff.mean(), diff.max())
