"""Block-diagonal Hadamard rotation of a linear's input: the math, shared by the quantizer and the plugin.

A rotated linear ``y = x W^T`` is stored as ``W_rot = W R`` and run as ``y = (x R) W_rot^T``, with
``R = blockdiag(H_b, ..., H_b)`` and ``H_b = S_b / sqrt(b)``: ``S_b`` the Sylvester Hadamard matrix of size ``b``
(compressed-tensors' ``deterministic_hadamard_matrix``, which vLLM's ``hadacore_transform`` kernel computes).
``H_b`` is symmetric and orthonormal, so ``R R^T = I`` and the product is unchanged in exact arithmetic; the
rotation spreads a token's outlier channels over the ``b`` channels of their block, which is what lets the int8
per-token quantization of ``x R`` keep more of the ordinary channels (SpinQuant's "R4", QuaRot's online Hadamard).

Both sides apply :func:`rotate` to the last dimension, block by block: ``t.unflatten(-1, (-1, b)) @ H_b``. The
quantizer applies it to the weight's rows (its input columns) before int8 rounding; vLLM applies it to the
activations before the int8 quant: ``hadacore_transform`` on CUDA (16-bit activations), a matmul elsewhere.
Blocks are contiguous, so a tensor-parallel shard of the input (a row-parallel layer's slice of ``in``) holds
whole blocks when its size is a multiple of ``b``: each rank rotates its own slice.
"""

from __future__ import annotations

import functools
import math

import torch

HADAMARD = "hadamard"
MATRIX = "sylvester"  # H_b = deterministic_hadamard_matrix(b) / sqrt(b): symmetric, so x @ H_b == x @ H_b^T


def is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0 and n & (n - 1) == 0


@functools.lru_cache(maxsize=16)
def _sylvester(block: int) -> torch.Tensor:
    from compressed_tensors.transform import deterministic_hadamard_matrix

    return deterministic_hadamard_matrix(block, dtype=torch.float64) / math.sqrt(block)  # ~0.5 s for 256: cached


def hadamard(block: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``H_b``: the orthonormal Sylvester Hadamard matrix of size ``block`` (a power of two)."""
    if not is_power_of_two(block):
        raise ValueError(f"Hadamard block size {block!r} is not a power of two")
    return _sylvester(block).to(dtype=dtype, device=device, copy=True)


def rotate(t: torch.Tensor, block: int, h: torch.Tensor | None = None) -> torch.Tensor:
    """``t R`` over the last dimension (a multiple of ``block``), as a matmul with ``h`` (default: ``H_b`` in
    ``t``'s dtype)."""
    if t.shape[-1] % block:
        raise ValueError(f"last dimension {t.shape[-1]} is not a multiple of the Hadamard block {block}")
    h = hadamard(block, t.dtype, t.device) if h is None else h
    return (t.unflatten(-1, (-1, block)) @ h).flatten(-2)


def _hadacore():
    try:
        from vllm import _custom_ops as ops
    except ImportError:
        return None
    return ops.hadacore_transform if hasattr(torch.ops._C, "hadacore_transform") else None


class InputRotation(torch.nn.Module):
    """The run-time rotation of one vLLM linear's input (its slice on this tensor-parallel rank).

    CUDA with 16-bit activations: vLLM's ``hadacore_transform`` (a registered custom op: traced by torch.compile,
    captured in CUDA graphs); otherwise a matmul with ``H_b`` kept in the activations' dtype.
    """

    def __init__(self, block: int):
        super().__init__()
        self.block = block
        self.kernel = _hadacore()
        self.register_buffer("h", hadamard(block), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            # vLLM's schema is `hadacore_transform(Tensor! x, bool inplace)`: it writes into `x`. Always called with
            # inplace=True (seen on an H200 with vLLM 0.26: inplace=False returned a tensor that did not hold the
            # transform; perplexity 1e9 through the engine). Eager: on a copy, so the caller's tensor is untouched.
            # Under torch.compile (vLLM's default) no copy: functionalization sees the declared mutation and
            # Inductor writes in place only where the input is dead afterwards (an MLP output projection's input
            # is), so the copy -- a full read and write of the activations -- is not paid.
            x2 = x.reshape(-1, self.block)
            if not torch.compiler.is_compiling():
                x2 = x2.clone()
            return self.kernel(x2, inplace=True).view(x.shape)
        return rotate(x, self.block, self.h.to(x.dtype))
