import pytest
import torch

from vllm_smoothquant.offline.quantization import quantize_weight, static_input_scale


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_int8_round_trip_error_is_at_most_half_a_step(strategy):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g) * torch.logspace(-2, 1, 32).unsqueeze(1)
    q, s = quantize_weight(w, strategy)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert s.shape == ((32, 1) if strategy == "channel" else (1,))
    assert q.abs().max() <= 127
    err = (w - q.float() * s).abs()
    assert (err <= s / 2 + 1e-7).all()
    # the largest |w| of each row (channel) or of the tensor maps to +-127 exactly
    assert (q.abs().amax(dim=1) == 127).all() if strategy == "channel" else q.abs().max() == 127


def test_zero_row_gets_tiny_positive_scale():
    q, s = quantize_weight(torch.zeros(2, 4))
    assert (s > 0).all() and (q == 0).all()


def test_static_input_scale():
    assert static_input_scale(torch.tensor([1.0, 254.0, 3.0])).item() == pytest.approx(2.0)
