"""Is this CPU's vLLM int8 GEMM exact? Compares vLLM's oneDNN W8A8 kernel with exact int32 math.

    python benchmarks/cpu_int8_check.py

On x86 CPUs without VNNI (AVX2 only), oneDNN multiplies u8 x s8 pairs with ``vpmaddubsw``, whose
int16 pair sums saturate: the kernel then differs from exact int8 math by about as much as the
quantization error itself. The script prints the kernel's relative error against exact int32
accumulation and against a model of int16-saturating pair sums (activations shifted to u8 by +128),
after the CPU's model name, its int8-relevant flags (avx512_vnni / avx_vnni: exact) and the versions.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def main() -> None:
    from vllm import _custom_ops as ops

    from vllm_smoothquant.offline.harness import provenance
    from vllm_smoothquant.offline.quantization import quantize_weight

    print("; ".join(f"{k} {','.join(v) if isinstance(v, list) else v}" for k, v in provenance().items()))
    g = torch.Generator().manual_seed(0)
    m, k, n = 64, 576, 1536
    x = torch.randn(m, k, generator=g) * torch.rand(k, generator=g) * 3
    x[:, 5] *= 40  # an outlier channel
    q, s = quantize_weight(torch.randn(n, k, generator=g) * 0.05)
    xq, xs, xzp = ops.onednn_scaled_int8_quant(x, None, None, True)  # dynamic per-token, symmetric
    handle = ops.create_onednn_scaled_mm(q.t(), s, torch.float32, True, False, 32)
    out = torch.empty(m, n)
    ops.onednn_scaled_mm(handle, xq, out, xs, xzp, None, None)

    scale = xs.view(-1, 1) * s.view(1, -1)
    exact = (xq.double() @ q.double().T).float() * scale
    pairs = ((xq.float() + 128).view(m, 1, k // 2, 2) * q.float().view(1, n, k // 2, 2)).sum(-1)
    saturating = (pairs.clamp(-32768, 32767).sum(-1) - 128 * q.float().sum(1)) * scale
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    print(f"vLLM oneDNN int8 GEMM vs exact int32 math:          {rel(out, exact):.2e}")
    print(f"vLLM oneDNN int8 GEMM vs int16-saturating pair sums: {rel(out, saturating):.2e}")
    print(f"(for scale: per-token activation rounding error:     {rel(exact, x @ (q.float() * s).T):.2e})")


if __name__ == "__main__":
    main()
