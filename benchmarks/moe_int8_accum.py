"""A/B of the int8 expert GEMM's accumulation on a GPU, with torch + Triton only (no vLLM needed): the plugin's kernel
(``vllm_smoothquant/moe_int8.py``, int32 accumulator in the MMA) against the same kernel accumulating as vLLM's int8
path does (each K step's int32 dot converted and added to fp32: ``fp32_steps=True``). Same inputs, tiles, routing.

    python benchmarks/moe_int8_accum.py --out FILE.json     # Mixtral-8x7B's gate/up GEMM: E=8, 2N=28672, K=4096, top-2
    python benchmarks/moe_int8_accum.py --report FILE.json  # markdown table + FILE.png

Random int8 weights and activations, uniform routing; each (M, tile config, kernel) timed with CUDA events over 20
calls after 3; both kernels' outputs compared (equal where the fp32 running sum is exact).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from moe_tune import time_us  # noqa: E402  (this folder: CUDA-event timing, 20 calls after 3)
from reference import moe_align_block_size  # noqa: E402

from vllm_smoothquant import moe_int8  # noqa: E402  (imports no vLLM)

TILES = [dict(BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, GROUP_SIZE_M=gm, num_warps=w, num_stages=st)
         for bm, bn, bk, gm, w, st in [(128, 128, 256, 16, 8, 3), (128, 128, 128, 16, 8, 3), (128, 256, 128, 16, 8, 4),
                                       (64, 128, 256, 1, 8, 3), (64, 128, 128, 1, 4, 4)]]
WIDE = [dict(BLOCK_SIZE_M=bm, BLOCK_SIZE_N=256, BLOCK_SIZE_K=bk, GROUP_SIZE_M=gm, num_warps=8, num_stages=st)
        for bm, bk, gm, st in [(128, 128, 1, 4), (128, 128, 64, 4), (128, 128, 16, 3), (128, 64, 16, 4), (64, 128, 16, 4),
                               (64, 128, 1, 4)]]


def report(record_file: Path) -> None:
    """Per token count: the best tile of each accumulation, int32 on the fp32-steps kernel's best tile, speed-ups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = json.loads(record_file.read_text())
    rows = [r for r in rec["rows"] if "int32_acc_us" in r and "fp32_steps_us" in r]
    ms = sorted({r["M"] for r in rows}, reverse=True)

    def tile(t):
        return f"{t['BLOCK_SIZE_M']}x{t['BLOCK_SIZE_N']}x{t['BLOCK_SIZE_K']} g{t['GROUP_SIZE_M']} s{t['num_stages']}"

    print("| tokens M | fp32 steps (vLLM's way), best tile | us | int32 in the MMA, same tile (us) | int32, best tile | us "
          "| best vs best |")
    print("|---:|---|---:|---:|---|---:|---:|")
    bars = []
    for m in ms:
        mine = [r for r in rows if r["M"] == m]
        f = min(mine, key=lambda r: r["fp32_steps_us"])
        i = min(mine, key=lambda r: r["int32_acc_us"])
        bars.append((f["fp32_steps_us"], f["int32_acc_us"], i["int32_acc_us"]))
        print(f"| {m} | {tile(f['tile'])} | {f['fp32_steps_us']:.0f} | {f['int32_acc_us']:.0f} | {tile(i['tile'])} "
              f"| {i['int32_acc_us']:.0f} | {f['fp32_steps_us'] / i['int32_acc_us']:.2f}x |")
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = ["fp32 steps (vLLM's int8 way), its best tile", "int32 in the MMA, same tile", "int32 in the MMA, its best tile"]
    for k, (label, color) in enumerate(zip(labels, ("#9ecae1", "#6baed6", "#31a354"))):
        ax.bar([x + (k - 1) * 0.27 for x in range(len(ms))], [b[k] for b in bars], 0.27, label=label, color=color)
    ax.set_xticks(range(len(ms)), [str(m) for m in ms])
    ax.set_xlabel("tokens per call (M)")
    ax.set_ylabel("gate/up expert GEMM (us)")
    sh = rec["shape"]
    ax.set_title(f"int8 expert GEMM, E={sh['experts']} N={sh['n']} K={sh['k']} top-{sh['topk']} - {rec['device']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(record_file.with_suffix(".png"), dpi=120)
    print(f"wrote {record_file.with_suffix('.png')}")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--report":
        return report(Path(sys.argv[2]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--n", type=int, default=28672, help="output rows of the expert GEMM (gate/up: 2 x intermediate)")
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--ms", type=int, nargs="+", default=[8192, 256])
    p.add_argument("--wide", action="store_true", help="also 256-wide N tiles around the best one")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randint(-127, 128, (a.experts, a.n, a.k), dtype=torch.int8, device="cuda", generator=g)
    ws = torch.rand(a.experts, a.n, 1, device="cuda", generator=g) * 1e-3
    rec = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "shape": vars(a) | {"out": str(a.out)}, "iters": "20 after 3, CUDA events", "rows": []}
    import triton

    rec["triton"] = triton.__version__
    for m in a.ms:
        x = torch.randint(-128, 128, (m, a.k), dtype=torch.int8, device="cuda", generator=g)
        xs = torch.rand(m, 1, device="cuda", generator=g) * 1e-2
        ids = torch.stack([torch.randperm(a.experts, device="cuda", generator=g)[:a.topk] for _ in range(m)]).int()
        wts = torch.softmax(torch.randn(m, a.topk, device="cuda", generator=g), -1)
        for tile in TILES + (WIDE if a.wide else []):
            align = [t.cuda() for t in moe_align_block_size(ids.cpu(), tile["BLOCK_SIZE_M"], a.experts)]
            outs, row = {}, {"M": m, "tile": tile}
            for name, fp32 in (("int32_acc", False), ("fp32_steps", True)):
                out = torch.empty(m, a.topk, a.n, dtype=torch.bfloat16, device="cuda")

                def run():
                    moe_int8.grouped_gemm(x, xs, w, ws, out, wts, *align, mul_routed_weight=False, top_k=a.topk,
                                          config=tile, fp32_steps=fp32)
                try:
                    row[f"{name}_us"] = time_us(run)
                    outs[name] = out.clone()
                except Exception as e:  # a tile this GPU cannot run
                    row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:120]}"
            if len(outs) == 2:
                row["outputs_equal"] = bool(torch.equal(outs["int32_acc"], outs["fp32_steps"]))
                row["speedup"] = row["fp32_steps_us"] / row["int32_acc_us"]
            rec["rows"].append(row)
            print(json.dumps(row), flush=True)
            a.out.write_text(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
