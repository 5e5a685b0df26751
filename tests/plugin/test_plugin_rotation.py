"""The plugin's run-time input rotation: the CPU path equals the reference, each tensor-parallel rank rotating its
own input slice equals rotating the whole input, and a shard that would split a block is refused at load."""

from __future__ import annotations

import pytest
import torch
from reference import hadamard_rotate

from vllm_smoothquant.checkpoint import CheckpointTensorError
from vllm_smoothquant.format import FormatError, RotationScheme, SmoothQuantFormat
from vllm_smoothquant.rotation import InputRotation

FMT = SmoothQuantFormat(rotation=RotationScheme(targets=("mlp.down_proj",), block_size=64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_rotation_equals_the_reference(dtype):
    x = torch.randn(7, 384).to(dtype)
    got = InputRotation(64)(x)
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(got.float(), hadamard_rotate(x.double(), 64).float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("tp", [1, 2, 3, 6])
def test_each_rank_rotating_its_slice_equals_the_whole_rotation(tp):
    """A row-parallel layer's input is sliced along its channels; blocks that never straddle a slice make the
    per-rank rotations the slices of the whole one."""
    x = torch.randn(5, 384, dtype=torch.float64)
    whole = hadamard_rotate(x, 64)
    k = 384 // tp
    ranks = [InputRotation(64).double()(x[:, r * k:(r + 1) * k]) for r in range(tp)]
    assert torch.allclose(torch.cat(ranks, dim=1), whole, atol=1e-12)


def _method(block):
    from vllm_smoothquant.linear_method import SmoothQuantLinearMethod

    return SmoothQuantLinearMethod(FMT, "model.layers.3.mlp.down_proj", rotation_block=block)


def test_shard_that_splits_a_block_is_refused_naming_the_layer():
    m = _method(64)
    assert m._input_rotation(192, 384).block == 64  # TP 2: 192 = 3 blocks per rank
    with pytest.raises(CheckpointTensorError, match=r"model\.layers\.3\.mlp\.down_proj: its input \(384 channels\) "
                                                    r"is rotated in Hadamard blocks of 64.*tensor-parallel size 4 each "
                                                    r"rank holds 96 channels"):
        m._input_rotation(96, 384)


def test_config_rotates_only_the_targets_and_refuses_a_half_rotated_fused_layer():
    from vllm_smoothquant.config import SmoothQuantConfig

    cfg = SmoothQuantConfig(FMT)
    cfg.packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}
    assert cfg.rotation_for("model.layers.0.mlp.down_proj") == 64
    assert cfg.rotation_for("model.layers.0.mlp.gate_up_proj") is None
    half = SmoothQuantConfig(SmoothQuantFormat(rotation=RotationScheme(targets=("up_proj",), block_size=64)))
    half.packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}
    with pytest.raises(FormatError, match="model.layers.0.mlp.gate_up_proj: vLLM runs gate_proj, up_proj as one "
                                          "fused layer with one input"):
        half.rotation_for("model.layers.0.mlp.gate_up_proj")


def test_a_compressed_tensors_rotation_matrix_is_checked_as_it_loads():
    """A compressed-tensors checkpoint's <linear>.R4_input.weight: compressed-tensors' deterministic Hadamard matrix
    loads (and is dropped); any other matrix is an error naming the tensor and the fix."""
    from compressed_tensors.transform import deterministic_hadamard_matrix

    from vllm_smoothquant.format import COMPRESSED_TENSORS
    from vllm_smoothquant.linear_method import SmoothQuantLinearMethod

    fmt = SmoothQuantFormat(rotation=FMT.rotation, quant_method=COMPRESSED_TENSORS, rotation_tensor="R4_input")
    holder = SmoothQuantLinearMethod(fmt, "model.layers.3.mlp.down_proj", rotation_block=64)._rotation_matrix()
    good = deterministic_hadamard_matrix(64, torch.bfloat16)
    holder.weight.weight_loader(holder.weight, good)
    bad = good.clone()
    bad[0, 1] = -bad[0, 1]
    with pytest.raises(CheckpointTensorError, match=r"model\.layers\.3\.mlp\.down_proj\.R4_input\.weight: .*not "
                                                    r"compressed-tensors' deterministic_hadamard_matrix\(64\).*without "
                                                    r"--quantization smoothquant"):
        holder.weight.weight_loader(holder.weight, bad)
