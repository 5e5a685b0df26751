"""GPTQ rounding (offline/gptq.py): against a plain reference of the algorithm, never worse than round to nearest on
the calibration inputs, exactly round to nearest where inputs are uncorrelated, safe on dead columns and singular
Hessians; through ``quantize()`` and the CLI (``--weight-rounding gptq``)."""

import json
import warnings

import pytest
import torch
from reference import load_fake_quant_model
from safetensors.torch import load_file
from tiny_models import WORDS, calib_text, save_tiny, tiny_tokenizer

from vllm_smoothquant.format import FormatError, SmoothQuantFormat
from vllm_smoothquant.offline.cli import main
from vllm_smoothquant.offline.gptq import (
    GPTQFallbackWarning,
    gptq_quantize,
    gptq_quantize_linears,
    gptq_round,
    output_error,
    record_hessians,
)
from vllm_smoothquant.offline.options import OptionsError, QuantizeOptions
from vllm_smoothquant.offline.pipeline import quantize
from vllm_smoothquant.offline.quantization import quantize_weight, weight_scale


def reference_gptq(w, scale, x, damp=0.01, order=None):
    """GPTQ as first written (Frantar et al. 2022, eq. 2-3): the explicit inverse Hessian, downdated after each
    column (fp64, no blocks, no Cholesky)."""
    w, x = w.double().clone(), x.double()
    h = 2 / x.shape[0] * x.T @ x
    h[torch.arange(len(h)), torch.arange(len(h))] += damp * h.diagonal().mean()
    hinv = torch.linalg.inv(h)
    s = scale.double().reshape(-1).expand(w.shape[0])
    q = torch.zeros_like(w)
    left = list(range(w.shape[1])) if order is None else order.tolist()
    for j in list(left):
        q[:, j] = torch.round(w[:, j] / s).clamp(-127, 127)
        err = (w[:, j] - q[:, j] * s) / hinv[j, j]
        left.remove(j)
        w[:, left] -= err[:, None] * hinv[j, left][None]
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]  # OBS: drop column j from the inverse
    return q


