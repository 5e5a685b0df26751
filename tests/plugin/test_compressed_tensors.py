"""compressed-tensors int8 W8A8 configs as the plugin's typed config (``vllm_smoothquant.compressed_tensors``): what is
accepted and what it maps to, every refused scheme as an error naming the key, and vLLM's own config code choosing
the plugin only with ``--quantization smoothquant``."""

import copy
import json

import pytest
from ct_schema import llmcompressor_w8a8, with_quantization_config
from tiny_models import save_tiny

from vllm_smoothquant.checkpoint import TensorInfo, find_problems
from vllm_smoothquant.compressed_tensors import CompressedTensorsError, to_format
from vllm_smoothquant.format import (
    COMPRESSED_TENSORS,
    ActivationScheme,
    FormatError,
    KVCacheScheme,
    SmoothQuantFormat,
    WeightScheme,
)
from vllm_smoothquant.offline.convert import compressed_tensors_config

STATIC = ActivationScheme("tensor", dynamic=False)
ROUTER = "re:.*block_sparse_moe.gate$"


def _serving(fmt: SmoothQuantFormat) -> tuple:
    """What serving reads from a format."""
    return fmt.weights, fmt.activations, fmt.activation_overrides, fmt.kv_cache, fmt.rotation


def test_llmcompressor_w8a8_preset_maps_to_the_plugins_scheme():
    fmt = to_format(llmcompressor_w8a8(ignore=["lm_head", ROUTER]))
    assert fmt.compressed_tensors and fmt.quant_method == COMPRESSED_TENSORS
    assert (fmt.weights, fmt.activations, fmt.kv_cache, fmt.rotation) == (WeightScheme("channel"), ActivationScheme(),
                                                                          None, None)
    assert fmt.scale_dtypes == ("F32", "BF16", "F16")  # llm-compressor keeps scales in the model's dtype
    assert fmt.is_ignored("lm_head") and fmt.is_ignored("model.layers.3.block_sparse_moe.gate")
    assert not fmt.is_ignored("model.layers.3.block_sparse_moe.gate_proj")  # "$": the router only
    assert not fmt.is_ignored("model.layers.3.self_attn.q_proj")


@pytest.mark.parametrize("fmt", [
    SmoothQuantFormat(),
    SmoothQuantFormat(activations=STATIC),
    SmoothQuantFormat(weights=WeightScheme("tensor"), activations=STATIC,
                      ignore=("lm_head", "model.layers.1.mlp.gate")),
    SmoothQuantFormat(kv_cache=KVCacheScheme("fp8_e4m3", "tensor")),
    SmoothQuantFormat(kv_cache=KVCacheScheme("fp8_e4m3", "head")),
], ids=["token", "static", "tensor-weights-ignore", "kv-tensor", "kv-head"])
def test_convert_output_serves_as_the_native_checkpoint(fmt):
    """``convert``'s config (written with the compressed-tensors library's own schema) translates back to the
    scheme the native checkpoint is served with."""
    back = to_format(compressed_tensors_config(fmt, kv_heads_per_scale=2))
    assert _serving(back) == _serving(fmt) and back.ignore == fmt.ignore


@pytest.mark.parametrize("static", [False, True], ids=["token", "static"])
def test_llmcompressor_schema_and_convert_agree(static):
    fmt = SmoothQuantFormat(activations=STATIC if static else ActivationScheme())
    assert _serving(to_format(llmcompressor_w8a8(static=static))) == _serving(to_format(compressed_tensors_config(fmt)))


@pytest.mark.parametrize("kv, strategy", [("tensor", "tensor"), ("attn_head", "head")])
def test_kv_cache_scheme(kv, strategy):
    assert to_format(llmcompressor_w8a8(kv_cache=kv)).kv_cache == KVCacheScheme("fp8_e4m3", strategy)


@pytest.mark.parametrize("targets, suffix", [(["re:.*\\.mlp\\.down_proj$"], "mlp.down_proj"),
                                             (["re:.*down_proj$"], "down_proj"), (["re:.*\\.fc2$"], "fc2")],
                         ids=["convert", "llm-compressor-spinquant", "opt"])
def test_a_hadamard_input_transform_becomes_the_plugins_rotation(targets, suffix):
    """What `convert` writes for --rotate (and llm-compressor's SpinQuant R4 spelling of the target): the plugin's
    rotation of that block size, and the matrix tensor under each target named <scheme>_input."""
    from vllm_smoothquant.format import RotationScheme
    from vllm_smoothquant.offline.convert import transform_config

    cfg = llmcompressor_w8a8()
    tc = transform_config(SmoothQuantFormat(rotation=RotationScheme(targets=("mlp.down_proj",), block_size=64)))
    cfg["transform_config"] = tc.model_dump(mode="json")
    for a in cfg["transform_config"]["config_groups"]["R4"]["apply"]:
        a["targets"] = targets
    fmt = to_format(cfg)
    assert fmt.rotation == RotationScheme(targets=(suffix,), block_size=64) and fmt.rotation_tensor == "R4_input"
    assert fmt.rotation.block_for("model.layers.2.mlp.down_proj" if suffix != "fc2" else "model.decoder.layers.2.fc2") \
        == 64


