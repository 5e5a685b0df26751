"""Mixtures of experts offline: per-expert working model, exact smoothing (router included), per-expert statistics,
lazy == in-memory, the CLI, and bad input (experts that do not match config.json, static expert activations)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import input_absmax
from safetensors.torch import load_file, save_file
from tiny_models import MOE_ARCHS, calib_text, save_tiny, tiny_model

from vllm_smoothquant.offline.experts import MIN_EXPERT_TOKENS, ExpertCountError, split_experts
from vllm_smoothquant.offline.layer_smoothing import smooth_layer
from vllm_smoothquant.offline.mappings import attention_heads, expand_groups, mapping_for
from vllm_smoothquant.offline.options import STATIC, OptionsError, QuantizeOptions
from vllm_smoothquant.offline.pipeline import quantize
from vllm_smoothquant.offline.streaming import record_inputs

ids = pytest.mark.parametrize("arch", MOE_ARCHS, ids=lambda a: a.removesuffix("ForCausalLM"))
# with dense decoder layers among the MoE ones too: GLM-4.5's first_k_dense_replace (its tiny model: layer 0 dense),
# Qwen-MoE's mlp_only_layers and decoder_sparse_step
MIXED = [pytest.param(a, None, id=a.removesuffix("ForCausalLM")) for a in MOE_ARCHS] + [
    pytest.param("Qwen3MoeForCausalLM", {"mlp_only_layers": [0]}, id="Qwen3Moe-mlp_only_layers"),
    pytest.param("Qwen2MoeForCausalLM", {"decoder_sparse_step": 2},
                 id="Qwen2Moe-decoder_sparse_step")]
OPTS = QuantizeOptions(num_samples=4, seq_len=32)


def _split(arch, overrides=None):
    model = tiny_model(arch, config_overrides=overrides)
    mapping = mapping_for(model.config)
    with torch.no_grad():
        tokens = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(1))
        before = model(tokens).logits
        split_experts(model, mapping)
        return model, mapping, tokens, before


def _moe_layers(model, mapping) -> list[int]:
    return sorted(mapping.moe.moe_layers(model.config, model.config.num_hidden_layers))


@pytest.mark.parametrize("arch, overrides", MIXED)
def test_split_experts_is_the_same_model_under_checkpoint_names(arch, overrides):
    model, mapping, tokens, before = _split(arch, overrides)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, before, rtol=1e-5, atol=1e-5)
    names = set(model.state_dict())
    moe = mapping.moe
    moe_layers = _moe_layers(model, mapping)
    assert moe_layers == ([1] if arch.startswith("Glm4Moe") or overrides else [0, 1])
    for i in range(model.config.num_hidden_layers):
        for e in range(getattr(model.config, moe.num_experts)):
            for w in range(3):
                assert (f"model.layers.{i}.{moe.expert_linear(e, w)}.weight" in names) == (i in moe_layers)
        assert (f"model.layers.{i}.{moe.block}.gate.weight" in names) == (i in moe_layers)
        assert (f"model.layers.{i}.mlp.down_proj.weight" in names) == (i not in moe_layers)  # a dense layer's MLP
    assert not any("gate_up_proj" in n for n in names)


@pytest.mark.parametrize("arch, overrides", MIXED)
def test_smoothing_is_exact_on_fp32_logits_with_every_expert_and_the_router(arch, overrides):
    """Norm -> router + every expert's gate/up (+ shared expert), v -> o, each expert's up -> down: fp32 logits
    unchanged (1e-4 relative); every expert smoothed, with its own tokens counted; a dense layer among the MoE ones
    gets Llama's gate_up and down."""
    model, mapping, tokens, before = _split(arch, overrides)
    absmax = input_absmax(model, tokens)
    layers = model.get_submodule(mapping.layers)
    moe_layers = _moe_layers(model, mapping)
    first = layers[moe_layers[0]]
    with record_inputs({n: m for n, m in first.named_modules() if isinstance(m, torch.nn.Linear)}) as (a0, _):
        with torch.no_grad():
            model(tokens)
    counts = a0.rows
    reports = []
    for i, layer in enumerate(layers):
        prefix = f"{mapping.layers}.{i}."
        local = type(a0)()
        local.update({k.removeprefix(prefix): v for k, v in absmax.items() if k.startswith(prefix)})
        local.rows.update(counts)  # the first MoE layer's counts stand for all here: all above MIN_EXPERT_TOKENS
        groups = mapping.layer_groups(mapping.groups, i in moe_layers)
        got = smooth_layer(layer, i, groups, local, 0.5, attention_heads(model.config))[1]
        expected = {"qkv", "o"} | ({"moe", "down"} if i in moe_layers else {"gate_up", "down"})
        assert {r.group.split(".")[0] for r in got} >= expected - {"moe"} and (i in moe_layers) == any(
            r.group == "moe" for r in got), [r.group for r in got]
        reports += got
    with torch.no_grad():
        after = model(tokens).logits
    assert ((after - before).norm() / before.norm()).item() < 1e-4
    experts = getattr(model.config, mapping.moe.num_experts)
    downs = [r for r in reports if r.group.startswith("down.")]
    assert len(downs) == experts * len(moe_layers)
    # smoothed unless its expert saw too few tokens (GLM-4.5's tiny sigmoid router sends one expert < 16 of 160)
    assert all((r.fallback is None) == (r.tokens >= MIN_EXPERT_TOKENS) for r in downs)
    assert sum(r.fallback is None for r in downs) >= len(downs) - 1
    moe = next(r for r in reports if r.group == "moe")
    assert len(moe.tokens) == experts and sum(moe.tokens) == tokens.numel() * model.config.num_experts_per_tok
    assert moe.act_max_after < moe.act_max_before