def correlated_inputs(n=1024, cols=96, seed=0, outliers=(3, 40)):
    """Inputs with a low-rank shared part (correlated channels) and a few large outlier channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g) @ torch.randn(8, cols, generator=g) + 0.3 * torch.randn(n, cols, generator=g)
    x[:, list(outliers)] *= 25
    return x


def hessian(x):
    return 2 / x.shape[0] * x.T.double() @ x.double()


def weights(rows=48, cols=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[:, 7] *= 10  # an outlier weight column
    return w


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_matches_the_reference_algorithm(strategy):
    x, w = correlated_inputs(), weights()
    scale = weight_scale(w, strategy)
    q = gptq_round(w, scale, hessian(x).float(), block=32)  # several lazy blocks
    ref = reference_gptq(w, scale, x)
    assert (q.double() - ref).abs().max() <= 1  # fp32 vs fp64: a value on a rounding tie may go either way
    assert (q.double() == ref).float().mean() > 0.99


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_output_error_is_the_relative_error_of_the_outputs(strategy):
    x, w = correlated_inputs(), weights()
    q, s = quantize_weight(w, strategy)
    direct = ((x @ w.T - x @ (q * s).T).norm() ** 2 / (x @ w.T).norm() ** 2).item()
    assert output_error(w, q * s, hessian(x).float()) == pytest.approx(direct, rel=1e-3)


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_never_worse_than_nearest_and_better_on_correlated_inputs(strategy, seed):
    g = torch.Generator().manual_seed(seed)
    x_iid = torch.randn(2048, 96, generator=g)
    x_iid[:, [5, 60]] *= 20  # outlier channels, uncorrelated
    w = weights(seed=seed + 10)
    for x, strictly in ((x_iid, False), (correlated_inputs(seed=seed), True)):
        h = hessian(x).float()
        qn, s = quantize_weight(w, strategy)
        qg, sg = gptq_quantize(w, h, strategy)
        assert torch.equal(s, sg)
        nearest, gptq = output_error(w, qn * s, h), output_error(w, qg * s, h)
        assert gptq <= nearest * (1 + 1e-6)
        if strictly:
            assert gptq < 0.5 * nearest


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_uncorrelated_equal_scale_inputs_give_round_to_nearest(strategy):
    w = weights()
    qn, s = quantize_weight(w, strategy)
    for h in (torch.eye(96), 3.5 * torch.eye(96)):
        q, scale = gptq_quantize(w, h, strategy)
        assert torch.equal(q, qn) and torch.equal(scale, s)


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_act_order_is_valid_int8_with_the_same_scale(strategy):
    x, w = correlated_inputs(), weights()
    h = hessian(x).float()
    q, s = gptq_quantize(w, h, strategy, act_order=True)
    assert q.dtype == torch.int8 and q.shape == w.shape and q.abs().max() <= 127
    assert torch.equal(s, weight_scale(w, strategy))
    qn, _ = quantize_weight(w, strategy)
    assert output_error(w, q * s, h) < output_error(w, qn * s, h)
    order = torch.argsort(h.diagonal(), descending=True)
    ref = reference_gptq(w, s, x, order=order)  # the permutation is undone: columns where they were
    assert (q.double() == ref).float().mean() > 0.99


def test_dead_column_is_rounded_to_nearest_without_nan():
    x, w = correlated_inputs(), weights()
    x[:, 11] = 0  # an input channel that never fires on the calibration text
    q, s = gptq_quantize(w, hessian(x).float())
    assert not torch.isnan(q.float()).any() and q.abs().max() <= 127
    assert torch.equal(q[:, 11], quantize_weight(w)[0][:, 11])


@pytest.mark.parametrize("bad", ["nan", "negative"])
def test_a_hessian_that_cannot_be_inverted_falls_back_to_nearest_naming_the_linear(bad):
    w = weights()
    h = torch.full((96, 96), float("nan")) if bad == "nan" else -torch.eye(96)
    with pytest.warns(GPTQFallbackWarning, match=r"model\.layers\.3\.mlp\.down_proj.*--gptq-damp"):
        q, s = gptq_quantize(w, h, name="model.layers.3.mlp.down_proj")
    assert torch.equal(q, quantize_weight(w)[0])


def test_a_hessian_that_needs_more_damping_gets_it():
    h = torch.diag(torch.tensor([1.0] * 95 + [-0.05]))  # mean diag ~0.99: 0.01 x that leaves it indefinite, 0.1 not
    with warnings.catch_warnings():
        warnings.simplefilter("error", GPTQFallbackWarning)
        q, _ = gptq_quantize(weights(), h, damp=0.01)
    assert q.abs().max() <= 127 and torch.equal(q, quantize_weight(weights())[0])  # diagonal H: no error spread


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_linears_sharing_a_hessian_run_stacked_with_their_own_scales(strategy):
    h = hessian(correlated_inputs()).float()
    ws = {"q": weights(seed=1), "k": 5 * weights(rows=16, seed=2), "o": weights(rows=8, seed=3)}
    hs = {"q": h, "k": h, "o": hessian(correlated_inputs(seed=4)).float()}
    got = gptq_quantize_linears(ws, hs, strategy)
    for n, w in ws.items():
        q, s = gptq_quantize(w, hs[n], strategy)
        assert torch.equal(got[n][1], s) and got[n][0].shape == w.shape
        assert (got[n][0] == q).float().mean() > 0.999  # the same up to fp summation order in the block updates


class _Shared(torch.nn.Module):
    """q and k read the same tensor (as q/k/v do), o another."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.o = (torch.nn.Linear(6, 6) for _ in range(3))

    def forward(self, x):
        return self.o(self.q(x) + self.k(x))