def test_convert_of_a_rotated_checkpoint_serves_with_the_same_rotation():
    from vllm_smoothquant.format import RotationScheme

    fmt = SmoothQuantFormat(rotation=RotationScheme(targets=("mlp.down_proj",), block_size=128))
    back = to_format(compressed_tensors_config(fmt))
    assert _serving(back) == _serving(fmt)


def test_rotated_moe_experts_in_a_transform_config_are_refused_by_the_header_check():
    """llm-compressor's SpinQuant target re:.*down_proj$ also names Qwen-MoE experts' down_proj, whose input the
    plugin's fused-MoE method does not rotate: refused before weights are read, naming the tensors."""
    from vllm_smoothquant.format import RotationScheme
    from vllm_smoothquant.offline.convert import transform_config

    cfg = llmcompressor_w8a8()
    cfg["transform_config"] = transform_config(SmoothQuantFormat(
        rotation=RotationScheme(targets=("down_proj",), block_size=64))).model_dump(mode="json")
    fmt = to_format(cfg)
    name = "model.layers.0.mlp.experts.3.down_proj.R4_input.weight"
    problems = find_problems(fmt, {name: TensorInfo("F32", (64, 64), "model.safetensors")})
    assert len(problems) == 1 and problems[0].startswith(name) and "rotates MoE experts' inputs" in problems[0]
    assert find_problems(fmt, {"model.layers.0.mlp.down_proj.R4_input.weight": TensorInfo("F32", (64, 64), "model.safetensors")}) == []


def test_keys_vllm_adds_and_older_spellings_are_accepted():
    cfg = llmcompressor_w8a8()
    cfg.update(total_num_heads=4, total_num_kv_heads=2, quant_method="compressed_tensors")  # vLLM's get_quant_config
    del cfg["config_groups"]["group_0"]["format"], cfg["sparsity_config"], cfg["transform_config"]
    cfg["config_groups"]["group_0"]["weights"]["group_size"] = -1  # some writers: -1 for per channel
    assert to_format(cfg).activations == ActivationScheme()


G = "['config_groups']['group_0']"
W, A = f"{G}['weights']", f"{G}['input_activations']"


def _set(path: str, value):
    def change(cfg):
        *parents, leaf = path.split("/")
        d = cfg
        for p in parents:
            d = d[p]
        d[leaf] = value
    return change