def test_expert_with_too_few_tokens_falls_back_to_no_smoothing():
    model, mapping, tokens, _ = _split("MixtralForCausalLM")
    layer = model.model.layers[0]
    absmax = input_absmax(model, tokens)
    with record_inputs({n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}) as (local, _):
        with torch.no_grad():
            model(tokens)
    local.update({k.removeprefix("model.layers.0."): v for k, v in absmax.items() if k.startswith("model.layers.0.")})
    local.rows["block_sparse_moe.experts.2.w2"] = MIN_EXPERT_TOKENS - 1
    w2 = layer.block_sparse_moe.experts[2].w2.weight.clone()
    groups = [g for g in mapping.groups if g.name == "down"]
    _, reports = smooth_layer(layer, 0, groups, local, 0.5, attention_heads(model.config))
    by_name = {r.group: r for r in reports}
    assert by_name["down.2"].fallback and "left unsmoothed" in by_name["down.2"].fallback
    assert by_name["down.2"].tokens == MIN_EXPERT_TOKENS - 1
    assert torch.equal(layer.block_sparse_moe.experts[2].w2.weight, w2)
    assert by_name["down.1"].fallback is None


def test_expand_groups_makes_one_group_per_expert_and_one_over_all():
    mapping = mapping_for(tiny_model("Qwen2MoeForCausalLM").config)
    names = [f"mlp.experts.{e}.{p}" for e in (0, 1, 10) for p in ("gate_proj", "up_proj", "down_proj")]
    names += ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"]
    groups = {g.name: g for g in expand_groups(mapping.groups, names)}
    assert groups["moe"].linears == ("mlp.experts.0.gate_proj", "mlp.experts.1.gate_proj", "mlp.experts.10.gate_proj",
                                     "mlp.experts.0.up_proj", "mlp.experts.1.up_proj", "mlp.experts.10.up_proj",
                                     "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")
    assert groups["moe"].passengers == ("mlp.gate", "mlp.shared_expert_gate")
    assert groups["down.10"].prev == "mlp.experts.10.up_proj" and groups["down.10"].linears == (
        "mlp.experts.10.down_proj",) and groups["down.10"].expert == 10


