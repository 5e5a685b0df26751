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


def _rotated_checkpoint(tmp_path, block=64, sharded=False):
    """A format-3 checkpoint directory whose two layers' down_proj are rotated (headers are all convert reads)."""
    from vllm_smoothquant.format import RotationScheme

    src = tmp_path / "sq"
    src.mkdir()
    fmt = SmoothQuantFormat(rotation=RotationScheme(targets=("mlp.down_proj",), block_size=block))
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                 "quantization_config": fmt.to_dict()}))
    tensors = {f"model.layers.{i}.mlp.{n}.weight": torch.zeros(2, 2 * block, dtype=torch.int8)
               for i in range(2) for n in ("up_proj", "down_proj")}
    save_file(tensors, src / "model.safetensors")
    if sharded:
        (src / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {n: "model.safetensors" for n in tensors}}))
    return src


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "indexed"])
def test_a_rotated_checkpoint_gets_compressed_tensors_transform_config(tmp_path, sharded):
    """vLLM's CompressedTensorsConfig parses the transform_config and finds an online `input` Hadamard of head_dim
    = block on every down_proj (and on nothing else); the matrices it loads are where it looks for them."""
    from compressed_tensors.transform import deterministic_hadamard_matrix
    from safetensors.torch import load_file
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
    from vllm.model_executor.layers.quantization.compressed_tensors.transform.linear import get_schemes_args

    src, dst = _rotated_checkpoint(tmp_path, sharded=sharded), tmp_path / "ct"
    to_compressed_tensors(src, dst)
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    vllm_cfg = CompressedTensorsConfig.from_config(qc)
    online = [(name, s, a) for name, s, a in get_schemes_args(vllm_cfg.transform_config) if a.is_online()]
    assert [(name, s.type, s.head_dim, a.location) for name, s, a in online] == [("R4", "hadamard", 64, "input")]
    from compressed_tensors.utils import is_match

    assert is_match("model.layers.1.mlp.down_proj", torch.nn.Linear(1, 1), online[0][2].targets)
    assert not is_match("model.layers.1.mlp.up_proj", torch.nn.Linear(1, 1), online[0][2].targets)
    t = load_file(dst / "transforms.safetensors")
    assert sorted(t) == [f"model.layers.{i}.mlp.down_proj.R4_input.weight" for i in range(2)]
    assert all(torch.equal(v, deterministic_hadamard_matrix(64, torch.float32)) for v in t.values())
    if sharded:  # vLLM loads only what the index lists
        wm = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
        assert {wm[n] for n in t} == {"transforms.safetensors"} and len(wm) == 4 + 2
        assert "R4" not in (src / "model.safetensors.index.json").read_text()  # the source is untouched


def test_compressed_tensors_hadamard_transform_is_the_plugins_rotation():
    """compressed-tensors' own HadamardTransform for this config (what vLLM's dense path and hadacore compute:
    x @ S_b / sqrt(b) block by block) equals the plugin's and the quantizer's rotation, on the input and, for the
    folded `weight_input` with inverse, on the weight."""
    from compressed_tensors.transform import TransformFactory

    from vllm_smoothquant.format import RotationScheme
    from vllm_smoothquant.offline.convert import transform_config
    from vllm_smoothquant.rotation import InputRotation, rotate

    cfg = transform_config(SmoothQuantFormat(rotation=RotationScheme(targets=("mlp.down_proj",), block_size=64)))
    scheme = cfg.config_groups["R4"]
    linear = torch.nn.Linear(256, 8, bias=False)
    factory = TransformFactory.from_scheme(scheme, name="R4")
    x = torch.randn(5, 256, dtype=torch.float64).float()
    on_input = factory.create_transform(linear, scheme.apply[0])
    assert torch.allclose(on_input(x), rotate(x, 64), atol=1e-6)
    assert torch.allclose(on_input(x), InputRotation(64)(x), atol=1e-6)
    on_weight = factory.create_transform(linear, scheme.apply[1])
    assert torch.allclose(on_weight(linear.weight.data), rotate(linear.weight.data, 64), atol=1e-6)


def test_a_rotated_checkpoint_without_its_targets_is_refused(tmp_path):
    from vllm_smoothquant.format import FormatError

    src = _rotated_checkpoint(tmp_path)
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(1)}, src / "model.safetensors")
    with pytest.raises(FormatError, match=r"targets \['mlp.down_proj'\], but no safetensors file holds"):
        to_compressed_tensors(src, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
