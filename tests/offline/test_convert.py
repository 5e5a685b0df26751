"""convert: compressed-tensors' kv_cache_scheme, and KV-cache scale names stock vLLM loads."""

import json

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import ARCHS, tiny_config

from vllm_smoothquant.format import KVCacheScheme, SmoothQuantFormat
from vllm_smoothquant.offline.convert import compressed_tensors_config, to_compressed_tensors
from vllm_smoothquant.offline.kv_stats import KVAbsmax, kv_scale_tensors
from vllm_smoothquant.offline.mappings import mapping_for

# The decoder layer's attention module, per architecture (vLLM's attention layer is its `.attn`).
ATTENTION = {"BloomForCausalLM": "self_attention", "FalconForCausalLM": "self_attention"}


@pytest.mark.parametrize("strategy, ct", [("tensor", "tensor"), ("head", "attn_head")])
def test_kv_cache_scheme_parses_with_compressed_tensors_and_vllm(strategy, ct):
    from compressed_tensors.quantization import QuantizationConfig
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
        CompressedTensorsKVCacheMethod,
    )

    cfg = compressed_tensors_config(SmoothQuantFormat(kv_cache=KVCacheScheme("fp8_e4m3", strategy)), 2)
    parsed = QuantizationConfig.model_validate(json.loads(json.dumps(cfg)))
    kv = parsed.kv_cache_scheme
    assert (kv.num_bits, kv.type, kv.strategy, kv.symmetric, kv.dynamic) == (8, "float", ct, True, False)
    vllm_cfg = CompressedTensorsConfig.from_config(json.loads(json.dumps(cfg)))
    assert vllm_cfg.kv_cache_scheme["strategy"] == ct
    CompressedTensorsKVCacheMethod.validate_kv_cache_scheme(vllm_cfg.kv_cache_scheme)  # raises if vLLM can't
    assert "kv_cache_scheme" not in compressed_tensors_config(SmoothQuantFormat())


def test_one_kv_head_is_written_per_tensor():
    """Falcon-7B (multi-query): per-head == per-tensor, and stock vLLM cannot count Falcon's KV heads for attn_head."""
    cfg = compressed_tensors_config(SmoothQuantFormat(kv_cache=KVCacheScheme("fp8_e4m3", "head")), 1)
    assert cfg["kv_cache_scheme"]["strategy"] == "tensor"


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.removesuffix("ForCausalLM"))
def test_stock_vllm_maps_the_scale_names_to_its_attention_layer(arch):
    """The names kv_scale_tensors writes become `<attention module>.attn.k_scale` under stock vLLM's
    KV-cache scale mapper (what AutoWeightsLoader applies for every quant config, compressed-tensors included)."""
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig

    attention = f"{mapping_for(tiny_config(arch)).layers}.3.{ATTENTION.get(arch, 'self_attn')}"
    names = kv_scale_tensors(attention, KVAbsmax(torch.ones(2), torch.ones(2)), KVCacheScheme())
    mapper = CompressedTensorsConfig.get_cache_scale_mapper()
    assert sorted(mapper._map_name(n) for n in names) == [f"{attention}.attn.k_scale", f"{attention}.attn.v_scale"]


def test_convert_writes_kv_cache_scheme_and_keeps_the_scales(tmp_path):
    src, dst = tmp_path / "sq", tmp_path / "ct"
    src.mkdir()
    fmt = SmoothQuantFormat(kv_cache=KVCacheScheme("fp8_e4m3", "head"))
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                 "quantization_config": fmt.to_dict()}))
    scales = {"model.layers.0.self_attn.k_scale": torch.tensor([0.5, 2.0]),
              "model.layers.0.self_attn.v_scale": torch.tensor([0.25, 1.0])}
    save_file(scales, src / "model.safetensors")
    to_compressed_tensors(src, dst)
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["kv_cache_scheme"]["strategy"] == "attn_head"
    assert (dst / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def test_a_rotated_checkpoint_is_refused_before_anything_is_written(tmp_path):
    """compressed-tensors' transform_config is not written yet: stock vLLM must not get rotated weights alone."""
    from vllm_smoothquant.format import FormatError, RotationScheme

    src, dst = tmp_path / "sq", tmp_path / "ct"
    src.mkdir()
    fmt = SmoothQuantFormat(rotation=RotationScheme(targets=("mlp.down_proj",), block_size=64))
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                 "quantization_config": fmt.to_dict()}))
    save_file({"x": torch.zeros(1)}, src / "model.safetensors")
    with pytest.raises(FormatError, match=r"rotates the input of \['mlp.down_proj'\].*re-quantize with --rotate none"):
        to_compressed_tensors(src, dst)
    assert not dst.exists()
