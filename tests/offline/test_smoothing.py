import pytest
import torch
from reference import paper_scales
from tiny_models import ARCHS, tiny_model

from vllm_smoothquant.offline.calibration import collect_input_absmax
from vllm_smoothquant.offline.mappings import mapping_for
from vllm_smoothquant.offline.pipeline import decoder_linears, select_groups, smooth_model
from vllm_smoothquant.offline.smoothing import apply_smoothing, smoothing_scales, weight_absmax


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0], ids=lambda a: f"alpha={a}")
def test_scales_match_paper_formula(alpha):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    x[:, 3] *= 50  # an outlier channel
    ws = [torch.randn(16, 32, generator=g), torch.randn(8, 32, generator=g)]
    lins = [torch.nn.Linear(32, w.shape[0], bias=False) for w in ws]
    for lin, w in zip(lins, ws):
        lin.weight.data = w
    s = smoothing_scales(x.abs().amax(0), weight_absmax(lins), alpha)
    torch.testing.assert_close(s, paper_scales(x, ws, alpha), rtol=1e-5, atol=0)


def test_dead_channels_get_unit_scale():
    s = smoothing_scales(torch.tensor([0.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 4.0]), 0.5)
    assert s[0] == 1 and s[1] == 1 and s[2] == pytest.approx(3**0.5 / 4**0.5)


def test_layernorm_with_bias_and_linear_fold_exactly():
    torch.manual_seed(0)
    ln, lin = torch.nn.LayerNorm(16), torch.nn.Linear(16, 8)
    ln.bias.data.normal_()
    x = torch.randn(4, 16)
    ref = lin(ln(x))
    s = torch.rand(16) * 10 + 0.1
    apply_smoothing(ln, [lin], s, s)
    torch.testing.assert_close(lin(ln(x)), ref, rtol=1e-5, atol=1e-5)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


GROUPS = {"norm-pairs": None, "all-pairs": "all"}


@pytest.mark.parametrize("groups", list(GROUPS), ids=str)
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.removesuffix("ForCausalLM"))
def test_smoothing_is_exact_on_fp32_logits(arch, groups):
    """Smoothing without quantization leaves the fp32 model's logits unchanged (~1e-5 relative)."""
    model = tiny_model(arch)
    mapping = mapping_for(model.config)
    names = tuple(g.name for g in mapping.groups) if GROUPS[groups] == "all" else None
    ids = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    before = _logits(model, ids)
    linears = decoder_linears(model, mapping)
    absmax = collect_input_absmax(model, linears, ids.tolist(), "cpu")
    after_stats, reports = smooth_model(model, mapping, select_groups(mapping, names), absmax, 0.5)
    after = _logits(model, ids)
    rel = ((after - before).norm() / before.norm()).item()
    assert rel < 1e-5, rel
    # the migration did happen, and it flattened the outliers it targeted
    assert reports and all(r.act_max_after < r.act_max_before for r in reports if r.group in ("qkv", "gate_up", "fc1"))
    # the recorded post-smoothing absmax is the true absmax of the smoothed model
    fresh = collect_input_absmax(model, linears, ids.tolist(), "cpu")
    for k in fresh:
        torch.testing.assert_close(after_stats[k], fresh[k], rtol=1e-4, atol=1e-6)
