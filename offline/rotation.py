"""``--rotate down_proj``: the MLP output projection's input rotated by a block-diagonal Hadamard matrix.

The step runs after smoothing, before the weights are rounded (and before GPTQ's Hessians): each rotated
linear's weight becomes ``W R`` (``vllm_smoothquant.rotation``) and a forward pre-hook, registered first, rotates
its input, so everything downstream in the recipe (GPTQ's Hessians, static scales, the int8-simulated run that
feeds the next layer, the KV-cache statistics) sees the linear as vLLM will run it. The layer's output is unchanged
in exact arithmetic (``R`` is orthonormal); what changes is the int8 rounding: per token, the activation function's
few outlier channels no longer set the scale for all the others.

Static activations need the rotated input's absmax, which the per-channel statistics recorded before smoothing
cannot give: :func:`rotated_absmax` runs the layer once more on the calibration batches to record it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from vllm_smoothquant.format import RotationScheme
from vllm_smoothquant.rotation import hadamard, rotate

from .mappings import ArchMapping
from .options import DEFAULT_ROTATE_BLOCK as DEFAULT_BLOCK
from .options import OptionsError
from .streaming import LayerInputs, record_inputs, run_layer



def largest_block(size: int, cap: int = DEFAULT_BLOCK) -> int:
    """The largest power of two <= ``cap`` that divides ``size``."""
    return max(b for b in (1 << k for k in range(cap.bit_length())) if b <= cap and size % b == 0)


def rotation_scheme(rotate: str | None, block: int | None, smooth: bool, mapping: ArchMapping, arch: str,
                    in_features: int | None) -> tuple[RotationScheme | None, str]:
    """The checkpoint's rotation for ``--rotate`` / ``--rotate-block`` on this architecture, and a line for the
    report. ``rotate`` None is the default: down_proj where the family has one rotatable MLP output projection
    and smoothing is on (the naive ``--no-smooth`` baseline stays unrotated); ``in_features``: that linear's input
    size (the MLP's intermediate size)."""
    if rotate == "none" or (rotate is None and (not smooth or mapping.mlp_out is None)):
        why = ("--rotate none" if rotate == "none" else "--no-smooth (naive baseline)" if not smooth else
               f"{arch}'s expert down projections run inside vLLM's fused-MoE kernel")
        return None, f"rotation: none ({why})"
    if mapping.mlp_out is None:
        raise OptionsError(f"--rotate down_proj: {arch}'s MLP output projections are its experts' down "
                            "projections, which vLLM's fused-MoE kernel runs (and quantizes the input of) in one "
                            "kernel, with no place to rotate their input; pass --rotate none.")
    if block is not None and in_features % block:
        raise OptionsError(f"--rotate-block {block}: {mapping.mlp_out}'s input size {in_features} is not a multiple "
                            f"of it; pass a power of two that divides {in_features} (e.g. "
                            f"{largest_block(in_features)}), or --rotate none.")
    chosen = largest_block(in_features) if block is None else block
    if chosen < 2:
        raise OptionsError(f"--rotate down_proj: {mapping.mlp_out}'s input size {in_features} is odd, so no "
                            "Hadamard block (a power of two) divides it; pass --rotate none.")
    note = "" if block is not None or chosen == DEFAULT_BLOCK else f" (the largest power of two <= {DEFAULT_BLOCK} " \
                                                                    f"dividing {in_features})"
    scheme = RotationScheme(targets=(mapping.mlp_out,), block_size=chosen)
    return scheme, f"rotation: {mapping.mlp_out} input, Hadamard blocks of {chosen}{note}"


def rotated_linears(linears: dict[str, nn.Linear], scheme: RotationScheme | None) -> dict[str, int]:
    """``{name: block size}`` of a decoder layer's linears (names inside the layer) that the scheme rotates."""
    if scheme is None:
        return {}
    return {n: b for n in linears if (b := scheme.block_for(n)) is not None}


@torch.no_grad()
def rotate_weight(w: torch.Tensor, block: int) -> torch.Tensor:
    """``W R`` in ``w``'s dtype, computed in float32 (relative error ~1e-7, far below the int8 step; float64's
    batched matmul is ~80x slower on the CPU)."""
    return rotate(w.float(), block, hadamard(block, torch.float32, w.device)).to(w.dtype)


def fold_rotation(lin: nn.Linear, block: int) -> None:
    """``W <- W R``."""
    lin.weight.data = rotate_weight(lin.weight.data, block)


@contextmanager
def rotated(linears: dict[str, nn.Linear], blocks: dict[str, int]):
    """While active, the linears named in ``blocks`` rotate their input first (before any other pre-hook).
    Their weights must hold ``W R`` (:func:`fold_rotation`)."""

    def hook(block: int):
        h = {}

        def fn(_mod, inputs):
            x = inputs[0]
            key = (x.dtype, x.device)
            if key not in h:
                h[key] = hadamard(block, x.dtype, x.device)
            return (rotate(x, block, h[key]), *inputs[1:])

        return fn

    handles = [linears[n].register_forward_pre_hook(hook(b), prepend=True) for n, b in blocks.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def rotated_absmax(layer: nn.Module, linears: dict[str, nn.Linear], inputs: LayerInputs, i: int) -> dict:
    """Per input channel max |x R| of each rotated linear over every calibration batch (the layer run as it is
    now: smoothed, full precision, inside :func:`rotated`): what a static ``input_scale`` must cover."""
    with record_inputs(linears) as (absmax, _):
        run_layer(layer, inputs.hidden, inputs.kwargs[i])
    return dict(absmax)
