"""Run a causal LM decoder layer by decoder layer (streaming calibration).

1. :func:`capture_layer_inputs` runs only the embeddings: every decoder layer is swapped for a
   catcher that records its call (hidden states and keyword arguments: attention mask, rotary
   position embeddings, ...) and passes the hidden states through. So each layer gets exactly
   the arguments the model's own forward would give it, per layer (sliding/full masks differ).
   Windows of equal length go through in batches of ``batch_size``, so each layer runs a few large
   forwards instead of one small forward per window.
2. :func:`run_layer` pushes the recorded hidden states of all batches through one layer.

With the layer's output as the next layer's input, only one decoder layer at a time needs to be
on the compute device in the compute dtype. The hidden states of all batches (the calibration
activations, ``windows x seq x hidden``) live in an :class:`Activations` store: on the compute device
by default, in host memory or in files on disk when they do not fit there.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vllm_smoothquant.format import ActivationScheme

from .write_errors import writing
from .quantization import fake_quant_activations


class Activations:
    """The hidden states of every calibration batch, kept on ``device`` (``offload=None``), in host memory
    (``"cpu"``) or as one file per batch in ``directory`` (``"disk"``); indexing returns them on ``device``."""

    def __init__(self, device: str | torch.device, offload: str | None = None, directory: Path | None = None):
        self.device, self.offload, self.directory = torch.device(device), offload, directory
        self._items: list[torch.Tensor | Path] = []
        self._writes = 0
        self.nbytes = 0
        self.description = ""  # for the summary: how much, and where

    def __len__(self) -> int:
        return len(self._items)

    def _store(self, t: torch.Tensor) -> torch.Tensor | Path:
        if self.offload == "disk":  # a new file per write: a batch being read may still map the old one
            self._writes += 1
            path = self.directory / f"batch-{self._writes}.safetensors"
            with writing(path):
                save_file({"h": t.detach().cpu().contiguous()}, path)
            return path
        return t.detach().cpu() if self.offload == "cpu" else t.detach()

    def append(self, t: torch.Tensor) -> None:
        self._items.append(self._store(t))
        self.nbytes += t.numel() * t.element_size()

    def __getitem__(self, j: int) -> torch.Tensor:
        item = self._items[j]
        if isinstance(item, Path):  # copied out of the file mapping: aligned memory, the same matmul results
            with safe_open(item, "pt") as f:
                return f.get_tensor("h").to(self.device, copy=True)
        return item.to(self.device)

    def __setitem__(self, j: int, t: torch.Tensor) -> None:
        old, self._items[j] = self._items[j], self._store(t)
        if isinstance(old, Path):
            old.unlink()

    def close(self) -> None:
        self._items.clear()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class LayerInputs:
    hidden: Activations | list[torch.Tensor]  # per batch: [windows in the batch, seq, hidden]
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


@contextmanager
def catchers(layers: nn.ModuleList, returns_tuple: bool):
    """While active, every decoder layer is a catcher; yields ``(calls, first)``: per layer the keyword arguments
    of its calls, and layer 0's catcher (hook it to see the hidden states)."""
    originals = list(layers)
    calls: list[list[dict]] = [[] for _ in originals]
    for i in range(len(originals)):
        layers[i] = _Catcher(calls[i], returns_tuple)
    try:
        yield calls, layers[0]
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, windows: list[list[int]],
                         device: str | torch.device, dtype: torch.dtype, returns_tuple: bool = False,
                         batch_size: int = 1, hidden: Activations | None = None) -> LayerInputs:
    """Layer 0's hidden states per batch of windows (see :func:`batches`) and every layer's keyword arguments.

    ``returns_tuple``: the model's layers return ``(hidden_states, ...)`` (BLOOM, Falcon), so the
    catchers do too. ``hidden``: where the hidden states go (default: a list on ``device``).

    The base model without its decoder layers (embeddings, rotary tables, final norm) is moved to
    ``device``/``dtype`` here; the layers and the LM head are left where they are.
    """
    hidden = [] if hidden is None else hidden
    with catchers(layers, returns_tuple) as (calls, first):
        first.register_forward_hook(lambda _m, args, kwargs, _out: hidden.append(
            (args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True)
        to_compute(model.base_model, device, dtype)  # the catchers hold no weights: only the non-layer modules move
        for batch in batches(windows, batch_size):
            model.base_model(torch.tensor(batch, device=device), use_cache=False)
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
def run_layer(layer: nn.Module, hidden: Activations | list[torch.Tensor], kwargs: list[dict],
              update: bool = False) -> list[torch.Tensor] | None:
    """The layer over every batch. ``update``: each batch's output replaces its input in ``hidden`` (the next
    layer's input; returns None); else the outputs are returned."""
    outs = []
    for j, kw in enumerate(kwargs):
        out = _as_hidden(layer(hidden[j], **kw))
        if update:
            hidden[j] = out
        else:
            outs.append(out)
    return None if update else outs


class InputAbsmax(dict):
    """``{linear name: max|X| per input channel}``, with ``rows``: ``{linear name: input rows seen}``."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, int] = {}


@contextmanager
def record_inputs(linears: dict[str, nn.Linear], sample_rows: int = 0, num_calls: int = 1):
    """Record ``{name: max|X| per input channel [in] float32}`` of each linear's input while active.

    With ``sample_rows > 0`` also ``{name: [<= sample_rows, in]}`` input rows, drawn evenly from
    each of the layer's ``num_calls`` calls (one per batch; for ``--alpha auto``). Yields
    ``(absmax, samples)``, filled as the layer runs; ``absmax.rows[name]`` counts the input rows (tokens) each
    linear saw: an MoE expert's linears see only the tokens routed to it.
    """
    absmax = InputAbsmax()
    samples: dict[str, list[torch.Tensor]] = {}
    per_call = -(-sample_rows // num_calls) if sample_rows else 0
    g = torch.Generator().manual_seed(0)

    def hook(name):
        def fn(_mod, inputs):
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1])
            m = x.abs().amax(dim=0).float()
            absmax[name] = torch.maximum(absmax[name], m) if name in absmax else m
            absmax.rows[name] = absmax.rows.get(name, 0) + x.shape[0]
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
def quantized_activations(linears: dict[str, nn.Linear], schemes: dict[str, ActivationScheme],
                          input_absmax: dict[str, torch.Tensor]):
    """While active, each linear's input is int8 quantize-dequantized as vLLM's kernel does it
    (``schemes[name]``: dynamic per token, or static with scale ``input_absmax[name].max() / 127``)."""

    def hook(name):
        scheme = schemes[name]
        absmax = None if scheme.dynamic else input_absmax[name].amax()

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