@ids
def test_lazy_and_in_memory_give_the_same_checkpoint_with_per_expert_names(arch, tmp_path):
    calib = calib_text(tmp_path / "calib.txt")
    model = save_tiny(arch, tmp_path / "model")
    lazy = quantize(str(model), tmp_path / "lazy", calib, OPTS, load="lazy")
    whole = quantize(str(model), tmp_path / "memory", calib, OPTS, load="memory")
    assert lazy.loading.startswith("lazy") and whole.loading.startswith("in memory")
    a, b = load_file(tmp_path / "lazy" / "model.safetensors"), load_file(tmp_path / "memory" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from transformers import AutoConfig

    mapping = mapping_for(AutoConfig.from_pretrained(model))
    moe = mapping.moe
    for e in range(4):
        for w in range(3):
            name = f"model.layers.1.{moe.expert_linear(e, w)}"
            assert a[f"{name}.weight"].dtype == torch.int8 and a[f"{name}.weight_scale"].shape == (
                a[f"{name}.weight"].shape[0], 1)
    assert a[f"model.layers.1.{moe.block}.gate.weight"].dtype == torch.bfloat16  # the router stays unquantized
    qc = json.loads((tmp_path / "lazy" / "config.json").read_text())["quantization_config"]
    assert f"model.layers.1.{moe.block}.gate" in qc["ignore"]
    report = json.loads((tmp_path / "lazy" / "smoothquant" / "report.json").read_text())
    moe_groups = [g for g in report["groups"] if g["group"] == "moe"]
    n_moe = 1 if arch.startswith("Glm4Moe") else 2  # GLM-4.5's layer 0 is dense (first_k_dense_replace)
    assert len(moe_groups) == n_moe and all(len(g["tokens"]) == 4 and sum(g["tokens"]) == 4 * 32 * 2
                                            for g in moe_groups)


def _cli_quantize(model: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """``vllm-smoothquant quantize MODEL tmp_path/out`` through the console script (4 windows of 32 tokens)."""
    cli = Path(sys.executable).with_name("vllm-smoothquant")
    out = subprocess.run([str(cli), "quantize", str(model), str(tmp_path / "out"), "--calib",
                          str(calib_text(tmp_path / "calib.txt")), "--num-samples", "4", "--seq-len", "32"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def test_cli_quantizes_a_mixtral(tmp_path):
    model = save_tiny("MixtralForCausalLM", tmp_path / "model")
    out = _cli_quantize(model, tmp_path)
    names = load_file(tmp_path / "out" / "model.safetensors")
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight_scale" in names
    # the summary gives one line per MoE layer for its experts' up->down groups, not one row per expert
    report = json.loads((tmp_path / "out" / "smoothquant" / "report.json").read_text())
    downs = [g for g in report["groups"] if g["group"].startswith("down.") and g["layer"] == 0]
    tokens = sorted(g["tokens"] for g in downs)
    smoothed = sum(1 for g in downs if not g["fallback"])
    assert (f"    0 experts: up->down smoothed in {smoothed} of {len(downs)}; calibration tokens per expert min "
            f"{tokens[0]}, median {tokens[len(tokens) // 2]}, max {tokens[-1]}") in out.stdout
    assert " down.0 " not in out.stdout


def test_cli_quantizes_a_glm45_with_a_dense_first_layer(tmp_path):
    """GLM-4.5: layer 0 dense (first_k_dense_replace = 1) gets Llama's groups and int8 gate/up/down, layer 1 the MoE
    groups; only layer 1's router is kept unquantized, with its e_score_correction_bias beside it."""
    model = save_tiny("Glm4MoeForCausalLM", tmp_path / "model")
    out = _cli_quantize(model, tmp_path)
    t = load_file(tmp_path / "out" / "model.safetensors")
    assert all(t[f"model.layers.0.mlp.{n}.weight"].dtype == torch.int8 for n in ("gate_proj", "up_proj", "down_proj"))
    assert t["model.layers.1.mlp.experts.3.down_proj.weight"].dtype == torch.int8
    assert t["model.layers.1.mlp.shared_experts.down_proj.weight"].dtype == torch.int8
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in t and "model.layers.0.mlp.gate.weight" not in t
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert [n for n in qc["ignore"] if ".mlp." in n] == ["model.layers.1.mlp.gate"]
    report = json.loads((tmp_path / "out" / "smoothquant" / "report.json").read_text())
    groups = {layer: {g["group"].split(".")[0] for g in report["groups"] if g["layer"] == layer} for layer in (0, 1)}
    assert groups == {0: {"qkv", "gate_up", "o", "down"}, 1: {"qkv", "moe", "o", "down", "shared_down"}}
    assert [x["layer"] for x in report["smoothing_guard"]["layers"]] == [0, 1]


def _with_extra_expert(model: Path) -> None:
    """Lower config.json's expert count below the tensors' (4 experts on disk, 3 declared)."""
    cfg = json.loads((model / "config.json").read_text())
    cfg["num_local_experts"] = 3
    (model / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("load", ["lazy", "auto"])
def test_experts_that_do_not_match_config_are_an_error_naming_the_tensor(tmp_path, load):
    model = save_tiny("MixtralForCausalLM", tmp_path / "model")
    _with_extra_expert(model)
    with pytest.raises(ExpertCountError, match=r"model\.layers\.0\.block_sparse_moe\.experts\.3\.w\d\.weight.*"
                                               r"num_local_experts is 3"):
        quantize(str(model), tmp_path / "out", calib_text(tmp_path / "calib.txt"), OPTS, load=load)


def test_a_missing_expert_is_an_error_naming_it(tmp_path):
    model = save_tiny("Qwen3MoeForCausalLM", tmp_path / "model")
    tensors = load_file(model / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.2.down_proj.weight"]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExpertCountError, match=r"model\.layers\.1\.mlp\.experts\.2\.down_proj\.weight is missing"):
        quantize(str(model), tmp_path / "out", calib_text(tmp_path / "calib.txt"), OPTS)


def test_static_expert_activations_are_refused_before_any_weight_is_read(tmp_path):
    model = save_tiny("Qwen3MoeForCausalLM", tmp_path / "model")
    with pytest.raises(OptionsError, match=r"experts\.0\.gate_proj: static activations.*per token"):
        quantize(str(model), tmp_path / "out", calib_text(tmp_path / "calib.txt"),
                 QuantizeOptions(num_samples=2, seq_len=16, activations=STATIC))
    assert not (tmp_path / "out").exists()


def test_per_tensor_expert_weights_are_refused_before_any_weight_is_read(tmp_path):
    from vllm_smoothquant.format import WeightScheme

    model = save_tiny("MixtralForCausalLM", tmp_path / "model")
    with pytest.raises(OptionsError, match=r"--weights tensor: .*per-channel"):
        quantize(str(model), tmp_path / "out", calib_text(tmp_path / "calib.txt"),
                 QuantizeOptions(num_samples=2, seq_len=16, weights=WeightScheme(strategy="tensor")))
