"""Tune vLLM's Triton fused-MoE kernel configs for one MoE shape on this GPU: int8 W8A8 (per-token activations,
per-channel weights: what the smoothquant MoE method runs) and 16-bit, so both are compared with tuned configs.

    python benchmarks/moe_tune.py --experts 128 --inter 768 --hidden 2048 --topk 8 --out DIR
    python benchmarks/moe_tune.py --report DIR/tune-<device>.json       # markdown table + PNG of a record
    VLLM_TUNED_CONFIG_FOLDER=DIR vllm bench throughput ...      # vLLM reads the configs from there

Writes vLLM's config files (``E=..,N=..,device_name=..[,dtype=int8_w8a8].json``: for each token count M, the
fastest config of the grid) and ``tune-<device>.json`` (every M's best and vLLM's default config, microseconds).
Random weights and routing (uniform over experts); each config timed with CUDA events over 20 calls after 3.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

MS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]


SMEM_BYTES = 227 * 1024  # shared memory per block on Hopper; larger tiles fail to launch, so are not compiled


def grid(dtype: str, M: int, N: int):
    """Tiles around vLLM's defaults (int8: K tiles of 128/256 bytes, like fp8's); grouping only with many tokens;
    256-wide N tiles for wide experts (N >= 4096, Mixtral's 14,336), where long GEMMs want big tiles."""
    ks = (128, 256) if dtype == "int8_w8a8" else (64, 128)
    elem = 1 if dtype == "int8_w8a8" else 2
    bms = [bm for bm in (16, 32, 64, 128) if bm <= max(16, 4 * M)]
    bns = (64, 128, 256) if N >= 4096 else (64, 128)
    gms = (1, 16) if M >= 1024 else (1,)
    for bm, bn, bk, gm, stages in itertools.product(bms, bns, ks, gms, (3, 4)):
        if (bm + bn) * bk * elem * stages > SMEM_BYTES:
            continue
        yield {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "GROUP_SIZE_M": gm, "SPLIT_K": 1,
               "num_warps": 4 if bm <= 32 else 8, "num_stages": stages}


def shipped(E: int, N: int, M: int, dtype: str, kernel: str = "vllm") -> list[dict]:
    """Tuned entries that already exist for this E, N on this GPU, nearest M: vLLM's own (16-bit and fp8 files: fp8
    is also one byte wide, so its tiles are a natural candidate for int8) and, for int8, the plugin's table for
    ``kernel`` (``vllm_smoothquant/moe_configs``)."""
    from vllm.model_executor.layers.fused_moe.fused_moe import get_moe_configs

    from vllm_smoothquant.moe_configs import int8_table, pick

    tables = [get_moe_configs(E, N, d) for d in (None, "fp8_w8a8")]
    if dtype == "int8_w8a8":
        tables.append(int8_table(E, N, kernel))
    return [{"SPLIT_K": 1, **pick(t, M)} for t in tables if t]


def setup(E: int, N: int, K: int, dtype: str):
    from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig

    g = torch.Generator(device="cuda").manual_seed(0)
    if dtype == "int8_w8a8":
        w1 = torch.randint(-127, 128, (E, 2 * N, K), dtype=torch.int8, device="cuda", generator=g)
        w2 = torch.randint(-127, 128, (E, K, N), dtype=torch.int8, device="cuda", generator=g)
        s1 = torch.rand(E, 2 * N, 1, device="cuda", generator=g) * 1e-3
        s2 = torch.rand(E, K, 1, device="cuda", generator=g) * 1e-3
        qc = FusedMoEQuantConfig.make(torch.int8, w1_scale=s1, w2_scale=s2, per_act_token_quant=True,
                                      per_out_ch_quant=True)
    else:
        w1 = torch.randn(E, 2 * N, K, device="cuda", generator=g).half() * 0.02
        w2 = torch.randn(E, K, N, device="cuda", generator=g).half() * 0.02
        qc = None
    return w1, w2, qc


def time_us(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / iters


def tune(E: int, N: int, K: int, topk: int, dtype: str, ms: list[int], save, kernel: str = "vllm",
         quick: bool = False) -> dict:
    """Best config per M; ``save(results)`` after every M, so a run cut short keeps what it measured."""
    from vllm.model_executor.layers.fused_moe import override_config
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts, get_default_config

    w1, w2, qc = setup(E, N, K, dtype)
    out = {}
    for M in ms:
        g = torch.Generator(device="cuda").manual_seed(M)
        x = torch.randn(M, K, device="cuda", generator=g).half()
        ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:topk] for _ in range(M)]).int()
        wts = torch.softmax(torch.randn(M, topk, device="cuda", generator=g), -1)

        def run(cfg):
            if kernel == "int32_acc" and dtype == "int8_w8a8":  # the plugin's int32 experts (moe_int8.py)
                from vllm_smoothquant import moe_int8

                return time_us(lambda: moe_int8.fused_experts(
                    x, w1, w2, qc.w1_scale, qc.w2_scale, wts, ids, cfg, activation="silu",
                    apply_router_weight_on_input=False, global_num_experts=E, expert_map=None))
            with override_config(cfg):
                return time_us(lambda: fused_experts(x, w1, w2, wts, ids, quant_config=qc))

        default = get_default_config(M, E, N, K, topk, dtype if dtype != "fp16" else None)
        results = []
        for cfg in [default, *shipped(E, N, M, dtype, kernel), *([] if quick else grid(dtype, M, N))]:
            try:
                results.append((run(cfg), cfg))
            except Exception as e:  # a config the GPU cannot run (shared memory): skipped
                print(f"  M={M} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        if not results:
            raise SystemExit(f"{dtype} M={M}: no config ran (see the errors above)")
        best = min(results, key=lambda r: r[0])
        out[M] = {"best_us": best[0], "best": best[1], "default_us": results[0][0], "default": default}
        print(f"{dtype} M={M}: default {results[0][0]:.1f} us, best {best[0]:.1f} us {best[1]}", flush=True)
        save(out)
    return out


def report(record_file: Path) -> None:
    """Markdown table (stdout) and ``<record>.png``: per token count, the experts' time with vLLM's config and the
    tuned one, int8 W8A8 and 16-bit, and int8's speed-up over 16-bit (each with its tuned config)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = json.loads(record_file.read_text())
    i8, f16 = rec["results"]["int8_w8a8"], rec["results"].get("fp16", {})  # a record may hold int8 alone
    ms = sorted(set(map(int, i8)) & set(map(int, f16))) if f16 else sorted(map(int, i8))
    cols = ["tokens M", "int8 W8A8, vLLM's config (us)", "int8, tuned (us)", "int8 tuned vs vLLM's"]
    if f16:
        cols[3:3] = ["16-bit, vLLM's config (us)", "16-bit, tuned (us)"]
        cols.append("int8 vs 16-bit (both tuned)")
    acc32 = rec["results"].get("int8_w8a8_int32_acc", {})  # moe_tune.py --kernel int32_acc
    if acc32:
        cols += ["int8, int32-accumulating kernel, tuned (us)", "int32-acc vs vLLM's int8 kernel (both tuned)"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---:|" * len(cols))
    for m in ms:
        a = i8[str(m)]
        cells = [str(m), f"{a['default_us']:.0f}", f"{a['best_us']:.0f}", f"{a['default_us'] / a['best_us']:.2f}x"]
        if f16:
            b = f16[str(m)]
            cells[3:3] = [f"{b['default_us']:.0f}", f"{b['best_us']:.0f}"]
            cells.append(f"{b['best_us'] / a['best_us']:.2f}x")
        if acc32 and str(m) in acc32:
            c = acc32[str(m)]
            cells += [f"{c['best_us']:.0f}", f"{a['best_us'] / c['best_us']:.2f}x"]
        elif acc32:
            cells += ["—", "—"]
        print("| " + " | ".join(cells) + " |")
    fig, ax = plt.subplots(figsize=(9, 4.2))
    series = [("int8 W8A8, vLLM's config", i8, "default_us", "#9ecae1"), ("int8 W8A8, tuned", i8, "best_us", "#08519c")]
    if f16:
        series += [("16-bit, vLLM's config", f16, "default_us", "#fdae6b"), ("16-bit, tuned", f16, "best_us", "#a63603")]
    if acc32 and all(str(m) in acc32 for m in ms):
        series.append(("int8 W8A8, int32-accumulating kernel (moe_int8.py), tuned", acc32, "best_us", "#31a354"))
    width, xs = 0.8 / len(series), range(len(ms))
    for k, (label, res, key, color) in enumerate(series):
        ax.bar([x + (k - (len(series) - 1) / 2) * width for x in xs], [res[str(m)][key] for m in ms], width,
               label=label, color=color)
    ax.set_xticks(list(xs), [str(m) for m in ms])
    ax.set_xlabel("tokens per call (M)")
    ax.set_ylabel("fused_experts time (us)")
    shape = rec["shape"]
    ax.set_title(f"vLLM Triton fused-MoE, E={shape['experts']} N={shape['inter']} K={shape['hidden']} top-{shape['topk']}"
                 f" - {rec['device']}, vLLM {rec['vllm']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(record_file.with_suffix(".png"), dpi=120)
    print(f"wrote {record_file.with_suffix('.png')}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--report":
        return report(Path(sys.argv[2]))
    from vllm.model_executor.layers.fused_moe.fused_moe import get_config_file_name

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, required=True)
    p.add_argument("--inter", type=int, required=True, help="expert intermediate size (N)")
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--topk", type=int, required=True)
    p.add_argument("--dtypes", nargs="+", default=["int8_w8a8", "fp16"])
    p.add_argument("--kernel", choices=["vllm", "int32_acc"], default="vllm",
                   help="int8 experts: vLLM's Triton kernel, or the plugin's int32-accumulating one (moe_int8.py); "
                        "its results go under 'int8_w8a8_int32_acc' in the record, its config file into OUT/int32_acc")
    p.add_argument("--ms", type=int, nargs="+", default=MS, help="token counts to tune for")
    p.add_argument("--quick", action="store_true",
                   help="time vLLM's choice and the tuned entries that exist (vLLM's 16-bit and fp8 files, the "
                        "plugin's int8 table), no grid (seconds instead of minutes)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    from vllm_smoothquant.offline.harness import provenance

    dev = torch.cuda.get_device_name().replace(" ", "_")
    record_file = a.out / f"tune-{dev}.json"
    record = json.loads(record_file.read_text()) if record_file.exists() else {**provenance(), "results": {}}
    record["shape"] = vars(a) | {"out": str(a.out)}

    for dtype in a.dtypes:
        name = get_config_file_name(a.experts, a.inter, None if dtype == "fp16" else dtype)
        key, folder = dtype, a.out
        if a.kernel == "int32_acc" and dtype == "int8_w8a8":  # same file name, its own folder and record key
            key, folder = "int8_w8a8_int32_acc", a.out / "int32_acc"
            folder.mkdir(exist_ok=True)

        def save(res, key=key, name=name, folder=folder):
            record["results"][key] = {str(m): r for m, r in res.items()}
            (folder / name).write_text(json.dumps({str(m): r["best"] for m, r in res.items()}, indent=1))
            record_file.write_text(json.dumps(record, indent=1))

        tune(a.experts, a.inter, a.hidden, a.topk, dtype, a.ms, save, a.kernel, a.quick)
        print(f"wrote {folder / name}", flush=True)


if __name__ == "__main__":
    main()
