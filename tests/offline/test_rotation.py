"""--rotate down_proj: the rotation is exact in fp32 for every family's MLP output projection, chosen and refused
as documented, and recorded in the checkpoint (format 3)."""

from __future__ import annotations

import json

import pytest
import torch
from reference import hadamard_rotate, load_fake_quant_model, prompt_logprobs
from safetensors.torch import load_file
from tiny_models import ARCHS, MOE_ARCHS, calib_text, save_tiny, tiny_model

from vllm_smoothquant.format import FormatError, SmoothQuantFormat
from vllm_smoothquant.offline.mappings import layer_linears, mapping_for
from vllm_smoothquant.offline.options import STATIC, OptionsError, QuantizeOptions
from vllm_smoothquant.offline.pipeline import quantize
from vllm_smoothquant.offline.rotation import fold_rotation, largest_block, rotated
from vllm_smoothquant.rotation import hadamard, rotate


@pytest.mark.parametrize("b", [2, 16, 256])
def test_hadamard_is_orthonormal_symmetric_and_the_reference_rotation(b):
    h = hadamard(b, torch.float64)
    assert torch.equal(h, h.T)
    assert torch.allclose(h @ h, torch.eye(b, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, 5, 4 * b, dtype=torch.float64)
    assert torch.allclose(rotate(x, b), hadamard_rotate(x, b), atol=1e-12)


def test_compressed_tensors_matrix_is_the_same_convention():
    """vLLM's transforms (and hadacore) use compressed-tensors' deterministic Sylvester matrix / sqrt(b)."""
    from compressed_tensors.transform import deterministic_hadamard_matrix

    h = deterministic_hadamard_matrix(64, dtype=torch.float64) / 8
    assert torch.equal(hadamard(64, torch.float64), h)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.removesuffix("ForCausalLM"))
@torch.no_grad()
def test_rotation_is_exact_in_fp32(arch):
    """W <- W R on every layer's MLP output projection, its input rotated by R: fp32 logits unchanged."""
    model = tiny_model(arch, hidden=128)
    mapping = mapping_for(model.config)
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    layers = model.get_submodule(mapping.layers)
    with torch.no_grad():
        hooks = []
        for layer in layers:
            linears = layer_linears(layer)
            lin = linears[mapping.mlp_out]
            block = largest_block(lin.in_features)
            assert block >= 64
            w = lin.weight.clone()
            fold_rotation(lin, block)
            assert not torch.allclose(lin.weight, w)  # really rotated
            ctx = rotated(linears, {mapping.mlp_out: block})
            ctx.__enter__()
            hooks.append(ctx)
        out = model(ids).logits
        for ctx in hooks:
            ctx.__exit__(None, None, None)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("rot")
    return save_tiny("LlamaForCausalLM", root / "m"), calib_text(root / "c.txt")


def _q(llama, out, **kw):
    model, calib = llama
    return quantize(str(model), out, calib, QuantizeOptions(num_samples=4, seq_len=32, **kw))


def _qc(out):
    return json.loads((out / "config.json").read_text())["quantization_config"]


def test_default_rotates_down_proj_and_records_format_3(llama, tmp_path):
    r = _q(llama, tmp_path / "d")
    qc = _qc(tmp_path / "d")
    assert qc["format_version"] == 3
    assert qc["rotation"] == {"targets": ["mlp.down_proj"], "block_size": 64, "type": "hadamard",
                              "matrix": "sylvester"}
    assert "largest power of two <= 256 dividing 192" in r.rotation
    assert SmoothQuantFormat.from_dict(qc).rotation.block_for("model.layers.1.mlp.down_proj") == 64


