"""int8 symmetric quantization of weights and calibrated activation scales (q_max = 127).

    scale = max|W| / 127        per output row ("channel", ``[out, 1]``) or whole tensor ("tensor", ``[1]``)
    W_q   = clamp(round(W / scale), -127, 127)   int8 ``[out, in]``;   W ~= W_q * scale
"""

from __future__ import annotations

import torch

from vllm_smoothquant.format import Q_MAX, ActivationScheme

_TINY = 1e-12  # an all-zero row gets this scale instead of 0


@torch.no_grad()
def weight_scale(w: torch.Tensor, strategy: str) -> torch.Tensor:
    """float32 scale: ``[out, 1]`` for "channel", ``[1]`` for "tensor"."""
    a = w.detach().abs().float()
    m = a.amax(dim=1, keepdim=True) if strategy == "channel" else a.amax().reshape(1)
    return (m / Q_MAX).clamp(min=_TINY)


@torch.no_grad()
def quantize_weight(w: torch.Tensor, strategy: str = "channel") -> tuple[torch.Tensor, torch.Tensor]:
    """``w [out, in]`` -> (int8 ``[out, in]``, float32 scale); see module docstring."""
    scale = weight_scale(w, strategy)
    q = torch.round(w.float() / scale).clamp(-Q_MAX, Q_MAX).to(torch.int8)
    return q, scale


@torch.no_grad()
def static_input_scale(act_absmax: torch.Tensor) -> torch.Tensor:
    """Static per-tensor activation scale ``[1]`` float32 from ``act_absmax: [in]``: max / 127."""
    return (act_absmax.float().amax() / Q_MAX).clamp(min=_TINY).reshape(1)


@torch.no_grad()
def fake_quant_activations(x: torch.Tensor, scheme: ActivationScheme,
                           absmax: torch.Tensor | None = None) -> torch.Tensor:
    """int8 quantize-dequantize of ``x: [tokens, in]`` as vLLM's kernel does: dynamic (one scale per row, the
    only dynamic granularity vLLM's int8 kernels have) or static (one scale = ``absmax`` / 127 from calibration)."""
    if scheme.dynamic:
        scale = (x.abs().amax(dim=-1, keepdim=True) / Q_MAX).clamp(min=_TINY)
    else:
        scale = (absmax.float() / Q_MAX).clamp(min=_TINY)
    return torch.round(x / scale).clamp(-Q_MAX - 1, Q_MAX) * scale
