"""SmoothQuant's migration of activation outliers into weights (arXiv 2211.10438, eq. 4).

For a group of linears that share one input X (``[tokens, in]``) produced by ``prev``::

    s_j  = max|X_j|^alpha / max|W_j|^(1 - alpha)        (j over input channels, W over all linears)
    X' = X / s      -> fold into prev: norm weight and bias / s, or linear output rows / s
    W' = W * s      -> each linear's input columns * s
    X' W'^T == X W^T exactly (up to float rounding), so smoothing costs nothing at run time.

Conventions: ``act_absmax: [in]`` is the per-channel max of |X| over the calibration set;
a channel whose activation or weight max is 0 gets s = 1 (nothing to migrate); s is clamped
to [1e-5, 1e5] so folding never overflows a 16-bit norm weight. A norm computes
``x_hat * (offset + weight)`` (offset 0, or 1 for Gemma); its folded weight is ``(offset + w) / s - offset``.
"""

from __future__ import annotations

import torch
from torch import nn

S_MIN, S_MAX = 1e-5, 1e5


@torch.no_grad()
def weight_absmax(linears: list[nn.Linear]) -> torch.Tensor:
    """Per-input-channel max|W| over all linears of a group: ``[in]`` float32."""
    return torch.stack([lin.weight.detach().abs().float().amax(dim=0) for lin in linears]).amax(dim=0)


@torch.no_grad()
def smoothing_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = act_absmax^alpha / w_absmax^(1-alpha), ``[in]`` float32; s = 1 where either max is 0."""
    a, w = act_absmax.float(), w_absmax.float()
    live = (a > 0) & (w > 0)
    s = a.clamp(min=S_MIN).pow(alpha) / w.clamp(min=S_MIN).pow(1.0 - alpha)
    return torch.where(live, s, torch.ones_like(s)).clamp(S_MIN, S_MAX)


@torch.no_grad()
def share_across_query_heads(x: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Max over the query heads that share one kv head: ``[num_heads*d] -> [num_kv_heads*d]``.

    o_proj's input channel ``h*d + i`` is attention head h's value channel i, which is v_proj
    output row ``(h // (num_heads // num_kv_heads))*d + i``.
    """
    d = x.numel() // num_heads
    return x.view(num_kv_heads, num_heads // num_kv_heads, d).amax(dim=1).reshape(-1)


def repeat_for_query_heads(s_kv: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Inverse layout of :func:`share_across_query_heads`: ``[num_kv_heads*d] -> [num_heads*d]``."""
    d = s_kv.numel() // num_kv_heads
    return s_kv.view(num_kv_heads, 1, d).expand(num_kv_heads, num_heads // num_kv_heads, d).reshape(-1)


@torch.no_grad()
def storable_norm_scales(weight: torch.Tensor, s: torch.Tensor, offset: float, storage: torch.dtype) -> torch.Tensor:
    """s' close to ``s`` (``[C]``) whose folded norm weight is exactly representable in ``storage``.

    The norm's gain g = offset + w becomes g / s, stored as w' = round_storage(g / s - offset); the
    fold is exact only if the linears get s' = g / (offset + w') instead of s. With offset 1 (Gemma)
    this matters: g / s - 1 lies near -1 for large s, where bf16's absolute spacing is a large share of
    g / s. A channel whose rounded gain would flip sign or vanish is left unsmoothed (s' = 1); a
    channel with g = 0 is dead (its output is 0) and keeps s.
    """
    g = weight.float() + offset
    stored = (g / s - offset).to(storage).to(weight.dtype).float()
    g_new = stored + offset
    ok = (g_new != 0) & (torch.sign(g_new) == torch.sign(g))
    return torch.where(g == 0, s, torch.where(ok, g / torch.where(ok, g_new, 1.0), torch.ones_like(s)))


@torch.no_grad()
def apply_smoothing(prev: nn.Module, linears: list[nn.Linear], s_prev: torch.Tensor, s_in: torch.Tensor,
                    norm_offset: float = 0.0, rows: slice | torch.Tensor | None = None) -> None:
    """Fold s into the model in place: prev's output channels / s_prev, linears' input columns * s_in.

    ``prev`` is a LayerNorm/RMSNorm (``weight [C]``, optional ``bias [C]``; gain ``norm_offset + weight``)
    or a Linear (``weight [C, in_prev]``, optional ``bias [C]``): both divide along dim 0. ``s_in`` is
    ``s_prev`` itself, or its repetition over query heads when prev is v_proj under GQA. ``rows`` (slice
    or index ``[C]``): only these output rows of prev feed the linears, in their input-channel order (the
    v rows of a fused qkv linear); the other rows are untouched.
    """
    rows = slice(None) if rows is None else rows
    shape = (-1,) + (1,) * (prev.weight.dim() - 1)
    offset = 0.0 if isinstance(prev, nn.Linear) else norm_offset
    folded = (prev.weight[rows].float() + offset) / s_prev.view(shape) - offset
    prev.weight[rows] = folded.to(prev.weight.dtype)
    if getattr(prev, "bias", None) is not None:
        prev.bias[rows] = (prev.bias[rows].float() / s_prev).to(prev.bias.dtype)
    for lin in linears:
        lin.weight.copy_((lin.weight.float() * s_in.view(1, -1)).to(lin.weight.dtype))
