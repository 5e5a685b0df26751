import pytest
import torch
from reference import fake_quant_per_token, input_absmax
from tiny_models import ARCHS, tiny_model

from vllm_smoothquant.offline.mappings import layer_linears, mapping_for
from vllm_smoothquant.offline.options import ACTIVATION_SCHEMES
from vllm_smoothquant.offline.streaming import (
    Activations,
    batches,
    capture_layer_inputs,
    quantized_activations,
    record_inputs,
    run_layer,
)

ARCH_IDS = lambda a: a.removesuffix("ForCausalLM")  # noqa: E731


def _windows():
    return torch.randint(3, 512, (3, 40), generator=torch.Generator().manual_seed(2)).tolist()


@pytest.mark.parametrize("batch_size", [1, 2], ids=["batch1", "batch2"])
@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_layer_by_layer_reproduces_the_model_and_its_statistics(arch, batch_size):
    """Captured layer arguments replayed layer by layer give the model's own last-layer output and the
    same per-channel input absmax as one whole-model forward, one window per forward or batched."""
    model = tiny_model(arch, layers=3)
    mapping = mapping_for(model.config)
    layers = model.get_submodule(mapping.layers)
    windows = _windows()
    want_out = []
    h = layers[-1].register_forward_hook(lambda _m, _i, out: want_out.append(out[0] if isinstance(out, tuple) else out))
    want_absmax = input_absmax(model, torch.tensor(windows))
    h.remove()

    inputs = capture_layer_inputs(model, layers, windows, "cpu", torch.float32, mapping.layer_returns_tuple,
                                  batch_size)
    hidden = inputs.hidden
    assert [h.shape[0] for h in hidden] == ([1, 1, 1] if batch_size == 1 else [2, 1])
    for i, layer in enumerate(layers):
        with record_inputs(layer_linears(layer)) as (absmax, _):
            hidden = run_layer(layer, hidden, inputs.kwargs[i])
        for name, a in absmax.items():
            torch.testing.assert_close(a, want_absmax[f"{mapping.layers}.{i}.{name}"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat(hidden), want_out[0], rtol=1e-5, atol=1e-5)


def test_batches_group_equal_lengths_in_order():
    ws = [[1] * 4, [2] * 3, [3] * 4, [4] * 4, [5] * 3]
    assert batches(ws, 2) == [[[1] * 4, [3] * 4], [[4] * 4], [[2] * 3, [5] * 3]]
    assert batches(ws, 8) == [[[1] * 4, [3] * 4, [4] * 4], [[2] * 3, [5] * 3]]


def test_samples_are_drawn_from_every_call():
    lin = torch.nn.Linear(8, 4)
    xs = [torch.full((1, 10, 8), float(k)) for k in range(4)]
    with record_inputs({"lin": lin}, sample_rows=8, num_calls=4) as (absmax, samples):
        for x in xs:
            lin(x)
    assert samples["lin"].shape == (8, 8)
    assert sorted(samples["lin"][:, 0].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert absmax["lin"].tolist() == [3.0] * 8


@pytest.mark.parametrize("scheme", ["token", "static"])
def test_quantized_activations_simulate_the_int8_kernel(scheme):
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(2, 5, 16) * 3
    absmax = {"lin": x.abs().amax((0, 1)) * 1.5}  # a calibrated max above this batch's max
    with quantized_activations({"lin": lin}, {"lin": ACTIVATION_SCHEMES[scheme]}, absmax):
        got = lin(x)
    scale = absmax["lin"].max() / 127
    xq = fake_quant_per_token(x) if scheme == "token" else torch.round(x / scale).clamp(-128, 127) * scale
    torch.testing.assert_close(got, xq @ lin.weight.T)
    torch.testing.assert_close(lin(x), x @ lin.weight.T)  # hooks removed on exit


@pytest.mark.parametrize("offload", [None, "disk"], ids=["on-device", "disk"])
def test_activations_store_round_trips_and_updates_in_place(tmp_path, offload):
    """Batches come back bit for bit wherever they are kept; run_layer(update=True) replaces each batch by the
    layer's output (the next layer's input); closing removes the files."""
    torch.manual_seed(0)
    xs = [torch.randn(2, 5, 8), torch.randn(1, 7, 8)]
    store = Activations("cpu", offload, tmp_path / "acts" if offload else None)
    if offload:
        (tmp_path / "acts").mkdir()
    for x in xs:
        store.append(x)
    assert len(store) == 2 and store.nbytes == sum(x.numel() * 4 for x in xs)
    assert all(torch.equal(store[j], x) for j, x in enumerate(xs))
    lin = torch.nn.Linear(8, 8)
    run_layer(lin, store, [{}, {}], update=True)
    assert all(torch.equal(store[j], lin(x)) for j, x in enumerate(xs))
    if offload:
        assert len(list((tmp_path / "acts").iterdir())) == 2  # the replaced batches' files are gone
    store.close()
    assert not (tmp_path / "acts").exists()