# how the llm-compressor config is changed -> the key the error must name (value shown after " = ")
REFUSED = {
    "asymmetric-weights": (_set("config_groups/group_0/weights/symmetric", False), f"{W}['symmetric'] = False"),
    "asymmetric-activations": (_set("config_groups/group_0/input_activations/symmetric", False),
                               f"{A}['symmetric'] = False"),
    "group-wise": (_set("config_groups/group_0/weights/group_size", 128), f"{W}['group_size'] = 128"),
    "group-strategy": (_set("config_groups/group_0/weights/strategy", "group"), f"{W}['strategy'] = 'group'"),
    "block": (_set("config_groups/group_0/weights/block_structure", [128, 128]),
              f"{W}['block_structure'] = [128, 128]"),
    "block-strategy": (_set("config_groups/group_0/weights/strategy", "block"), f"{W}['strategy'] = 'block'"),
    "int4": (_set("config_groups/group_0/weights/num_bits", 4), f"{W}['num_bits'] = 4"),
    "fp8-weights": (_set("config_groups/group_0/weights/type", "float"), f"{W}['type'] = 'float'"),
    "fp8-activations": (_set("config_groups/group_0/input_activations/type", "float"), f"{A}['type'] = 'float'"),
    "weight-only": (_set("config_groups/group_0/input_activations", None), f"{A} = None"),
    "dynamic-per-tensor": (_set("config_groups/group_0/input_activations/strategy", "tensor"),
                           f"{A}['dynamic'] = True"),
    "static-per-token": (_set("config_groups/group_0/input_activations/dynamic", False), f"{A}['dynamic'] = False"),
    "output-activations": (_set("config_groups/group_0/output_activations", {"num_bits": 8}),
                           f"{G}['output_activations'] = {{'num_bits': 8}}"),
    "pack-quantized": (_set("format", "pack-quantized"), "['format'] = 'pack-quantized'"),
    "group-format": (_set("config_groups/group_0/format", "float-quantized"), f"{G}['format'] = 'float-quantized'"),
    "2:4-sparsity": (_set("sparsity_config", {"format": "sparse-24-bitmask", "sparsity_structure": "2:4"}),
                     "['sparsity_config'] = {'format': 'sparse-24-bitmask'"),
    "transform-no-head-dim": (_set("transform_config", {"config_groups": {"u": {"type": "hadamard", "apply": [
        {"targets": ["re:.*down_proj$"], "location": "input"}]}}}), "['transform_config']['config_groups']['u']"
        "['head_dim'] = None"),
    "transform-random": (_set("transform_config", {"config_groups": {"u": {"type": "random-hadamard", "head_dim": 64,
                                                                             "apply": []}}}),
                         "['transform_config']['config_groups']['u']['type'] = 'random-hadamard'"),
    "transform-output": (_set("transform_config", {"config_groups": {"u": {"type": "hadamard", "head_dim": 64, "apply": [
        {"targets": ["re:.*o_proj$"], "location": "output"}]}}}), "['transform_config']['config_groups']['u']['apply'][0]"
        "['location'] = 'output'"),
    "transform-class-target": (_set("transform_config", {"config_groups": {"u": {"type": "hadamard", "head_dim": 64,
                                                                                   "apply": [{"targets": ["Linear"], "location": "input"}]}}}),
                               "['transform_config']['config_groups']['u']['apply'][...]['targets'] = 'Linear'"),
    "not-compressed": (_set("quantization_status", "frozen"), "['quantization_status'] = 'frozen'"),
    "partial-targets": (_set("config_groups/group_0/targets", ["re:.*self_attn.*"]),
                        f"{G}['targets'] = ['re:.*self_attn.*']"),
    "two-groups": (lambda c: c["config_groups"].update(group_1=copy.deepcopy(c["config_groups"]["group_0"])),
                   "['config_groups'] = ['group_0', 'group_1']"),
    "fp8-scales": (_set("config_groups/group_0/weights/scale_dtype", "torch.float8_e4m3fn"),
                   f"{W}['scale_dtype'] = 'torch.float8_e4m3fn'"),
    "g_idx": (_set("config_groups/group_0/weights/actorder", "group"), f"{W}['actorder'] = 'group'"),
    "dynamic-weights": (_set("config_groups/group_0/weights/dynamic", True), f"{W}['dynamic'] = True"),
    "int8-kv-cache": (_set("kv_cache_scheme", {"num_bits": 8, "type": "int", "strategy": "tensor", "dynamic": False,
                                               "symmetric": True}), "['kv_cache_scheme']['type'] = 'int'"),
    "unknown-key": (_set("config_groups/group_0/weights/new_thing", 1), f"{W} has key(s) ['new_thing']"),
}


@pytest.mark.parametrize("how", REFUSED)
def test_unsupported_scheme_is_an_error_naming_the_key(how):
    change, text = REFUSED[how]
    cfg = llmcompressor_w8a8()
    change(cfg)
    with pytest.raises(CompressedTensorsError) as e:
        to_format(cfg)
    message = str(e.value)
    assert message.startswith(f"quantization_config{text}"), message
    assert "serve this checkpoint without --quantization smoothquant" in message.lower(), message


def test_static_activations_for_moe_experts_name_the_fix_for_compressed_tensors():
    from vllm_smoothquant.moe_method import check_moe_format

    with pytest.raises(FormatError, match="static .* MoE experts.*without --quantization smoothquant"):
        check_moe_format(to_format(llmcompressor_w8a8(static=True)), "model.layers.0.block_sparse_moe.experts")


def test_ignored_experts_and_half_ignored_fused_layers_are_refused():
    from vllm_smoothquant.config import SmoothQuantConfig

    cfg = SmoothQuantConfig(to_format(llmcompressor_w8a8(ignore=["lm_head", "re:.*experts.*", "re:.*q_proj$"])))
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    with pytest.raises(FormatError, match="keeps model.layers.0.mlp.experts unquantized.*without --quantization"):
        cfg.check_experts_quantized("model.layers.0.mlp.experts")
    with pytest.raises(FormatError, match="keeps only model.layers.0.self_attn.q_proj unquantized"):
        cfg.is_skipped("model.layers.0.self_attn.qkv_proj")
    cfg.fmt = to_format(llmcompressor_w8a8(ignore=["re:.*self_attn.[qkv]_proj$"]))
    assert cfg.is_skipped("model.layers.0.self_attn.qkv_proj") and not cfg.is_skipped("model.layers.0.mlp.down_proj")


