"""``--alpha auto``: per smoothing group, the alpha on a grid that minimizes the W8A8 output error.

For a group with input samples ``x: [tokens, in]`` (recorded during calibration) and linears W_k::

    err(alpha) = sum_k || Q_act(x / s) @ Q_w(W_k * s)^T  -  x @ W_k^T ||^2  /  sum_k || x @ W_k^T ||^2

with s = s(alpha) from :func:`smoothing.smoothing_scales`, Q_w the checkpoint's weight scheme and
Q_act the activation scheme (per token, or static per tensor from the calibrated absmax).
Cost: one small matmul per linear and grid point, seconds for a 135M model.
"""

from __future__ import annotations

import torch

from vllm_smoothquant.format import ActivationScheme

from .quantization import fake_quant_activations, quantize_weight

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
