"""What the online down_proj rotation costs on a GPU, kernel by kernel (issue 22: "the profile share of the
Hadamard kernel"), on the Llama-3-8B shape.

    python benchmarks/rotation_cost.py --out rotation-cost.json       # on the GPU
    python benchmarks/rotation_cost.py --plot rotation-cost.json      # anywhere: the PNG beside it

Per token count M, each piece runs inside a CUDA graph (as vLLM runs decode), timed with CUDA events over many
replays (`profile_layer.timed`), all through vLLM's own ops:

- the layer's int8 linears: `scaled_int8_quant` + `cutlass_scaled_mm` for qkv, o, gate_up and down;
- the rotation as the plugin runs it: eager (a copy, then `hadacore_transform` in place) and compiled
  (`torch.compile` of SiLU-and-mul -> rotation -> int8 quant, where the plugin skips the copy) against the same
  compiled function without the rotation.

It also checks that the compiled rotation + quant equals the eager one on the same input (int8 values and
scales) and that the eager call leaves its input untouched. Shares are of the layer's int8 linears (quant + GEMM), not of attention.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_layer import timed  # noqa: E402

H, FFN, BLOCK = 4096, 14336, 256  # Llama-3-8B; the plugin's default block
GEMMS = {"qkv": (6144, H), "o": (H, H), "gate_up": (2 * FFN, H), "down": (H, FFN)}  # (N, K)


def measure(tokens: int) -> dict:
    from vllm import _custom_ops as ops

    from vllm_smoothquant.rotation import InputRotation

    dev, dt = "cuda", torch.bfloat16
    r = {"tokens": tokens}
    linears = 0.0
    for name, (n, k) in GEMMS.items():
        a = torch.randn(tokens, k, device=dev, dtype=dt)
        wq = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8).t()
        ws = torch.rand(n, 1, device=dev, dtype=torch.float32) * 1e-3
        aq, as_, _ = ops.scaled_int8_quant(a)
        r[f"{name}_quant_us"] = timed(lambda: ops.scaled_int8_quant(a))
        r[f"{name}_gemm_us"] = timed(lambda: ops.cutlass_scaled_mm(aq, wq, as_, ws, dt))
        linears += r[f"{name}_quant_us"] + r[f"{name}_gemm_us"]
    r["int8_linears_us"] = linears

    rot = InputRotation(BLOCK).to(dev)
    x = torch.randn(tokens, FFN, device=dev, dtype=dt)
    x0 = x.clone()
    r["rotation_eager_us"] = timed(lambda: rot(x))
    r["eager_input_untouched"] = bool(torch.equal(x, x0))

    gu = torch.randn(tokens, 2 * FFN, device=dev, dtype=dt)

    def plain(t):
        return ops.scaled_int8_quant(F.silu(t[:, :FFN]) * t[:, FFN:])

    def rotated(t):
        return ops.scaled_int8_quant(rot(F.silu(t[:, :FFN]) * t[:, FFN:]))

    c_plain, c_rot = torch.compile(plain, fullgraph=True), torch.compile(rotated, fullgraph=True)

    def rotation_quant(t):
        return ops.scaled_int8_quant(rot(t))

    (q_eager, s_eager, _), (q_comp, s_comp, _) = rotation_quant(x.clone()), torch.compile(rotation_quant)(x.clone())
    r["compiled_equals_eager"] = bool(torch.equal(q_eager, q_comp) and torch.equal(s_eager, s_comp))
    r["act_quant_compiled_us"] = timed(lambda: c_plain(gu))
    r["act_rotation_quant_compiled_us"] = timed(lambda: c_rot(gu))
    r["rotation_compiled_us"] = r["act_rotation_quant_compiled_us"] - r["act_quant_compiled_us"]
    down = r["down_quant_us"] + r["down_gemm_us"]
    for mode in ("eager", "compiled"):
        r[f"rotation_{mode}_share_of_down_pct"] = 100 * r[f"rotation_{mode}_us"] / down
        r[f"rotation_{mode}_share_of_linears_pct"] = 100 * r[f"rotation_{mode}_us"] / linears
    return r


def plot(path: Path) -> Path:
    """The rotation's time as a share of the layer's int8 linears, eager and compiled, per token count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = json.loads(path.read_text())
    rows = d["rows"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for mode, style in (("eager", "o--"), ("compiled", "s-")):
        ax.plot([r["tokens"] for r in rows], [r[f"rotation_{mode}_share_of_linears_pct"] for r in rows], style,
                label=f"rotation, {mode}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens in the batch (M)")
    ax.set_ylabel("% of the layer's int8 linears' time")
    ax.set_title(f"down_proj input rotation (block {d['block']}), {d['shape']}, {d['device']}, vLLM {d['vllm']}, "
                 f"{d['date']}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    png = path.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    return png


def main() -> None:
    from vllm_smoothquant.offline.harness import provenance

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", type=Path)
    g.add_argument("--plot", type=Path, help="draw the PNG of a recorded --out file")
    p.add_argument("--tokens", default="1,64,512,2048,8192")
    a = p.parse_args()
    if a.plot:
        print(plot(a.plot))
        return
    rows = []
    keys = ["tokens", "int8_linears_us", "down_gemm_us", "rotation_eager_us", "rotation_compiled_us",
            "rotation_compiled_share_of_linears_pct", "compiled_equals_eager", "eager_input_untouched"]
    print(" ".join(f"{k:>22}" for k in keys), flush=True)
    for m in (int(t) for t in a.tokens.split(",")):
        rows.append(measure(m))
        print(" ".join(f"{rows[-1][k]:>22.2f}" if isinstance(rows[-1][k], float) else f"{rows[-1][k]!s:>22}"
                       for k in keys), flush=True)
    a.out.write_text(json.dumps({**provenance(), "command": " ".join(sys.argv), "shape": "llama-3-8b",
                                 "block": BLOCK, "rows": rows}, indent=2))
    plot(a.out)


if __name__ == "__main__":
    main()