def test_rotated_weights_are_the_rotated_smoothed_weights(llama, tmp_path):
    """Same recipe with and without rotation: layer 0's down_proj dequantized weight is W R (up to int8 rounding),
    its other tensors identical (pinned alpha: the α search of up -> down sees the rotation; later layers differ:
    their calibration inputs come from the int8-simulated layers before them)."""
    _q(llama, tmp_path / "rot", alpha=0.8)
    _q(llama, tmp_path / "plain", alpha=0.8, rotate="none")
    a, b = load_file(tmp_path / "rot" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        if ".down_proj." not in k and not k.startswith("model.layers.1."):
            assert torch.equal(a[k], b[k]), k
    n = "model.layers.0.mlp.down_proj"
    wa = a[f"{n}.weight"].float() * a[f"{n}.weight_scale"]
    wb = rotate(b[f"{n}.weight"].float() * b[f"{n}.weight_scale"], 64)
    assert (wa - wb).abs().max() <= 1.01 * (a[f"{n}.weight_scale"].max() + b[f"{n}.weight_scale"].max())


def test_static_scale_covers_the_rotated_input(llama, tmp_path):
    """With static activations, down_proj's input_scale is max |x R| / 127 over the calibration inputs: the fake-
    quant model's rotated down_proj input never exceeds 127 steps of it on the calibration text."""
    out = tmp_path / "s"
    _q(llama, out, activations=STATIC)
    model = load_fake_quant_model(out)
    down = model.model.layers[0].mlp.down_proj
    assert down.rotation_block == 64 and down.input_scale is not None
    seen = []
    down.register_forward_pre_hook(lambda m, i: seen.append(hadamard_rotate(i[0].float(), 64).abs().max()))
    from transformers import AutoTokenizer

    from vllm_smoothquant.offline.calibration import token_windows

    windows = token_windows(llama[1], AutoTokenizer.from_pretrained(llama[0]), 4, 32)
    for w in windows:
        prompt_logprobs(model, w)
    ratio = max(seen).item() / (127 * down.input_scale.item())
    assert 0.5 < ratio <= 1.1, ratio  # the scale is the calibrated max (layer 0 sees exactly its calibration input)


@pytest.mark.parametrize("kw, message", [
    (dict(rotate="sideways"), "--rotate 'sideways': use down_proj"),
    (dict(rotate_block=48), "--rotate-block 48: use a power of two"),
    (dict(rotate="none", rotate_block=64), "--rotate-block 64 with --rotate none"),
])
def test_bad_rotation_options_are_refused(kw, message):
    with pytest.raises(OptionsError, match=message):
        QuantizeOptions(**kw)


def test_block_that_does_not_divide_is_refused_before_weights_are_read(llama, tmp_path):
    with pytest.raises(OptionsError, match="--rotate-block 128: mlp.down_proj's input size 192 is not a multiple"):
        _q(llama, tmp_path / "x", rotate_block=128)
    assert not (tmp_path / "x").exists()


def test_naive_baseline_is_not_rotated_unless_asked(llama, tmp_path):
    _q(llama, tmp_path / "n", smooth=False)
    assert "rotation" not in _qc(tmp_path / "n") and _qc(tmp_path / "n")["format_version"] == 1
    _q(llama, tmp_path / "nr", smooth=False, rotate="down_proj")
    assert _qc(tmp_path / "nr")["rotation"]["block_size"] == 64


@pytest.mark.parametrize("arch", MOE_ARCHS[:1], ids=lambda a: a.removesuffix("ForCausalLM"))
def test_moe_experts_are_not_rotated_and_asking_is_an_error(arch, tmp_path):
    model, calib = save_tiny(arch, tmp_path / "m"), calib_text(tmp_path / "c.txt")
    r = quantize(str(model), tmp_path / "d", calib, QuantizeOptions(num_samples=4, seq_len=32))
    assert "rotation" not in _qc(tmp_path / "d") and "fused-MoE kernel" in r.rotation
    with pytest.raises(OptionsError, match="--rotate down_proj: MixtralForCausalLM's MLP output projections are its "
                                           "experts' down projections"):
        quantize(str(model), tmp_path / "e", calib, QuantizeOptions(num_samples=4, seq_len=32, rotate="down_proj"))


@pytest.mark.parametrize("change, message", [
    ({"format_version": 2}, r"\['rotation'\] needs format_version 3"),
    ({"rotation": {"type": "hadamard", "matrix": "sylvester", "block_size": 48, "targets": ["down_proj"]}},
     "block_size'] = 48 must be a power of two"),
    ({"rotation": {"type": "random-hadamard", "matrix": "sylvester", "block_size": 64, "targets": ["down_proj"]}},
     r"\['rotation'\]\['type'\] = 'random-hadamard' is not supported"),
    ({"rotation": {"type": "hadamard", "matrix": "sylvester", "block_size": 64, "targets": []}}, "non-empty list"),
    ({"rotation": {"type": "hadamard", "matrix": "sylvester", "block_size": 64, "targets": ["x"], "seed": 1}},
     r"unknown key\(s\) \['seed'\]"),
])
def test_format_3_rotation_is_validated(llama, tmp_path, change, message):
    _q(llama, tmp_path / "d")
    qc = {**_qc(tmp_path / "d"), **change}
    with pytest.raises(FormatError, match=message):
        SmoothQuantFormat.from_dict(qc)
