import copy

import pytest

from vllm_smoothquant.format import ActivationScheme, FormatError, SmoothQuantFormat, WeightScheme

GOOD = SmoothQuantFormat().to_dict()


def test_round_trip():
    fmt = SmoothQuantFormat(weights=WeightScheme("tensor"), activations=ActivationScheme("tensor", dynamic=False),
                            alpha=0.7, ignore=("lm_head", "model.layers.0.mlp.down_proj"))
    assert SmoothQuantFormat.from_dict(fmt.to_dict()) == fmt


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
        (("format_version",), 2, "format_version.*upgrade"),
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
    ],
    ids=lambda v: ".".join(v) if isinstance(v, tuple) else None,
)
def test_malformed_configs_name_the_key(path, value, match):
    with pytest.raises(FormatError, match=match):
        SmoothQuantFormat.from_dict(_with(path, value))


def test_dynamic_per_tensor_is_rejected_with_the_fix():
    with pytest.raises(FormatError, match="vLLM's int8 kernels"):
        SmoothQuantFormat.from_dict(_with(("activations",), {"num_bits": 8, "strategy": "tensor", "dynamic": True}))