def test_recorded_hessians_share_one_input_and_average_over_batches():
    torch.manual_seed(0)
    m, xs = _Shared(), [torch.randn(2, 5, 6), torch.randn(3, 4, 6)]
    linears = {"q": m.q, "k": m.k, "o": m.o}
    with record_hessians(linears) as hs:
        outs = [m(x) for x in xs]
    rows = torch.cat([x.reshape(-1, 6) for x in xs])
    assert hs["q"] is hs["k"] and hs["o"] is not hs["q"]
    torch.testing.assert_close(hs["q"], 2 / len(rows) * rows.T @ rows)
    mid = torch.cat([(m.q(x) + m.k(x)).reshape(-1, 6) for x in xs]).detach()
    torch.testing.assert_close(hs["o"], 2 / len(mid) * mid.T @ mid)
    assert all(not lin._forward_pre_hooks for lin in linears.values()) and len(outs) == 2


# --- through quantize() and the CLI ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    model, calib = save_tiny("LlamaForCausalLM", root / "llama"), calib_text(root / "calib.txt", words=8000)
    out = {}
    for rounding in ("nearest", "gptq"):
        opts = QuantizeOptions(num_samples=16, seq_len=64, weight_rounding=rounding)
        out[rounding] = (quantize(str(model), root / rounding, calib, opts), root / rounding)
    return model, out


def _tensors(ckpt):
    return load_file(ckpt / "model.safetensors")


def test_gptq_checkpoint_has_the_nearest_ones_tensors_and_records_the_rounding(runs):
    _, out = runs
    tn, tg = _tensors(out["nearest"][1]), _tensors(out["gptq"][1])
    assert tn.keys() == tg.keys()
    assert all(tn[k].dtype == tg[k].dtype and tn[k].shape == tg[k].shape for k in tn)
    layer0 = [k for k in tn if k.startswith("model.layers.0.") and k.endswith(".weight_scale")]
    assert len(layer0) == 7 and all(torch.equal(tn[k], tg[k]) for k in layer0)  # same inputs: the same scales
    assert any(not torch.equal(tn[k], tg[k]) for k in tn if k.endswith("proj.weight"))
    cfg = {r: json.loads((out[r][1] / "config.json").read_text())["quantization_config"] for r in out}
    assert cfg["gptq"]["weight_rounding"] == "gptq" and cfg["nearest"]["weight_rounding"] == "nearest"
    assert SmoothQuantFormat.from_dict(cfg["gptq"]).weight_rounding == "gptq"
    with pytest.raises(FormatError, match=r"\['weight_rounding'\] = 'awq' is not supported"):
        SmoothQuantFormat.from_dict({**cfg["gptq"], "weight_rounding": "awq"})
    del cfg["gptq"]["weight_rounding"]  # an older checkpoint: no field, round to nearest
    assert SmoothQuantFormat.from_dict(cfg["gptq"]).weight_rounding == "nearest"


def test_report_has_both_errors_per_linear(runs):
    _, out = runs
    rep = json.loads((out["gptq"][1] / "smoothquant" / "report.json").read_text())["weight_rounding"]
    assert rep["method"] == "gptq" and rep["damp"] == 0.01 and rep["act_order"] is False
    assert len(rep["linears"]) == 2 * 7
    for x in rep["linears"]:
        assert 0 < x["gptq"] <= x["nearest"] * (1 + 1e-6), x
    means = rep["mean_output_error"]
    assert means["all"]["linears"] == 14 and means["mlp.down_proj"]["linears"] == 2
    assert means["all"]["gptq"] < 0.5 * means["all"]["nearest"]
    nearest = json.loads((out["nearest"][1] / "smoothquant" / "report.json").read_text())["weight_rounding"]
    assert nearest == {"method": "nearest"}


