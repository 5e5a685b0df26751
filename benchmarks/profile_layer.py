"""Where one OPT-13B decoder layer spends its time on a GPU: FP16 GEMMs vs int8 (per-token quant +
CUTLASS GEMM, vLLM's own ops), LayerNorm and attention, at decode and prefill token counts.

    python benchmarks/profile_layer.py --out profile.json

Each op runs inside a CUDA graph (as vLLM runs decode), timed with CUDA events over many replays.
The per-layer sum x 40 layers is a model of one forward step; compare it with `vllm bench latency`.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

H, FFN, HEADS, LAYERS = 5120, 20480, 40, 40  # OPT-13B
GEMMS = {"qkv": (3 * H, H), "out_proj": (H, H), "fc1": (FFN, H), "fc2": (H, FFN)}  # (N, K)


def timed(fn, iters: int = 50) -> float:
    """Microseconds per call of ``fn`` replayed from a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (5 * iters)


def profile(tokens: int, context: int, decode: bool) -> dict:
    from vllm import _custom_ops as ops

    dev = "cuda"
    x = torch.randn(tokens, H, device=dev, dtype=torch.float16)
    r = {"tokens": tokens, "context": context, "phase": "decode" if decode else "prefill"}
    fp16_total = int8_gemm_total = quant_total = 0.0
    for name, (n, k) in GEMMS.items():
        a = torch.randn(tokens, k, device=dev, dtype=torch.float16)
        w = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
        wq = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8).t()  # column-major [K, N]
        ws = torch.rand(n, 1, device=dev, dtype=torch.float32) * 1e-3
        aq, as_, _ = ops.scaled_int8_quant(a)
        t_fp16 = timed(lambda: F.linear(a, w))
        t_quant = timed(lambda: ops.scaled_int8_quant(a))
        t_gemm = timed(lambda: ops.cutlass_scaled_mm(aq, wq, as_, ws, torch.float16))
        r[f"{name}_fp16_us"], r[f"{name}_int8_gemm_us"], r[f"{name}_quant_us"] = t_fp16, t_gemm, t_quant
        fp16_total, int8_gemm_total, quant_total = fp16_total + t_fp16, int8_gemm_total + t_gemm, quant_total + t_quant
    ln = torch.nn.LayerNorm(H, device=dev, dtype=torch.float16)
    r["layernorm_x2_us"] = 2 * timed(lambda: ln(x))
    if decode:  # one query token per sequence against `context` cached tokens
        q = torch.randn(tokens, HEADS, 1, 128, device=dev, dtype=torch.float16)
        kv = torch.randn(tokens, HEADS, context, 128, device=dev, dtype=torch.float16)
        r["attention_us"] = timed(lambda: F.scaled_dot_product_attention(q, kv, kv))
    else:  # one causal sequence of `tokens`
        q = torch.randn(1, HEADS, tokens, 128, device=dev, dtype=torch.float16)
        r["attention_us"] = timed(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True), iters=10)
    r["fp16_gemms_us"], r["int8_gemms_us"], r["int8_quant_us"] = fp16_total, int8_gemm_total, quant_total
    rest = r["layernorm_x2_us"] + r["attention_us"]
    r["layer_fp16_us"] = fp16_total + rest
    r["layer_int8_us"] = int8_gemm_total + quant_total + rest
    r["step_model_fp16_ms"] = r["layer_fp16_us"] * LAYERS / 1000
    r["step_model_int8_ms"] = r["layer_int8_us"] * LAYERS / 1000
    return r


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args()
    rows = [profile(b, 256, True) for b in (1, 8, 64, 256)] + [profile(t, t, False) for t in (1024, 4096)]
    meta = __import__("vllm_smoothquant.offline.harness", fromlist=["provenance"]).provenance()
    keys = ["phase", "tokens", "fp16_gemms_us", "int8_gemms_us", "int8_quant_us", "layernorm_x2_us", "attention_us",
            "layer_fp16_us", "layer_int8_us"]
    print(" ".join(f"{k:>16}" for k in keys))
    for r in rows:
        print(" ".join(f"{r[k]:>16.1f}" if isinstance(r[k], float) else f"{r[k]:>16}" for k in keys))
    with open(a.out, "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
