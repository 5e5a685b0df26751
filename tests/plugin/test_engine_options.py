"""The plugin's engine options (``additional_config["smoothquant"]``): defaults, values, and errors that say the fix."""

from __future__ import annotations

import pytest

from vllm_smoothquant.engine_options import EngineOptions, EngineOptionsError


@pytest.mark.parametrize(
    "additional, fused",
    [
        (None, False),  # off by default (measured slower); on: CUDA under vLLM's compilation only (engine_fuses)
        ({}, False),
        ({"smoothquant": {}}, False),
        ({"smoothquant": {"fused_quant": True}}, True),
        ({"smoothquant": {"fused_quant": False}}, False),
        ({"other_plugin": 1}, False),
        (object(), False),  # vLLM allows a SupportsHash object there (another plugin's): not ours
    ],
)
def test_fused_quant_from_additional_config(additional, fused):
    assert EngineOptions.parse(additional).fused_quant is fused


@pytest.mark.parametrize(
    "additional, says",
    [
        ({"smoothquant": {"fused_quant": "true"}}, "use true or false"),
        ({"smoothquant": {"fused_quant": ["norm", "act"]}}, "lists of earlier versions are gone"),
        ({"smoothquant": {"fuse": True}}, "unknown key"),
        ({"smoothquant": True}, "JSON object"),
        ({"smoothquant": {"moe_kernel": "cutlass"}}, "use one of"),
    ],
)
def test_bad_option_is_a_clear_error(additional, says):
    with pytest.raises(EngineOptionsError, match=says):
        EngineOptions.parse(additional)


@pytest.mark.parametrize("additional, kernel", [
    (None, "auto"), ({"smoothquant": {}}, "auto"), ({"smoothquant": {"moe_kernel": "int32_acc"}}, "int32_acc"),
    ({"smoothquant": {"moe_kernel": "vllm", "fused_quant": True}}, "vllm")])
def test_moe_kernel_option(additional, kernel):
    assert EngineOptions.parse(additional).moe_kernel == kernel
