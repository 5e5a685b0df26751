import pytest
import torch
from reference import fake_quant_per_token, paper_scales

from vllm_smoothquant.offline.alpha_search import GRID, group_error, search_alpha
from vllm_smoothquant.offline.options import ACTIVATION_SCHEMES, TOKEN


def _outlier_group(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 64, generator=g)
    x[:, [3, 17]] *= 60  # activation outlier channels, as in LLMs
    ws = [torch.randn(32, 64, generator=g) * 0.05, torch.randn(16, 64, generator=g) * 0.05]
    return x, ws


def test_group_error_matches_reference_w8a8():
    x, ws = _outlier_group()
    s = paper_scales(x, ws, 0.5)
    ref_num = ref_den = 0.0
    for w in ws:
        ws_ = w * s
        wq = torch.round(ws_ / (ws_.abs().amax(1, keepdim=True) / 127)) * (ws_.abs().amax(1, keepdim=True) / 127)
        ref_num += ((fake_quant_per_token(x / s) @ wq.T - x @ w.T) ** 2).sum().item()
        ref_den += ((x @ w.T) ** 2).sum().item()
    got = group_error(x, ws, s, x.abs().amax(0), TOKEN, "channel")
    assert got == pytest.approx(ref_num / ref_den, rel=1e-4)


@pytest.mark.parametrize("activations", ["token", "static"])
def test_search_picks_the_grid_minimum_and_beats_no_smoothing(activations):
    x, ws = _outlier_group()
    best, errors = search_alpha(lambda a: paper_scales(x, ws, a), x, ws, x.abs().amax(0),
                                ACTIVATION_SCHEMES[activations], "channel")
    assert set(errors) == set(GRID) and errors[best] == min(errors.values())
    assert errors[best] < 0.5 * errors[0.0]  # migrating the outliers more than halves the W8A8 error
    assert 0.0 < best < 1.0
