import pytest
import torch
from tiny_models import ARCHS, tiny_model

from vllm_smoothquant.format import KVCacheScheme
from vllm_smoothquant.offline.kv_stats import KVAbsmax, KVStatsError, kv_scale_tensors, record_kv
from vllm_smoothquant.offline.mappings import mapping_for
from vllm_smoothquant.offline.streaming import capture_layer_inputs, run_layer

ARCH_IDS = lambda a: a.removesuffix("ForCausalLM")  # noqa: E731
# The decoder layer's attention module (whose <name>.k_scale vLLM loads into <name>.attn), per architecture.
ATTENTION = {"BloomForCausalLM": "self_attention", "FalconForCausalLM": "self_attention",
             "GPTNeoXForCausalLM": "attention"}


def _attention(arch: str) -> str:
    return ATTENTION.get(arch, "self_attn")


def _windows():
    return torch.randint(3, 512, (3, 40), generator=torch.Generator().manual_seed(3)).tolist()


@torch.no_grad()
def _cache_absmax(model, windows) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Reference: per layer, per KV head max |K| and |V| of what the model's own DynamicCache holds after a
    whole-model forward of each window (K after RoPE and q/k norms, before repeat_kv)."""
    per_layer = None
    for w in windows:
        cache = model(torch.tensor([w]), use_cache=True).past_key_values
        got = [(layer.keys.abs().amax(dim=(0, 2, 3)), layer.values.abs().amax(dim=(0, 2, 3))) for layer in cache.layers]
        per_layer = got if per_layer is None else [
            (torch.maximum(k0, k), torch.maximum(v0, v)) for (k0, v0), (k, v) in zip(per_layer, got)]
    return per_layer


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_recorded_kv_absmax_equals_what_the_cache_holds(arch):
    """Layer-by-layer replay (as the quantize loop runs it) under record_kv records, per KV head, the max |K| and
    |V| that the model's own KV cache receives; the layers' outputs are unchanged by the recording."""
    model = tiny_model(arch, layers=2)
    windows = _windows()
    want = _cache_absmax(model, windows)

    mapping = mapping_for(model.config)
    layers = model.get_submodule(mapping.layers)
    inputs = capture_layer_inputs(model, layers, windows, "cpu", torch.float32, mapping.layer_returns_tuple, 2)
    hidden = inputs.hidden
    for i, layer in enumerate(layers):
        plain = run_layer(layer, hidden, inputs.kwargs[i])
        with record_kv(layer.get_submodule(_attention(arch))) as kv:
            hidden = run_layer(layer, hidden, inputs.kwargs[i])
        for a, b in zip(hidden, plain):
            assert torch.equal(a, b)
        k, v = want[i]
        assert kv.k.shape == k.shape and kv.v.shape == v.shape  # one value per KV head
        torch.testing.assert_close(kv.k, k, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(kv.v, v, rtol=1e-5, atol=1e-6)


def test_k_is_recorded_after_the_rotary_embedding():
    """The statistics are those of the cache input, not of k_proj's output (RoPE changes the per-head max)."""
    model = tiny_model("LlamaForCausalLM", layers=1)
    attn = model.model.layers[0].self_attn
    proj = {}
    h = attn.k_proj.register_forward_hook(lambda _m, _i, out: proj.update(k=out))
    with record_kv(attn) as kv:
        model(torch.tensor(_windows()[:1]))
    h.remove()
    pre_rope = proj["k"].view(*proj["k"].shape[:2], -1, attn.head_dim).abs().amax(dim=(0, 1, 3))
    assert not torch.allclose(kv.k, pre_rope, rtol=1e-3)


def test_hook_is_removed_on_exit():
    model = tiny_model("OPTForCausalLM", layers=1)
    attn = model.model.decoder.layers[0].self_attn
    with record_kv(attn) as kv:
        model(torch.tensor(_windows()[:1]))
    first = kv.k.clone()
    model(torch.tensor([[5] * 40]))
    assert torch.equal(kv.k, first)


def test_module_without_a_kv_cache_is_a_clear_error():
    with pytest.raises(KVStatsError, match="Linear.forward takes none of"):
        with record_kv(torch.nn.Linear(4, 4)):
            pass


@pytest.mark.parametrize("strategy", ["tensor", "head"])
def test_scale_tensors_names_shapes_and_values(strategy):
    kv = KVAbsmax(k=torch.tensor([448.0, 896.0]), v=torch.tensor([0.0, 44.8]))
    got = kv_scale_tensors("model.layers.3.self_attn", kv, KVCacheScheme("fp8_e4m3", strategy))
    assert sorted(got) == ["model.layers.3.self_attn.k_scale", "model.layers.3.self_attn.v_scale"]
    k, v = got["model.layers.3.self_attn.k_scale"], got["model.layers.3.self_attn.v_scale"]
    assert k.dtype == v.dtype == torch.float32
    if strategy == "head":
        assert k.tolist() == [1.0, 2.0]
        assert v[0].item() == pytest.approx(1e-6) and v[1].item() == pytest.approx(0.1)  # a dead head: the floor
    else:
        assert k.tolist() == [2.0] and v.tolist() == [pytest.approx(0.1)]


def test_scale_tensors_without_a_recorded_pass_is_an_error():
    with pytest.raises(KVStatsError, match="model.layers.0.self_attn: no K/V was recorded"):
        kv_scale_tensors("model.layers.0.self_attn", KVAbsmax(), KVCacheScheme())
