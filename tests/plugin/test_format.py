import copy

import pytest

from vllm_smoothquant.format import (
    FP8_E4M3_MAX,
    ActivationScheme,
    FormatError,
    KVCacheScheme,
    SmoothQuantFormat,
    WeightScheme,
    kv_scale,
)

GOOD = SmoothQuantFormat().to_dict()


STATIC = ActivationScheme("tensor", dynamic=False)


def test_round_trip():
    fmt = SmoothQuantFormat(weights=WeightScheme("tensor"), activations=STATIC, alpha=0.7,
                            ignore=("lm_head", "model.layers.0.mlp.down_proj"),
                            activation_overrides={"down_proj": ActivationScheme()})
    assert SmoothQuantFormat.from_dict(fmt.to_dict()) == fmt


@pytest.mark.parametrize(
    "module, expected",
    [
        ("model.layers.0.self_attn.q_proj", "static"),
        ("model.layers.0.mlp.down_proj", "token"),
        ("model.layers.3.mlp.down_proj", "static"),  # the longer key wins
        ("model.layers.0.mlp.not_down_proj", "static"),  # keys match whole dotted components
    ],
    ids=lambda v: v if "." in v else None,
)
def test_activation_overrides_match_name_suffixes(module, expected):
    fmt = SmoothQuantFormat(activations=STATIC,
                            activation_overrides={"down_proj": ActivationScheme(), "layers.3.mlp.down_proj": STATIC})
    assert ("token" if fmt.activations_for(module).dynamic else "static") == expected


def _with(path, value):
    root = copy.deepcopy(GOOD)
    *parents, last = path
    d = root
    for p in parents:
        d = d[p]
    if value is KeyError:
        del d[last]
    else:
        d[last] = value
    return root


@pytest.mark.parametrize(
    "path, value, match",
    [
        (("format_version",), 4, "format_version.*reads versions 1 to 3.*upgrade"),
        (("format_version",), "1", "format_version.*upgrade"),
        (("format_version",), KeyError, "missing the key 'format_version'"),
        (("quant_method",), "gptq", "expected 'smoothquant'"),
        (("weights",), KeyError, "missing the key 'weights'"),
        (("weights", "strategy"), "group", r"\['weights'\]\['strategy'\].*'channel', 'tensor'"),
        (("weights", "num_bits"), 4, "int8 only"),
        (("activations", "strategy"), "block", r"\['activations'\]\['strategy'\]"),
        (("activations", "dynamic"), KeyError, "missing the key 'dynamic'"),
        (("activations", "dynamic"), False, "static activation scales are per tensor"),
        (("activations", "symmetric"), False, "no zero points"),
        (("alpha",), 1.5, r"alpha.*\[0, 1\]"),
        (("ignore",), "lm_head", "list of module names"),
        (("activation_overrides",), ["down_proj"], "module-name suffixes"),
        (("activation_overrides",), {"down_proj": "token"}, r"\['activation_overrides'\]\['down_proj'\] must be an object"),
        (("activation_overrides",), {"down_proj": {"num_bits": 8, "strategy": "token", "dynamic": False}},
         r"\['activation_overrides'\]\['down_proj'\]: static activation scales are per tensor"),
    ],
    ids=lambda v: ".".join(v) if isinstance(v, tuple) else None,
)
def test_malformed_configs_name_the_key(path, value, match):
    with pytest.raises(FormatError, match=match):
        SmoothQuantFormat.from_dict(_with(path, value))


def test_version_1_config_is_read_and_written_as_version_1():
    """A checkpoint without kv_cache stays format 1, so older plugins keep loading it; kv_cache makes it 2."""
    v1 = copy.deepcopy(GOOD)
    assert v1["format_version"] == 1 and "kv_cache" not in v1
    assert SmoothQuantFormat.from_dict(v1).kv_cache is None
    fmt = SmoothQuantFormat(kv_cache=KVCacheScheme("fp8_e4m3", "head"))
    d = fmt.to_dict()
    assert d["format_version"] == 2 and d["kv_cache"] == {"dtype": "fp8_e4m3", "strategy": "head"}
    assert SmoothQuantFormat.from_dict(d) == fmt
    assert SmoothQuantFormat.from_dict({**d, "kv_cache": None}).kv_cache is None


KV = {**GOOD, "format_version": 2, "kv_cache": {"dtype": "fp8_e4m3", "strategy": "tensor"}}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"format_version": 1}, r"\['kv_cache'\] needs format_version 2"),
        ({"kv_cache": {"dtype": "int8", "strategy": "tensor"}}, r"\['kv_cache'\]\['dtype'\] = 'int8'.*'fp8_e4m3'"),
        ({"kv_cache": {"dtype": "fp8_e4m3", "strategy": "token"}}, r"\['kv_cache'\]\['strategy'\].*'tensor', 'head'"),
        ({"kv_cache": {"dtype": "fp8_e4m3"}}, r"\['kv_cache'\] is missing the key 'strategy'"),
        ({"kv_cache": {"dtype": "fp8_e4m3", "strategy": "tensor", "scale": 1}}, r"unknown key\(s\) \['scale'\]"),
        ({"kv_cache": "fp8"}, r"\['kv_cache'\] must be null or an object"),
    ],
    ids=["v1-with-kv", "dtype", "strategy", "missing-strategy", "unknown-key", "not-object"],
)
def test_malformed_kv_cache_names_the_key(change, match):
    with pytest.raises(FormatError, match=match):
        SmoothQuantFormat.from_dict({**KV, **change})


def test_kv_scale_maps_the_absmax_to_e4m3_max_with_a_floor():
    import torch

    assert kv_scale(torch.tensor([896.0, 4.48])).tolist() == pytest.approx([2.0, 0.01])
    assert FP8_E4M3_MAX == torch.finfo(torch.float8_e4m3fn).max
    assert kv_scale(torch.tensor([0.0])).item() > 0


def test_dynamic_per_tensor_is_rejected_with_the_fix():
    with pytest.raises(FormatError, match="vLLM's int8 kernels"):
        SmoothQuantFormat.from_dict(_with(("activations",), {"num_bits": 8, "strategy": "tensor", "dynamic": True}))
