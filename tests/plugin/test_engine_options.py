"""The plugin's engine options (``additional_config["smoothquant"]``): defaults, values, and errors that say the fix."""

from __future__ import annotations

import pytest

from vllm_smoothquant.engine_options import EngineOptions, EngineOptionsError


@pytest.mark.parametrize(
    "additional, roles",
    [
        (None, set()),  # off by default
        ({}, set()),
        ({"smoothquant": {}}, set()),
        ({"smoothquant": {"fused_quant": True}}, {"norm", "act", "attn_out"}),
        ({"smoothquant": {"fused_quant": False}}, set()),
        ({"smoothquant": {"fused_quant": ["act"]}}, {"act"}),
        ({"smoothquant": {"fused_quant": ["norm", "act"]}}, {"norm", "act"}),
        ({"other_plugin": 1}, set()),
        (object(), set()),  # vLLM allows a SupportsHash object there (another plugin's): not ours
    ],
)
def test_roles_from_additional_config(additional, roles):
    assert EngineOptions.parse(additional).fused_quant == roles


@pytest.mark.parametrize(
    "additional, says",
    [
        ({"smoothquant": {"fused_quant": "norm"}}, "list of roles"),
        ({"smoothquant": {"fused_quant": ["norm", "rope"]}}, "list of roles"),
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
