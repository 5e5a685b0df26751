"""--keep-16bit: matched linears stay in the model dtype, unsmoothed targets, listed in ignore and in convert's."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import calib_text, save_tiny

from vllm_smoothquant.offline.convert import to_compressed_tensors
from vllm_smoothquant.offline.options import OptionsError, QuantizeOptions
from vllm_smoothquant.offline.pipeline import quantize

DOWN = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("keep")
    return save_tiny("LlamaForCausalLM", root / "m"), calib_text(root / "c.txt")


def _q(llama, out, **kw):
    model, calib = llama
    return quantize(str(model), out, calib, QuantizeOptions(num_samples=4, seq_len=32, **kw))


def test_kept_linears_are_written_in_16_bits_and_ignored(llama, tmp_path):
    r = _q(llama, tmp_path / "k", keep_16bit=("*.mlp.down_proj",), rotate="none")
    sd = load_file(tmp_path / "k" / "model.safetensors")
    qc = json.loads((tmp_path / "k" / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["lm_head", *DOWN]
    src = load_file(llama[0] / "model.safetensors")
    for n in DOWN:
        assert sd[f"{n}.weight"].dtype == torch.bfloat16 and f"{n}.weight_scale" not in sd
        assert torch.equal(sd[f"{n}.weight"], src[f"{n}.weight"])  # untouched: the target of no group
        assert sd[f"{n.replace('down_proj', 'gate_proj')}.weight"].dtype == torch.int8
    assert {g.group for g in r.groups} == {"qkv", "gate_up", "o"}  # up -> down skipped: its target is kept
    ct = json.loads((to_compressed_tensors(tmp_path / "k", tmp_path / "ct") / "config.json").read_text())
    assert ct["quantization_config"]["ignore"] == ["lm_head", *DOWN]


def test_a_kept_linear_is_not_rotated(llama, tmp_path):
    _q(llama, tmp_path / "k", keep_16bit=("model.layers.0.mlp.down_proj",))
    sd = load_file(tmp_path / "k" / "model.safetensors")
    src = load_file(llama[0] / "model.safetensors")
    assert torch.equal(sd[f"{DOWN[0]}.weight"], src[f"{DOWN[0]}.weight"])  # neither smoothed nor rotated
    assert sd[f"{DOWN[1]}.weight"].dtype == torch.int8


@pytest.mark.parametrize("pattern, message", [
    ("*.mlp.up_proj_x", r"--keep-16bit '\*.mlp.up_proj_x' matches no decoder linear"),
    ("*.self_attn.q_proj", r"keeps \['self_attn.q_proj'\] of layer 0 but not \['self_attn.k_proj', "
                           r"'self_attn.v_proj'\].*all of them or none"),
])
def test_bad_patterns_are_refused_before_weights_are_read(llama, tmp_path, pattern, message):
    with pytest.raises(OptionsError, match=message):
        _q(llama, tmp_path / "x", keep_16bit=(pattern,))
    assert not (tmp_path / "x").exists()


def test_fused_linears_kept_together(llama, tmp_path):
    _q(llama, tmp_path / "k", keep_16bit=("model.layers.1.self_attn.[qkv]_proj",))
    qc = json.loads((tmp_path / "k" / "config.json").read_text())["quantization_config"]
    assert qc["ignore"][1:] == [f"model.layers.1.self_attn.{x}_proj" for x in "kqv"]
