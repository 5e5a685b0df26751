import copy
import json

import pytest
import torch
from reference import fake_quant_per_token, fake_quant_static, paper_scales
from tiny_models import calib_text, save_tiny, tiny_model

from vllm_smoothquant.format import SmoothQuantFormat
from vllm_smoothquant.offline.alpha_search import GRID, BlockProbe, group_error, search_alpha
from vllm_smoothquant.offline.layer_smoothing import smooth_layer
from vllm_smoothquant.offline.mappings import attention_heads, layer_linears, mapping_for
from vllm_smoothquant.offline.options import ACTIVATION_SCHEMES, STATIC, TOKEN, QuantizeOptions
from vllm_smoothquant.offline.pipeline import quantize
from vllm_smoothquant.offline.streaming import capture_layer_inputs, record_inputs, run_layer


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


# ---------------------------------------------------------------- the block objective (decoder layer output)
def _layer_and_inputs(windows=3, seq=32):
    """Layer 0 of a tiny Llama (fp32, outliers), its calibration inputs per window and their call arguments."""
    model = tiny_model("LlamaForCausalLM")
    mapping = mapping_for(model.config)
    layers = model.get_submodule(mapping.layers)
    ids = torch.randint(0, model.config.vocab_size, (windows, seq), generator=torch.Generator().manual_seed(1))
    inputs = capture_layer_inputs(model, layers, ids.tolist(), "cpu", torch.float32, mapping.layer_returns_tuple, 1)
    return model, mapping, layers[0], inputs


def _input_rows(layer, inputs) -> dict[str, torch.Tensor]:
    """Every linear's input rows over all windows, recorded by plain hooks (reference, not record_inputs)."""
    rows: dict[str, list[torch.Tensor]] = {}

    def keep(name):
        return lambda _m, a: rows.setdefault(name, []).append(a[0].reshape(-1, a[0].shape[-1]))

    hooks = [m.register_forward_pre_hook(keep(n)) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for h, kw in zip(inputs.hidden, inputs.kwargs[0]):
            layer(h, **kw)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in rows.items()}


def _reference_qkv_block_error(layer, inputs, x_rows, alpha, static, probe_batches):
    """The paper's qkv smoothing with ``alpha`` folded into a copy of the layer, then every linear W8A8
    (per-channel int8 weights, per-token or static per-tensor int8 inputs), run on the probe batches:
    ||out - fp out||^2 / ||fp out||^2."""
    q = copy.deepcopy(layer)
    qkv = [q.get_submodule(f"self_attn.{p}_proj") for p in "qkv"]
    s = paper_scales(x_rows["self_attn.q_proj"], [lin.weight for lin in qkv], alpha)
    with torch.no_grad():
        q.input_layernorm.weight /= s
        for lin in qkv:
            lin.weight *= s
    hooks = []
    for n, lin in q.named_modules():
        if not isinstance(lin, torch.nn.Linear):
            continue
        with torch.no_grad():
            scale = lin.weight.abs().amax(1, keepdim=True) / 127
            lin.weight.copy_(torch.round(lin.weight / scale) * scale)
        absmax = x_rows[n].abs().amax() if n not in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") \
            else (x_rows[n] / s).abs().amax()
        fq = (lambda x, a=absmax: fake_quant_static(x, a / 127)) if static else fake_quant_per_token
        hooks.append(lin.register_forward_pre_hook(lambda _m, a, fq=fq: (fq(a[0]),)))
    num = den = 0.0
    with torch.no_grad():
        for h, kw in zip(inputs.hidden[:probe_batches], inputs.kwargs[0][:probe_batches]):
            ref, out = layer(h, **kw), q(h, **kw)
            ref, out = (ref[0], out[0]) if isinstance(ref, tuple) else (ref, out)
            num += ((out - ref) ** 2).sum().item()
            den += (ref**2).sum().item()
    return num / den