def test_header_check_takes_16bit_scales_and_ignore_patterns():
    """llm-compressor writes bf16 scales (the native format: float32 only), and ``re:`` ignore entries apply."""
    tensors = {"m.q.weight": TensorInfo("I8", (8, 4), "a"), "m.q.weight_scale": TensorInfo("BF16", (8, 1), "a"),
               "m.gate.weight": TensorInfo("BF16", (2, 4), "a")}
    assert find_problems(to_format(llmcompressor_w8a8(ignore=["re:.*gate$"])), tensors) == []
    assert find_problems(SmoothQuantFormat(), tensors) == ["m.q.weight_scale: dtype BF16, the format declares "
                                                           "float32 (F32)"]
    tensors["m.gate.weight_scale"] = TensorInfo("BF16", (2, 1), "a")
    assert "m.gate.weight_scale: unexpected: quantization_config.ignore keeps m.gate unquantized" in \
        find_problems(to_format(llmcompressor_w8a8(ignore=["re:.*gate$"])), tensors)[0]


@pytest.mark.parametrize(
    "hf_cfg, user, expected",
    [({"quant_method": "compressed-tensors"}, None, None),
     ({"quant_method": "compressed-tensors"}, "smoothquant", "smoothquant"),
     ({"quant_method": "compressed_tensors"}, "smoothquant", "smoothquant"),
     ({"quant_method": "compressed-tensors"}, "compressed-tensors", None),
     ({"quant_method": "fp8"}, "smoothquant", None)],
    ids=["auto-stays-stock", "asked", "underscore-spelling", "asked-stock", "other-method"],
)
def test_override_only_when_asked(hf_cfg, user, expected):
    from vllm_smoothquant.config import SmoothQuantConfig

    assert SmoothQuantConfig.override_quantization_method(hf_cfg, user) == expected


@pytest.fixture(scope="module")
def ct_dir(tmp_path_factory):
    """A tiny Llama directory with an llm-compressor config (vLLM's config code reads only config.json here)."""
    root = tmp_path_factory.mktemp("ct")
    return with_quantization_config(save_tiny("LlamaForCausalLM", root / "model"), root / "ct",
                                    llmcompressor_w8a8(static=True))


@pytest.mark.parametrize("asked", [None, "smoothquant"])
def test_vllm_picks_the_plugin_only_when_asked(ct_dir, asked):
    """vLLM's own ModelConfig / get_quant_config (the code ``vllm serve`` runs): without --quantization a
    compressed-tensors checkpoint stays stock vLLM's CompressedTensorsConfig; with it, the plugin's typed config."""
    import vllm_smoothquant
    from vllm.config import LoadConfig, ModelConfig
    from vllm.model_executor.model_loader.weight_utils import get_quant_config

    vllm_smoothquant.register()
    mc = ModelConfig(model=str(ct_dir), quantization=asked, dtype="float32")
    quant = get_quant_config(mc, LoadConfig())
    if asked is None:
        assert mc.quantization == "compressed-tensors" and type(quant).__name__ == "CompressedTensorsConfig"
    else:
        assert mc.quantization == "smoothquant" and type(quant).__name__ == "SmoothQuantConfig"
        assert quant.fmt.activations == STATIC and quant.fmt.compressed_tensors
    assert json.loads((ct_dir / "config.json").read_text())["quantization_config"]["quant_method"] == \
        "compressed-tensors"


def test_a_refused_scheme_fails_vllms_engine_config_with_the_named_error(ct_dir, tmp_path):
    """What ``vllm serve CKPT --quantization smoothquant`` builds first (before any engine process): the error
    arrives with its type and message, not buried in pydantic's ValidationError."""
    import vllm_smoothquant
    from vllm.engine.arg_utils import EngineArgs

    vllm_smoothquant.register()
    cfg = llmcompressor_w8a8()
    cfg["config_groups"]["group_0"]["weights"]["num_bits"] = 4
    int4 = with_quantization_config(ct_dir, tmp_path / "int4", cfg)
    with pytest.raises(CompressedTensorsError, match=r"\['weights'\]\['num_bits'\] = 4: .* without --quantization"):
        EngineArgs(model=str(int4), quantization="smoothquant", max_model_len=256,
                   enforce_eager=True).create_engine_config()


@pytest.mark.parametrize("name", ["llama", "mixtral", "qwen3moe"])
def test_configs_llmcompressor_wrote(name):
    """The quantization_config llm-compressor 0.14.0.1 (compressed-tensors 0.19.0) itself wrote for the W8A8 preset
    (``benchmarks/llmc_serve_check.py make``, tests/data/): the native scheme, its routers ignored by name."""
    from pathlib import Path

    cfg = json.loads((Path(__file__).parents[1] / "data" / f"llmcompressor-0.14.0.1-w8a8-{name}.json").read_text())
    fmt = to_format(cfg)
    assert _serving(fmt) == _serving(SmoothQuantFormat()) and fmt.is_ignored("lm_head")
    router = {"llama": None, "mixtral": "model.layers.1.block_sparse_moe.gate", "qwen3moe": "model.layers.1.mlp.gate"}
    assert router[name] is None or fmt.is_ignored(router[name])
