"""``--alpha auto``: per smoothing group, the alpha on a grid that minimizes a W8A8 error.

Dense groups (:func:`search_alpha_block`): the error of the quantized decoder layer's *output*. Per layer, the
groups are taken in order; for each candidate alpha the group is smoothed (earlier groups keep their chosen
alpha, later ones are still unsmoothed), every linear of the layer is simulated in W8A8 (weights int8 round to
nearest in the checkpoint's weight scheme, activations in each linear's scheme, static scales from the smoothed
absmax), the layer runs on a few calibration batches (:class:`BlockProbe`: the quantized model's inputs to this
layer), and::

    err(alpha) = sum || layer_W8A8(x) - layer_fp(x) ||^2 / sum || layer_fp(x) ||^2

With ``--rotate`` the rotated linears are simulated rotated (weights ``W R`` rounded, inputs ``x R`` quantized), so
the α of the group feeding one (up -> down) is chosen with the rotation in place; a static rotated input takes
its unrotated absmax as the scale's stand-in during the search (its real scale is calibrated after rotation).
The candidate is then undone exactly. Cost: len(GRID) layer forwards on the probe per group. With
``--weight-rounding gptq`` the search still simulates round-to-nearest weights (GPTQ per candidate is too slow).

Mixture-of-experts groups (the router's group over every expert, per-expert up -> down) keep the group-local
objective (:func:`search_alpha`): one layer forward per candidate and per expert would cost hundreds of forwards.
For a group with input samples ``x: [tokens, in]`` (recorded during calibration) and linears W_k::

    err(alpha) = sum_k || Q_act(x / s) @ Q_w(W_k * s)^T  -  x @ W_k^T ||^2  /  sum_k || x @ W_k^T ||^2

with s = s(alpha) from :func:`smoothing.smoothing_scales`, Q_w the checkpoint's weight scheme and
Q_act the activation scheme (per token, or static per tensor from the calibrated absmax).
Cost: one small matmul per linear and grid point, seconds for a 135M model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from vllm_smoothquant.format import ActivationScheme

from .quantization import fake_quant_activations, quantize_weight
from .rotation import rotate_weight, rotated
from .streaming import quantized_activations, run_layer

GRID = tuple(round(0.05 * i, 2) for i in range(21))  # 0.0, 0.05, ..., 1.0


@torch.no_grad()
def group_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor, act_absmax: torch.Tensor,
                activations: ActivationScheme, weight_strategy: str) -> float:
    """Relative squared error of the quantized group output; ``s: [in]`` already repeated per head."""
    x = x.float()
    xs = x / s
    xq = fake_quant_activations(xs, activations, (act_absmax / s).amax())
    num = den = 0.0
    for w in weights:
        w = w.float()
        q, scale = quantize_weight(w * s, weight_strategy)
        ref = x @ w.T
        num += ((xq @ (q.float() * scale).T - ref) ** 2).sum().item()
        den += (ref**2).sum().item()
    return num / max(den, 1e-30)


@torch.no_grad()
def search_alpha(scales_for, x, weights, act_absmax, activations: ActivationScheme, weight_strategy: str,
                 grid=GRID) -> tuple[float, dict[float, float]]:
    """``scales_for(alpha) -> s_in [in]``. Returns (best alpha, {alpha: error})."""
    errors = {a: group_error(x, weights, scales_for(a), act_absmax, activations, weight_strategy) for a in grid}
    return min(errors, key=errors.get), errors


# ------------------------------------------------------------------ the block objective (dense groups)
@dataclass
class BlockProbe:
    """The calibration batches ``--alpha auto`` compares a decoder layer's outputs on: the layer's inputs (the
    outputs of the already quantized layers before it), its call arguments, and ``reference``: the layer's
    outputs unsmoothed and in full precision, computed once per layer."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]
    reference: list[torch.Tensor]

    @classmethod
    def first_batches(cls, hidden, kwargs: list[dict], outputs: list[torch.Tensor], max_tokens: int) -> BlockProbe:
        """The first batches holding up to ``max_tokens`` tokens (at least one batch): their inputs ``hidden[j]``,
        call arguments and full-precision ``outputs``."""
        n, tokens = 0, 0
        while n < len(outputs) and (n == 0 or tokens + outputs[n].shape[:-1].numel() <= max_tokens):
            tokens += outputs[n].shape[:-1].numel()
            n += 1
        return cls([hidden[j] for j in range(n)], kwargs[:n], outputs[:n])


@contextmanager
def simulated_w8a8(linears: dict[str, nn.Linear], schemes: dict[str, ActivationScheme],
                   input_absmax: dict[str, torch.Tensor], weight_strategy: str, rotations: dict[str, int] | None = None):
    """While active, every linear computes as the int8 checkpoint will: its weight int8 round-to-nearest
    quantize-dequantized as ``pipeline.quantize_layer`` stores it, its input through ``quantized_activations``
    (static scales from ``input_absmax``); a linear in ``rotations`` (name -> Hadamard block) rotated first.
    The original weight tensors come back on exit, untouched."""
    rotations = rotations or {}
    originals = {n: lin.weight.data for n, lin in linears.items()}
    try:
        for n, lin in linears.items():
            w = rotate_weight(lin.weight.data, rotations[n]) if n in rotations else lin.weight
            q, scale = quantize_weight(w, weight_strategy)
            lin.weight.data = q.to(lin.weight.dtype) * scale.to(lin.weight.dtype)
        with rotated(linears, rotations), quantized_activations(linears, schemes, input_absmax):
            yield
    finally:
        for n, lin in linears.items():
            lin.weight.data = originals[n]


@torch.no_grad()
def block_error(layer: nn.Module, probe: BlockProbe) -> float:
    """sum ||layer(x) - reference||^2 / sum ||reference||^2 over the probe's batches, as the layer is now."""
    num = den = 0.0
    for out, ref in zip(run_layer(layer, probe.hidden, probe.kwargs), probe.reference, strict=True):
        num += ((out.float() - ref.float()) ** 2).sum().item()
        den += (ref.float() ** 2).sum().item()
    return num / max(den, 1e-30)


@contextmanager
def restored(tensors: list[torch.Tensor]):
    """On exit, every tensor holds again exactly the values it held on entry (in-place edits undone)."""
    saved = [t.detach().clone() for t in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved, strict=True):
                t.copy_(s)


@torch.no_grad()
def search_alpha_block(layer: nn.Module, smooth, touched: list[torch.Tensor], probe: BlockProbe,
                       linears: dict[str, nn.Linear], schemes: dict[str, ActivationScheme],
                       absmax_after, weight_strategy: str, grid=GRID,
                       rotations: dict[str, int] | None = None) -> tuple[float, dict[float, float]]:
    """α of one group by the W8A8 error of the whole decoder layer's output.

    ``smooth(alpha) -> s_in`` applies the group's smoothing to ``layer`` in place (editing only ``touched``);
    ``absmax_after(s_in)``: every linear's input absmax with this group smoothed by ``s_in`` (the static
    scales). Each candidate is applied, measured under :func:`simulated_w8a8` (``rotations``: the linears
    ``--rotate`` rotates) and undone exactly. Returns
    (best alpha, {alpha: error}); a tie goes to the smaller alpha (the first on the grid).
    """
    errors = {}
    for a in grid:
        with restored(touched):
            after = absmax_after(smooth(a))
            with simulated_w8a8(linears, schemes, after, weight_strategy, rotations):
                errors[a] = block_error(layer, probe)
    return min(errors, key=errors.get), errors