def _auto_smooth(layer, mapping, model, inputs, activations, probe_batches=2):
    """smooth_layer(alpha="auto") with a block probe on the first ``probe_batches`` windows; (after, reports)."""
    linears = layer_linears(layer)
    with record_inputs(linears) as (absmax, _):
        outs = run_layer(layer, inputs.hidden, inputs.kwargs[0])
    probe = BlockProbe.first_batches(inputs.hidden, inputs.kwargs[0], outs, probe_batches * outs[0].shape[1])
    assert len(probe.hidden) == probe_batches
    schemes = {n: ACTIVATION_SCHEMES[activations] for n in linears}
    return smooth_layer(layer, 0, list(mapping.groups), absmax, "auto", attention_heads(model.config),
                        schemes=schemes, probe=probe)


@pytest.mark.parametrize("activations", ["token", "static"])
def test_block_search_picks_the_grid_minimum_of_the_layer_output_error(activations):
    model, mapping, layer, inputs = _layer_and_inputs()
    x_rows = _input_rows(layer, inputs)
    errors = {a: _reference_qkv_block_error(layer, inputs, x_rows, a, activations == "static", 2) for a in GRID}
    _, reports = _auto_smooth(copy.deepcopy(layer), mapping, model, inputs, activations)
    chosen = {r.group: r.alpha for r in reports}
    assert list(chosen) == ["qkv", "gate_up", "o", "down"]
    # qkv is searched first (no earlier choice): its alpha minimizes the independently recomputed error
    assert errors[chosen["qkv"]] == pytest.approx(min(errors.values()), rel=1e-4)
    assert min(errors.values()) < errors[0.0]  # the objective discriminates: smoothing changes the block error


def test_auto_smoothed_layer_is_exact_in_fp32_and_undoes_every_candidate():
    model, mapping, layer, inputs = _layer_and_inputs()
    ref = run_layer(layer, inputs.hidden, inputs.kwargs[0])
    searched = copy.deepcopy(layer)
    _, reports = _auto_smooth(searched, mapping, model, inputs, "static")
    for out, r in zip(run_layer(searched, inputs.hidden, inputs.kwargs[0]), ref):
        torch.testing.assert_close(out, r, rtol=1e-4, atol=1e-5)  # smoothing only: the same function
    # the tried-and-undone candidates left nothing behind: the same tensors as smoothing with the chosen alphas
    fixed = copy.deepcopy(layer)
    with record_inputs(layer_linears(fixed)) as (absmax, _):
        run_layer(fixed, inputs.hidden, inputs.kwargs[0])
    for g, r in zip(mapping.groups, reports):
        smooth_layer(fixed, 0, [g], absmax, r.alpha, attention_heads(model.config))
    for k, v in fixed.state_dict().items():
        assert torch.equal(searched.state_dict()[k], v), k


# Qwen2-MoE: block objective on qkv, o and shared_down; the group-local one on moe and every expert's down
GROUPS = {"LlamaForCausalLM": ("qkv", "gate_up", "o", "down"),
          "Qwen2MoeForCausalLM": ("qkv", "moe", "o", "down.0", "down.1", "down.2", "down.3", "shared_down")}


@pytest.mark.parametrize("arch, activations", [("LlamaForCausalLM", STATIC), ("Qwen2MoeForCausalLM", TOKEN)],
                         ids=["llama-static", "qwen2moe-token"])
def test_quantize_with_alpha_auto_stores_every_groups_alpha(tmp_path, arch, activations):
    model = save_tiny(arch, tmp_path / "model")
    calib = calib_text(tmp_path / "calib.txt")
    quantize(str(model), tmp_path / "auto", calib,
             QuantizeOptions(alpha="auto", activations=activations, num_samples=3, seq_len=32))
    config = json.loads((tmp_path / "auto" / "config.json").read_text())
    fmt = SmoothQuantFormat.from_dict(config["quantization_config"])
    assert fmt.alpha == "auto"
    assert sorted(fmt.alphas) == sorted(f"{i}.{g}" for i in range(2) for g in GROUPS[arch])
    assert all(a in GRID for a in fmt.alphas.values())
