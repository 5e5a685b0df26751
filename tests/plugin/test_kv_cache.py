"""The KV-cache method's decisions and checks, on stand-in attention layers (the engine test,
tests/integration/test_engine_kv_cache.py, proves it is wired into vLLM's Attention)."""

import logging

import pytest
import torch

from vllm_smoothquant.format import KVCacheScheme, SmoothQuantFormat

KV = SmoothQuantFormat(kv_cache=KVCacheScheme("fp8_e4m3", "tensor"))
KV_HEAD = SmoothQuantFormat(kv_cache=KVCacheScheme("fp8_e4m3", "head"))
PLAIN = SmoothQuantFormat()
PREFIX = "model.layers.1.self_attn.attn"


class _Backend:
    def __init__(self, per_head: bool):
        self.per_head = per_head

    def supports_per_head_quant_scales(self) -> bool:
        return self.per_head


class _Layer(torch.nn.Module):
    """What the method reads and writes of vLLM's Attention: the cache dtype, KV heads, backend, scale buffers."""

    def __init__(self, kv_cache_dtype="fp8", num_kv_heads=2, per_head_backend=False):
        super().__init__()
        self.kv_cache_dtype, self.num_kv_heads = kv_cache_dtype, num_kv_heads
        self.attn_backend = _Backend(per_head_backend)
        for w in ("k", "v"):
            self.register_buffer(f"_{w}_scale", torch.tensor(1.0))
            setattr(self, f"_{w}_scale_float", 1.0)


def _method(fmt, layer, prefix=PREFIX):
    from vllm_smoothquant.config import SmoothQuantConfig
    from vllm_smoothquant.kv_cache import SmoothQuantKVCacheMethod

    m = SmoothQuantKVCacheMethod.for_layer(SmoothQuantConfig(fmt), fmt, layer, prefix)
    if m is not None:
        m.create_weights(layer)
    return m


def _load(layer, k, v):
    for w, t in (("k", k), ("v", v)):
        p = getattr(layer, f"{w}_scale")
        p.weight_loader(p, t)


def test_calibrated_scales_are_loaded():
    layer = _Layer()
    m = _method(KV, layer)
    _load(layer, torch.tensor([2.5]), torch.tensor([0.25]))
    m.process_weights_after_loading(layer)
    assert layer._k_scale.item() == 2.5 and layer._v_scale.item() == 0.25 and layer._k_scale.shape == ()
    assert (layer._k_scale_float, layer._v_scale_float) == (2.5, 0.25)
    assert not hasattr(layer, "k_scale")  # the load-time parameters are gone


@pytest.mark.parametrize("per_head_backend, want", [(True, [1.0, 3.0]), (False, [3.0])], ids=["fa3", "per-tensor"])
def test_per_head_scales_where_the_backend_takes_them_else_their_max(per_head_backend, want):
    layer = _Layer(per_head_backend=per_head_backend)
    m = _method(KV_HEAD, layer)
    _load(layer, torch.tensor([1.0, 3.0]), torch.tensor([0.5, 0.5]))
    m.process_weights_after_loading(layer)
    assert layer._k_scale.reshape(-1).tolist() == want and layer._k_scale_float == 3.0


@pytest.mark.parametrize(
    "scales, local, rank, tp, want",
    [
        ([1.0, 2.0, 3.0, 4.0], 2, 1, 2, [3.0, 4.0]),  # 4 kv heads over 2 ranks
        ([1.0, 2.0], 1, 3, 4, [2.0]),  # 2 kv heads over 4 ranks: each replicated on 2
        ([1.0, 2.0], 1, 1, 4, [1.0]),
    ],
)
def test_per_head_scales_follow_vllms_kv_head_sharding(scales, local, rank, tp, want):
    from vllm_smoothquant.kv_cache import select_scales

    assert select_scales(torch.tensor(scales), True, local, rank, tp).tolist() == want
    assert select_scales(torch.tensor(scales), False, local, rank, tp).tolist() == [max(scales)]


