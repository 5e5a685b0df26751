import subprocess
import sys

import pytest

import vllm_smoothquant
from vllm_smoothquant.format import SmoothQuantFormat


def test_import_does_no_work():
    code = "import sys, vllm_smoothquant; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert eps.get("smoothquant") == "vllm_smoothquant:register"


def test_register_is_idempotent_and_registers_config():
    from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    vllm_smoothquant.register()
    vllm_smoothquant.register()
    from vllm_smoothquant.config import SmoothQuantConfig

    assert get_quantization_config("smoothquant") is SmoothQuantConfig
    assert QUANTIZATION_METHODS.count("smoothquant") == 1
    assert WEIGHT_LOADER_V2_SUPPORTED.count("SmoothQuantLinearMethod") == 1


@pytest.mark.parametrize(
    "hf_cfg, user, expected",
    [
        ({"quant_method": "smoothquant"}, None, "smoothquant"),
        ({"quant_method": "smoothquant"}, "smoothquant", "smoothquant"),
        ({"quant_method": "smoothquant"}, "fp8", None),
        ({"quant_method": "compressed-tensors"}, None, None),
    ],
    ids=["auto-detect", "explicit", "user-asks-other", "other-checkpoint"],
)
def test_override_quantization_method(hf_cfg, user, expected):
    from vllm_smoothquant.config import SmoothQuantConfig

    assert SmoothQuantConfig.override_quantization_method(hf_cfg, user) == expected


def test_from_config_and_quant_method_choice():
    from vllm_smoothquant.config import SmoothQuantConfig

    cfg = SmoothQuantConfig.from_config(SmoothQuantFormat().to_dict())
    assert cfg.get_name() == "smoothquant" and cfg.get_min_capability() == 75
    assert cfg.get_quant_method(object(), "model.embed_tokens") is None  # not a LinearBase


def test_fused_layers_take_the_override_of_all_their_shards():
    from vllm_smoothquant.config import SmoothQuantConfig
    from vllm_smoothquant.format import ActivationScheme, FormatError

    static = ActivationScheme("tensor", dynamic=False)
    fmt = SmoothQuantFormat(activations=static, activation_overrides={"down_proj": ActivationScheme()})
    cfg = SmoothQuantConfig(fmt)
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    assert cfg.activations_for("model.layers.0.mlp.down_proj").dynamic
    assert cfg.activations_for("model.layers.0.self_attn.qkv_proj") == static
    cfg.fmt = SmoothQuantFormat(activations=static, activation_overrides={"q_proj": ActivationScheme()})
    with pytest.raises(FormatError, match="q_proj, k_proj, v_proj as one fused layer"):
        cfg.activations_for("model.layers.0.self_attn.qkv_proj")


def test_a_fused_layer_the_checkpoint_names_itself_takes_its_own_scheme():
    """GLM-4: the checkpoint stores mlp.gate_up_proj fused, vLLM's packed_modules_mapping lists gate_proj/up_proj:
    an override, an ignore entry or a rotation target naming gate_up_proj applies to vLLM's gate_up_proj."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from vllm_smoothquant.config import SmoothQuantConfig
    from vllm_smoothquant.format import ActivationScheme

    static = ActivationScheme("tensor", dynamic=False)
    cfg = SmoothQuantConfig(SmoothQuantFormat(activation_overrides={"gate_up_proj": static}))
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    assert cfg.activations_for("model.layers.0.mlp.gate_up_proj") == static
    assert cfg.activations_for("model.layers.0.self_attn.qkv_proj").dynamic
    cfg.fmt = SmoothQuantFormat(ignore=("lm_head", "model.layers.1.mlp.gate_up_proj"))
    from vllm.model_executor.layers.linear import ReplicatedLinear

    layer = ReplicatedLinear.__new__(ReplicatedLinear)  # only its type matters to get_quant_method
    assert isinstance(cfg.get_quant_method(layer, "model.layers.1.mlp.gate_up_proj"), UnquantizedLinearMethod)
    assert not isinstance(cfg.get_quant_method(layer, "model.layers.0.mlp.gate_up_proj"), UnquantizedLinearMethod)
