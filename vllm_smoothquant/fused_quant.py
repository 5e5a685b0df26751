"""Activation quant that vLLM's compiler fuses into the op before it: norm -> int8, SiLU-and-mul -> int8.

vLLM's int8 linear kernel quantizes each linear's input in a CUDA kernel of its own
(``scaled_int8_quant``): the norm writes 16-bit activations, the quant kernel reads them back and
writes int8. Under vLLM's default compilation (Inductor, custom ops off) norms, the residual add and
activation functions (RMSNorm, LayerNorm with bias, SiLU-and-mul, GELU-and-mul, ReLU) are native torch,
and Inductor generates their Triton kernels. Written in native torch too, the quant joins that kernel:
one kernel reads the residual and writes the int8 row and its scale. The int8 GEMM stays vLLM's
``cutlass_scaled_mm``. Nothing is compiled at install time; eager mode and the CPU keep vLLM's kernel.

The values are vLLM's, bit for bit (``csrc/quantization/w8a8/int8/scaled_quant.cu``):
    dynamic per token:  scale = absmax / 127;  q = rni_sat(x * (127 / absmax))   (q = 0 where absmax = 0)
    static per tensor:  q = rni_sat(x / scale)
Two details keep Inductor's kernel on the same bits:
  * the input is rounded to its 16-bit dtype first, by integer arithmetic on its fp32 bits: fused into the
    producer, Inductor would otherwise quantize the producer's wider fp32 value, not the 16-bit activation;
  * the divisions run in fp64 and are rounded to fp32: Triton's fp32 ``/`` is approximate, and an fp64
    quotient of fp32 operands rounded to fp32 is the correctly rounded fp32 quotient (53 >= 2 * 24 + 2).

Which linears take the fused path is the engine's choice, by the op that produces their input
(``ROLES``): ``--additional-config '{"smoothquant": {"fused_quant": ["norm", "act"]}}'``, ``true`` for
every role, ``false`` for none (the default: see ``ALL_ROLES``), parsed with the plugin's other options in
``engine_options.py``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# vLLM's layer name (last part of the prefix) -> the op that produces its input, across the supported families.
ROLES: Mapping[str, str] = {
    # after a norm (RMSNorm / LayerNorm, with the residual add before it)
    "qkv_proj": "norm", "gate_up_proj": "norm", "fc1": "norm", "query_key_value": "norm",
    "dense_h_to_4h": "norm",
    # after the MLP's activation function (SiLU/GELU-and-mul, ReLU, GELU)
    "down_proj": "act", "fc2": "act", "dense_4h_to_h": "act",
    # after attention (an opaque op: nothing to fuse with; the quant runs as a Triton kernel of its own)
    "o_proj": "attn_out", "out_proj": "attn_out", "dense": "attn_out",
}
ALL_ROLES = ("norm", "act", "attn_out")
# Off by default (engine_options.py): on an H100 (Llama-3-8B shape, benchmarks/RESULTS.md) Inductor's fused kernels
# were not faster than its norm / activation kernel + vLLM's quant kernel (act + quant: 6.4 vs 3.4 us per call at
# batch 1, a looped reduction over one row in one thread block; norm + quant: even at batch 1, -10 % at batch 64),
# decode latency 0.97x stock at batch 1, 1.00x at 8 and 64; and a fused LayerNorm (OPT) reduces in another order
# than the unfused one.


def role_of(prefix: str) -> str | None:
    """The producer role of the linear layer named ``prefix`` in vLLM (None: not a known layer)."""
    return ROLES.get(prefix.rpartition(".")[2])


def engine_fuses() -> frozenset[str]:
    """The roles to fuse in the engine being built: none unless CUDA with vLLM's Inductor compilation."""
    from vllm.config import CompilationMode, get_current_vllm_config_or_none
    from vllm.platforms import current_platform

    from .engine_options import EngineOptions

    cfg = get_current_vllm_config_or_none()
    roles = EngineOptions.parse(getattr(cfg, "additional_config", None)).fused_quant  # validated on every platform
    if cfg is None or not current_platform.is_cuda():
        return frozenset()
    cc = cfg.compilation_config
    if cc.mode != CompilationMode.VLLM_COMPILE or cc.backend != "inductor":
        return frozenset()  # eager (or another backend): vLLM's CUDA quant kernel is the fast path there
    return roles


# fp32 -> 16-bit round-to-nearest-even on the fp32 bits: (mantissa bits dropped, float16's smallest normal)
_DROPPED = {torch.bfloat16: 16, torch.float16: 13}
_F16_MIN_NORMAL = 2.0**-14


def _as_stored(x: torch.Tensor) -> torch.Tensor:
    """``x`` as fp32 holding exactly its 16-bit value. In one kernel with ``x``'s producer, Inductor keeps the
    producer's fp32 result and elides the 16-bit cast (it even folds a bit-cast round trip away); rounding
    the fp32 bits by integer arithmetic gives the stored value whether or not the cast was elided.
    (float16: values beyond its range, which the model would have turned into inf, are not reproduced.)"""
    xf = x.float()
    dropped = _DROPPED.get(x.dtype)
    if dropped is None:
        return xf
    bits = xf.view(torch.int32)
    half_ulp = (1 << (dropped - 1)) - 1 + ((bits >> dropped) & 1)  # ties to even
    rounded = ((bits + half_ulp) & -(1 << dropped)).view(torch.float32)
    if x.dtype == torch.float16:  # float16 subnormals: a fixed step of 2^-24
        rounded = torch.where(xf.abs() < _F16_MIN_NORMAL, (xf * 2.0**24).round() * 2.0**-24, rounded)
    return rounded


def quant_dynamic(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: ``(q [M, K] int8, scale [M, 1] fp32)``, as vLLM's ``dynamic_scaled_int8_quant``."""
    xf = _as_stored(x)
    absmax = xf.abs().amax(dim=-1, keepdim=True)
    a64 = absmax.double()
    scale = (a64 / 127.0).float()
    inv = torch.where(absmax == 0, 0.0, (torch.full_like(a64, 127.0) / a64).float())  # not 127 * (1 / a)
    q = (xf * inv).round().clamp(-128, 127).to(torch.int8)
    return q, scale


def quant_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-tensor symmetric int8 with a calibrated scale, as vLLM's ``static_scaled_int8_quant``."""
    xf = _as_stored(x)
    q = (xf.double() / scale.double()).float()
    return q.round().clamp(-128, 127).to(torch.int8)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                input_scale: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """The linear on vLLM's CUTLASS int8 GEMM with the input quantized in native torch (weights as vLLM's
    CUTLASS kernel keeps them after loading: transposed int8, fp32 scales)."""
    from vllm import _custom_ops as ops

    x2 = x.reshape(-1, x.shape[-1])
    if input_scale is None:
        q, scale = quant_dynamic(x2)
    else:
        q, scale = quant_static(x2, input_scale), input_scale
    out = ops.cutlass_scaled_mm(q, weight, scale_a=scale, scale_b=weight_scale, out_dtype=x.dtype, bias=bias)
    return out.view(*x.shape[:-1], out.shape[-1])