def test_gptq_without_smoothing_still_calibrates(tmp_path):
    """Naive W8A8 per token needs no calibration forward with round to nearest; with gptq it needs the Hessians."""
    from vllm_smoothquant.format import WeightScheme

    model, calib = save_tiny("Qwen2ForCausalLM", tmp_path / "m", layers=1), calib_text(tmp_path / "c.txt")
    opts = QuantizeOptions(smooth=False, weights=WeightScheme("tensor"), num_samples=4, seq_len=32,
                           weight_rounding="gptq", gptq_act_order=True)
    r = quantize(str(model), tmp_path / "o", calib, opts)
    assert r.activations.startswith("0.00 GiB (4 windows")
    rep = json.loads((tmp_path / "o" / "smoothquant" / "report.json").read_text())["weight_rounding"]
    assert len(rep["linears"]) == 7 and all(x["gptq"] <= x["nearest"] * (1 + 1e-6) for x in rep["linears"])


def test_gptq_logits_are_closer_to_fp32_than_nearest(runs):
    """On a held-out text (another seed), the fp32 fake-quant model of each checkpoint against the fp32 model."""
    from transformers import AutoModelForCausalLM

    model, out = runs
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    tok = tiny_tokenizer()
    g = torch.Generator().manual_seed(123)
    text = " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (4 * 64,), generator=g).tolist())
    ids = torch.tensor(tok(text)["input_ids"][: 4 * 64]).reshape(4, 64)
    with torch.no_grad():
        want = ref(ids).logits
        err = {r: (load_fake_quant_model(out[r][1])(ids).logits - want).pow(2).mean().item() for r in out}
    assert err["gptq"] < err["nearest"], err


def test_cli_flags_and_summary(runs, tmp_path, capsys):
    model, _ = runs
    calib = calib_text(tmp_path / "c.txt")
    argv = ["quantize", str(model), str(tmp_path / "o"), "--calib", str(calib), "--num-samples", "4", "--seq-len",
            "32", "--weight-rounding", "gptq", "--gptq-damp", "0.05", "--gptq-act-order"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "weight rounding: gptq (damp 0.05, act-order on)" in printed and "mlp.down_proj" in printed
    rep = json.loads((tmp_path / "o" / "smoothquant" / "report.json").read_text())["weight_rounding"]
    assert rep["damp"] == 0.05 and rep["act_order"] is True


@pytest.mark.parametrize("flags, message", [
    (["--gptq-damp", "0.1"], "--gptq-damp with --weight-rounding nearest: it tunes GPTQ"),
    (["--gptq-act-order"], "--gptq-act-order with --weight-rounding nearest"),
    (["--weight-rounding", "gptq", "--gptq-damp", "1.5"], r"--gptq-damp 1.5 is outside \(0, 1\)"),
])
def test_cli_refuses_gptq_settings_without_gptq_and_bad_damping(runs, tmp_path, capsys, flags, message):
    model, _ = runs
    calib = calib_text(tmp_path / "c.txt")
    argv = ["quantize", str(model), str(tmp_path / "o"), "--calib", str(calib), *flags]
    assert main(argv) == 2
    import re

    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_cli_refuses_an_unknown_rounding(runs, tmp_path, capsys):
    model, _ = runs
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(model), str(tmp_path / "o"), "--calib", "x.txt", "--weight-rounding", "awq"])
    assert e.value.code == 2 and "--weight-rounding" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, message", [
    ({"weight_rounding": "awq"}, "--weight-rounding 'awq': use nearest"),
    ({"weight_rounding": "gptq", "gptq_damp": 0}, "--gptq-damp 0 is outside"),
    ({"weight_rounding": "gptq", "gptq_damp": True}, "--gptq-damp True is outside"),
    ({"gptq_damp": 0.1, "gptq_act_order": True}, "--gptq-damp and --gptq-act-order with .* drop them"),
])
def test_options_name_the_flag(kwargs, message):
    with pytest.raises(OptionsError, match=message):
        QuantizeOptions(**kwargs)
