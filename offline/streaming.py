"""Run a causal LM decoder layer by decoder layer (streaming calibration).

1. :func:`capture_layer_inputs` runs only the embeddings: every decoder layer is swapped for a
   catcher that records its call (hidden states and keyword arguments: attention mask, rotary
   position embeddings, ...) and passes the hidden states through. So each layer gets exactly
   the arguments the model's own forward would give it, per layer (sliding/full masks differ).
   Windows of equal length go through in batches of ``batch_size``, so each layer runs a few large
   forwards instead of one small forward per window.
2. :func:`run_layer` pushes the recorded hidden states of all batches through one layer.

With the layer's output as the next layer's input, only one decoder layer at a time needs to be
on the compute device in the compute dtype; the rest of the model stays in its storage dtype.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .quantization import fake_quant_activations


@dataclass
class LayerInputs:
    hidden: list[torch.Tensor]  # per batch: [windows in the batch, seq, hidden]
    kwargs: list[list[dict]]  # [layer][batch]: keyword arguments of that layer's call


def batches(windows: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Windows grouped by length (a batch needs no padding), at most ``batch_size`` per batch, in order."""
    by_len: dict[int, list[list[int]]] = {}
    for w in windows:
        by_len.setdefault(len(w), []).append(w)
    return [ws[i:i + batch_size] for ws in by_len.values() for i in range(0, len(ws), batch_size)]


class _Catcher(nn.Module):
    def __init__(self, calls: list[dict], returns_tuple: bool):
        super().__init__()
        self.calls, self.returns_tuple = calls, returns_tuple

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise TypeError("decoder layer called with extra positional arguments; streaming needs keyword arguments")
        self.calls.append(kwargs)
        return (hidden_states,) if self.returns_tuple else hidden_states


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, windows: list[list[int]],
                         device: str | torch.device, dtype: torch.dtype, returns_tuple: bool = False,
                         batch_size: int = 1) -> LayerInputs:
    """Layer 0's hidden states per batch of windows (see :func:`batches`) and every layer's keyword arguments.

    ``returns_tuple``: the model's layers return ``(hidden_states, ...)`` (BLOOM, Falcon), so the
    catchers do too.

    Everything but the decoder layers (embeddings, rotary tables, final norm) is moved to
    ``device``/``dtype`` here; the layers are left where they are.
    """
    originals = list(layers)
    calls: list[list[dict]] = [[] for _ in originals]
    hidden: list[torch.Tensor] = []
    first = _Catcher(calls[0], returns_tuple)
    first.register_forward_hook(lambda _m, args, kwargs, _out: hidden.append(
        (args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True)
    for i in range(len(originals)):
        layers[i] = first if i == 0 else _Catcher(calls[i], returns_tuple)
    try:
        to_compute(model, device, dtype)  # the catchers hold no weights: only the non-layer modules move
        for batch in batches(windows, batch_size):
            model.base_model(torch.tensor(batch, device=device), use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return LayerInputs(hidden, calls)


def to_compute(module: nn.Module, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """Move ``module`` to ``device`` and its floating-point *parameters* to ``dtype``; buffers keep
    their dtype (rotary ``inv_freq`` stays float32, as the model made it)."""
    module.to(device)
    for p in module.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return module


def _as_hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_layer(layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    """The layer's output hidden states for every batch."""
    return [_as_hidden(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]


@contextmanager
def record_inputs(linears: dict[str, nn.Linear], sample_rows: int = 0, num_calls: int = 1):
    """Record ``{name: max|X| per input channel [in] float32}`` of each linear's input while active.

    With ``sample_rows > 0`` also ``{name: [<= sample_rows, in]}`` input rows, drawn evenly from
    each of the layer's ``num_calls`` calls (one per batch; for ``--alpha auto``). Yields
    ``(absmax, samples)``, filled as the layer runs.
    """
    absmax: dict[str, torch.Tensor] = {}
    samples: dict[str, list[torch.Tensor]] = {}
    per_call = -(-sample_rows // num_calls) if sample_rows else 0
    g = torch.Generator().manual_seed(0)

    def hook(name):
        def fn(_mod, inputs):
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1])
            m = x.abs().amax(dim=0).float()
            absmax[name] = torch.maximum(absmax[name], m) if name in absmax else m
            if per_call:
                idx = torch.randperm(x.shape[0], generator=g)[:per_call].to(x.device)
                samples.setdefault(name, []).append(x[idx].float())

        return fn

    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in linears.items()]
    out_samples: dict[str, torch.Tensor] = {}
    try:
        yield absmax, out_samples
    finally:
        for h in handles:
            h.remove()
        out_samples.update({k: torch.cat(v)[:sample_rows] for k, v in samples.items()})


@contextmanager
def quantized_activations(linears: dict[str, nn.Linear], schemes: dict[str, str],
                          input_absmax: dict[str, torch.Tensor]):
    """While active, each linear's input is int8 quantize-dequantized as vLLM's kernel does it
    (``schemes[name]``: "token" or "static" with scale ``input_absmax[name].max() / 127``)."""

    def hook(name):
        scheme = schemes[name]
        absmax = input_absmax[name].amax() if scheme == "static" else None

        def fn(_mod, inputs):
            x = inputs[0]
            xq = fake_quant_activations(x.reshape(-1, x.shape[-1]).float(), scheme, absmax)
            return (xq.reshape(x.shape).to(x.dtype),)

        return fn

    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in linears.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
