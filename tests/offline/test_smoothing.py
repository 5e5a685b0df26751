import pytest
import torch
from reference import input_absmax, paper_scales
from tiny_models import ARCHS, tiny_model

from vllm_smoothquant.offline.layer_smoothing import smooth_layer
from vllm_smoothquant.offline.mappings import attention_heads, mapping_for
from vllm_smoothquant.offline.smoothing import apply_smoothing, smoothing_scales, storable_norm_scales, weight_absmax


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


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["gain-w", "gemma-gain-1+w"])
def test_norm_fold_is_exact_in_bf16_storage(offset):
    """With s' from storable_norm_scales the bf16-stored folded gain times s' is the original gain
    (fp32 exact); with s as computed, Gemma's folded gain (1 + w) / s - 1 loses precision in bf16."""
    g = torch.Generator().manual_seed(0)
    norm = torch.nn.RMSNorm(256)
    norm.weight.data = torch.randn(256, generator=g).to(torch.bfloat16).float() * 0.3 + (0.0 if offset else 1.0)
    s = torch.rand(256, generator=g) * 60 + 0.5
    gain = norm.weight + offset
    s_eff = storable_norm_scales(norm.weight, s, offset, torch.bfloat16)
    apply_smoothing(norm, [], s_eff, s_eff, offset)
    stored = norm.weight.to(torch.bfloat16).float()  # what the checkpoint holds
    torch.testing.assert_close(norm.weight, stored, rtol=1e-6, atol=1e-7)  # fp32 fold lands on a bf16 value
    torch.testing.assert_close((stored + offset) * s_eff, gain, rtol=1e-6, atol=0)
    naive = ((gain / s - offset).to(torch.bfloat16).float() + offset) * s
    naive_err = ((naive - gain).abs() / gain.abs()).max().item()
    assert naive_err > (0.05 if offset else 1e-4)  # what the exact fold avoids


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


NORM_PAIRS = ("qkv", "gate_up", "fc1", "qkv_fc1", "qkv_gate_up")  # fed by a norm (Falcon, Command-R: one norm, both)
GROUPS = {"norm-pairs": NORM_PAIRS, "all-pairs": None}


def _smooth(model, names, absmax, alpha):
    """smooth_layer on every decoder layer; returns (absmax after, reports) keyed by full name."""
    mapping = mapping_for(model.config)
    groups = [g for g in mapping.groups if names is None or g.name in names]
    after, reports = {}, []
    for i, layer in enumerate(model.get_submodule(mapping.layers)):
        prefix = f"{mapping.layers}.{i}."
        local = {k.removeprefix(prefix): v for k, v in absmax.items() if k.startswith(prefix)}
        a, r = smooth_layer(layer, i, groups, local, alpha, attention_heads(model.config))
        after.update({prefix + k: v for k, v in a.items()})
        reports += r
    return after, reports


VARIANTS = [pytest.param(arch, None, id=arch.removesuffix("ForCausalLM")) for arch in ARCHS] + [
    pytest.param("FalconForCausalLM", {"multi_query": False}, id="Falcon-no-multi-query")]


@pytest.mark.parametrize("groups", list(GROUPS), ids=str)
@pytest.mark.parametrize("arch, overrides", VARIANTS)
def test_smoothing_is_exact_on_fp32_logits(arch, overrides, groups):
    """Smoothing without quantization leaves the fp32 model's logits unchanged (~1e-5 relative);
    Falcon also without multi_query (v rows interleaved per head)."""
    model = tiny_model(arch, config_overrides=overrides)
    ids = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    before = _logits(model, ids)
    after_stats, reports = _smooth(model, GROUPS[groups], input_absmax(model, ids), 0.5)
    after = _logits(model, ids)
    rel = ((after - before).norm() / before.norm()).item()
    assert rel < 1e-5, rel
    # the migration did happen, and it flattened the outliers it targeted
    assert reports and all(r.act_max_after < r.act_max_before for r in reports if r.group in NORM_PAIRS)
    # the recorded post-smoothing absmax is the true absmax of the smoothed model
    fresh = input_absmax(model, ids)
    for k in fresh:
        torch.testing.assert_close(after_stats[k], fresh[k], rtol=1e-4, atol=1e-6)