@pytest.mark.parametrize(
    "k, match",
    [
        (torch.tensor([float("nan")]), r"model.layers.1.self_attn.k_scale: KV-cache scale \[nan\] is not finite and > 0"),
        (torch.tensor([0.0]), r"model.layers.1.self_attn.k_scale: KV-cache scale \[0.0\] is not finite"),
        (torch.tensor([-1.0]), r"model.layers.1.self_attn.k_scale: KV-cache scale \[-1.0\]"),
        (torch.tensor([float("inf")]), r"model.layers.1.self_attn.k_scale: KV-cache scale \[inf\]"),
        (torch.tensor([1.0, 1.0]), r"model.layers.1.self_attn.k_scale: .*shape \[2\].*float32 \[1\]"),
        (torch.tensor([1.0], dtype=torch.bfloat16), r"model.layers.1.self_attn.k_scale: .*dtype torch.bfloat16"),
    ],
    ids=["nan", "zero", "negative", "inf", "shape", "dtype"],
)
def test_bad_scale_is_an_error_naming_the_checkpoint_tensor(k, match):
    from vllm_smoothquant.linear_method import CheckpointTensorError

    layer = _Layer()
    _method(KV, layer)
    with pytest.raises(CheckpointTensorError, match=match):
        layer.k_scale.weight_loader(layer.k_scale, k)


def test_declared_but_missing_scales_are_an_error_naming_them():
    from vllm_smoothquant.linear_method import CheckpointTensorError

    layer = _Layer()
    m = _method(KV, layer)
    layer.v_scale.weight_loader(layer.v_scale, torch.tensor([1.0]))
    with pytest.raises(CheckpointTensorError, match=r"model.layers.1.self_attn.k_scale: missing from the checkpoint"):
        m.process_weights_after_loading(layer)


def test_fp8_cache_without_calibrated_scales_warns_once_and_uses_1(caplog):
    layers = [_Layer(), _Layer()]
    with caplog.at_level(logging.WARNING):
        for i, layer in enumerate(layers):
            _method(PLAIN, layer, f"model.layers.{i}.self_attn.attn").process_weights_after_loading(layer)
    assert [layer._k_scale.item() for layer in layers] == [1.0, 1.0]
    warnings = [r.getMessage() for r in caplog.records if "k_scale = v_scale = 1.0" in r.getMessage()]
    assert len(warnings) == 1 and "no kv_cache" in warnings[0] and "--kv-cache fp8" in warnings[0]


def test_which_layers_get_the_method():
    from vllm_smoothquant.linear_method import CheckpointTensorError

    assert _method(PLAIN, _Layer("auto")) is None  # no scales, 16-bit cache: vLLM's own handling
    assert _method(PLAIN, _Layer("fp8_e5m2")) is None
    assert _method(PLAIN, _Layer("fp8_e4m3")) is not None
    layer = _Layer("bfloat16")  # scales in the checkpoint, 16-bit cache: loaded (Falcon needs a parameter), unused
    m = _method(KV, layer)
    _load(layer, torch.tensor([2.0]), torch.tensor([2.0]))
    m.process_weights_after_loading(layer)
    assert layer._k_scale.item() == 1.0
    with pytest.raises(CheckpointTensorError, match=r"fp8_e5m2 cannot use this checkpoint's KV-cache scales"):
        _method(KV, _Layer("fp8_e5m2"))


def test_kv_cache_scheme_makes_vllm_pick_fp8_for_checkpoints_with_scales():
    """vLLM's Attention turns --kv-cache-dtype auto into fp8 when the config's kv_cache_scheme is not None; its
    strategy stays 'tensor' so the backend choice is not narrowed to per-head-capable ones."""
    from vllm_smoothquant.config import SmoothQuantConfig
    from vllm_smoothquant.kv_cache import fp8_kv_cache_unsupported

    assert SmoothQuantConfig(PLAIN).kv_cache_scheme is None
    scheme = SmoothQuantConfig(KV_HEAD).kv_cache_scheme
    if fp8_kv_cache_unsupported():
        assert scheme is None
    else:
        assert scheme["strategy"] == "tensor" and scheme["type"] == "float" and scheme["num_bits"] == 8


def test_checkpoint_name_of_vllm_attention_layers():
    from vllm_smoothquant.kv_cache import checkpoint_name

    assert checkpoint_name("model.decoder.layers.0.self_attn.attn", "k") == "model.decoder.layers.0.self_attn.k_scale"
    assert checkpoint_name("transformer.h.2.self_attention.attn", "v") == "transformer.h.2.self_attention.v_scale"


def test_scales_stay_float32_in_a_bf16_model():
    """vLLM builds the model under torch's default dtype = the model dtype: the scales must not be rounded to it."""
    layer = _Layer()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        m = _method(KV, layer)
    finally:
        torch.set_default_dtype(old)
    assert layer.k_scale.dtype == torch.float32
    _load(layer, torch.tensor([0.0155]), torch.tensor([0.0039]))
    m.process_weights_after_loading(layer)
    assert layer._k_scale.item() == torch.tensor(0.0155).item()
