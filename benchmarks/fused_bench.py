"""The fused RMSNorm -> int8 kernel (issue 26, ``fused_quant.py``): throughput and latency of stock vLLM W8A8 vs
SmoothQuant with the fusion (the default) vs without, interleaved repeats in one process, and a kernel profile.

    python benchmarks/gpu_bench.py build --shape llama-3-8b --root R --tokenizer TOK --device cuda
    python benchmarks/fused_bench.py latency --shape llama-3-8b --root R --out lat.json
    python benchmarks/fused_bench.py profile --shape llama-3-8b --root R --out prof.json --variants fp16 smoothquant
    python benchmarks/fused_bench.py report --latency-json lat.json [lat2.json] --profile-json prof.json --out results/NAME.md

`latency`: every variant's engine is built once (vLLM's defaults: torch.compile + CUDA graphs, each engine a share
of the GPU) and the measurements rotate through them -- repeat r, workload, variant v -- so a drift of the
machine hits every variant alike. A latency measurement is what `vllm bench latency` times: `LLM.generate` of b
dummy prompts (input_len token ids, ignore_eos, max_tokens output_len), mean over `--iters` after a warm-up. With
`--throughput-prompts N` each repeat also times what `vllm bench throughput` does: N random prompts of
`--throughput-input` tokens, `--throughput-output` out, in one `LLM.generate`; total (prompt + output) tokens/s.
`profile`: vLLM's torch profiler around decode steps (batch 1 and 64) per variant; kernel time by category
(GEMM, activation quant, norm, attention, activation function, sampling, other) and the GPU-idle share of the window.
Random weights: speed only.
"""

from __future__ import annotations

import argparse
import gc
import glob
import gzip
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gpu_bench import _dirs  # noqa: E402

FUSED = {"smoothquant": {"fused_quant": True}}
# variant -> (checkpoint variant in gpu_bench's build, quantization, additional_config)
VARIANTS = {
    "fp16": ("fp16", None, None),
    "stock_w8a8": ("stock_w8a8", None, None),
    "smoothquant": ("smoothquant", "smoothquant", None),  # the default: the norm, then vLLM's quant kernel, as stock
    "smoothquant_fused": ("smoothquant", "smoothquant", FUSED),  # RMSNorm -> int8 in vLLM's fused kernel
}

# kernel name -> category. Inductor names a Triton kernel after the ops it fused (and after ops whose output buffers
# it allocates: stock's norm kernel is "..._dynamic_scaled_int8_quant_fused_add_rms_norm", no quant in it).
NORM, ACT = r"rms_norm|rsqrt|layer_norm|var_mean", r"silu|sigmoid|relu|gelu"
KERNELS = [
    ("norm + int8 quant (vLLM fused kernel)", r"rms_norm_dynamic_per_token_quant|rms_norm.*per_token_quant"),
    ("activation quant (vLLM kernel)", r"scaled_int8_quant_kernel|scaled_fp8_quant|per_token_quant"),
    ("attention", r"flash|fmha|attn|attention|paged|reshape_and_cache"),  # before GEMM: FlashAttention is CUTLASS
    ("GEMM", r"cutlass_3x_gemm|gemm|nvjet|xmma|cublas|splitKreduce"),
    ("sampling", r"sampl|topk|top_k|sort|argmax|softmax|exponential|gumbel|penalt"),
]


def _category(name: str) -> str:
    if name.startswith("triton"):
        if re.search(NORM, name):
            return "norm"
        return "activation function" if re.search(ACT, name) else "other"
    for cat, pat in KERNELS:
        if re.search(pat, name, re.I):
            return cat
    return "other"


def _engine(root: Path, shape: str, variant: str, util: float, profile_dir: Path | None = None):
    from vllm import LLM

    ckpt, quant, extra = VARIANTS[variant]
    kw = dict(model=str(_dirs(root, shape)[ckpt]), quantization=quant, gpu_memory_utilization=util,
              max_model_len=2048, enable_prefix_caching=False, seed=0)
    if extra:
        kw["additional_config"] = extra
    if profile_dir is not None:
        kw["profiler_config"] = {"profiler": "torch", "torch_profiler_dir": str(profile_dir),
                                 "torch_profiler_with_stack": False}
    return LLM(**kw)


def _generate(llm, batch: int, input_len: int, output_len: int):
    import numpy as np
    from vllm import SamplingParams

    sp = SamplingParams(n=1, temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=output_len)
    ids = np.random.RandomState(batch).randint(10000, size=(batch, input_len)).tolist()
    llm.generate([{"prompt_token_ids": p} for p in ids], sampling_params=sp, use_tqdm=False)


def _throughput(llm, prompts: int, input_len: int, output_len: int) -> float:
    """Total tokens/s of one ``LLM.generate`` over ``prompts`` random prompts (as ``vllm bench throughput``)."""
    t = time.perf_counter()
    _generate(llm, prompts, input_len, output_len)
    return prompts * (input_len + output_len) / (time.perf_counter() - t)


def latency(args) -> dict:
    from vllm_smoothquant.offline.harness import provenance

    engines = {v: _engine(args.root, args.shape, v, args.util) for v in args.variants}
    for llm in engines.values():  # warm-up: every batch size once
        for b in args.batches:
            _generate(llm, b, args.input_len, args.output_len)
    runs: dict = {v: {str(b): [] for b in args.batches} for v in args.variants}
    tput: dict = {v: [] for v in args.variants}
    for r in range(args.repeats):
        for v, llm in engines.items() if args.throughput_prompts else ():
            tput[v].append(_throughput(llm, args.throughput_prompts, args.throughput_input, args.throughput_output))
            print(f"repeat {r} throughput {v:22s} {tput[v][-1]:,.0f} tok/s", flush=True)
        for b in args.batches:
            for v, llm in engines.items():
                t = time.perf_counter()
                for _ in range(args.iters):
                    _generate(llm, b, args.input_len, args.output_len)
                runs[v][str(b)].append((time.perf_counter() - t) / args.iters)
                print(f"repeat {r} batch {b:3d} {v:22s} {runs[v][str(b)][-1]:.4f} s", flush=True)
    summary = {v: {b: {"mean_s": statistics.mean(x), "stdev_s": statistics.stdev(x) if len(x) > 1 else 0.0,
                       "runs_s": x} for b, x in per.items()} for v, per in runs.items()}
    out = {**provenance(), "model": f"{args.shape} (random weights)", "measure": "LLM.generate latency "
           f"(as vllm bench latency): {args.input_len} in / {args.output_len} out, mean of {args.iters} iters, "
           f"{args.repeats} interleaved repeats, engines built once each at gpu_memory_utilization {args.util}",
           "command": " ".join(sys.argv), "results": summary}
    if args.throughput_prompts:
        out["throughput"] = {
            "measure": f"LLM.generate of {args.throughput_prompts} random prompts, {args.throughput_input} in / "
                       f"{args.throughput_output} out (as vllm bench throughput): total tokens/s, one per repeat",
            "results": {v: {"mean_tok_s": statistics.mean(x), "min_tok_s": min(x), "max_tok_s": max(x), "runs": x}
                        for v, x in tput.items()}}
    return out


def _kernel_times(trace: Path) -> tuple[dict, float, float, list]:
    """{category: GPU microseconds}, busy microseconds (union of kernel intervals), window span (first kernel
    start to last kernel end), the 25 kernels with the most time."""
    with gzip.open(trace) if trace.suffix == ".gz" else open(trace) as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    cats: dict = {}
    for e in kernels:
        cats[_category(e["name"])] = cats.get(_category(e["name"]), 0.0) + e["dur"]
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels)
    busy, end = 0.0, float("-inf")
    for s, e in spans:
        if e > end:
            busy += e - max(s, end)
            end = e
    names: dict = {}
    for e in kernels:
        names[e["name"]] = names.get(e["name"], 0.0) + e["dur"]
    top = sorted(names.items(), key=lambda kv: -kv[1])[:25]
    return cats, busy, (spans[-1][1] - spans[0][0]) if spans else 0.0, top


def profile(args) -> dict:
    from vllm_smoothquant.offline.harness import provenance

    out: dict = {}
    for v in args.variants:
        pdir = Path(args.profile_dir) / v
        pdir.mkdir(parents=True, exist_ok=True)
        llm = _engine(args.root, args.shape, v, args.util, pdir)
        for b in args.batches:
            _generate(llm, b, args.input_len, 8)  # warm-up
            before = set(glob.glob(f"{pdir}/**/*.json*", recursive=True))
            llm.start_profile(profile_prefix=f"{v}_b{b}")
            _generate(llm, b, args.input_len, args.output_len)
            llm.stop_profile()
            time.sleep(2)
            new = sorted(set(glob.glob(f"{pdir}/**/*.json*", recursive=True)) - before, key=os.path.getmtime)
            if not new:
                print(f"{v} b{b}: no trace written in {pdir}", flush=True)
                continue
            cats, busy, span, top = _kernel_times(Path(new[-1]))
            total = sum(cats.values())
            out.setdefault(v, {})[str(b)] = {
                "kernel_us_total": total, "gpu_busy_us": busy, "window_us": span,
                "share": {k: c / total for k, c in sorted(cats.items(), key=lambda kv: -kv[1])},
                "gpu_idle_share_of_window": 1 - busy / span if span else None,
                "top_kernels_us": top, "trace": new[-1],
            }
            print(f"{v} b{b}: " + ", ".join(f"{k} {c / total:.1%}" for k, c in cats.items()), flush=True)
        del llm
        gc.collect()
    return {**provenance(), "model": f"{args.shape} (random weights)", "measure": "vLLM torch profiler over "
            f"one generate call ({args.input_len} in / {args.output_len} out) per batch size; kernel time by "
            "category (regexes in benchmarks/fused_bench.py)", "command": " ".join(sys.argv), "results": out}


def _merge(latency_jsons: list[Path]) -> dict:
    """Several `latency` runs of the same variants (one call each on the GPU machine) as one: runs concatenated."""
    runs = [json.loads(p.read_text()) for p in latency_jsons]
    lat = dict(runs[0], commands=[r["command"] for r in runs])
    repeats = sum(int(re.search(r"(\d+) interleaved", r["measure"]).group(1)) for r in runs)
    lat["measure"] = re.sub(r"\d+ interleaved repeats", f"{repeats} interleaved repeats in {len(runs)} runs",
                            lat["measure"])
    lat["results"] = {v: {b: {"runs_s": [x for r in runs for x in r["results"][v][b]["runs_s"]]} for b in per}
                      for v, per in runs[0]["results"].items()}
    for per in lat["results"].values():
        for r in per.values():
            r["mean_s"], r["stdev_s"] = statistics.mean(r["runs_s"]), statistics.stdev(r["runs_s"])
    if all("throughput" in r for r in runs):
        lat["throughput"] = dict(runs[0]["throughput"])
        lat["throughput"]["results"] = {v: {"runs": [x for r in runs for x in r["throughput"]["results"][v]["runs"]]}
                                        for v in runs[0]["throughput"]["results"]}
    return lat


def report(latency_jsons: list[Path], profile_json: Path, out: Path, base: str = "smoothquant") -> str:
    """Markdown tables (throughput and latency vs ``base`` and stock, kernel time by category) and a PNG beside
    ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat, prof = _merge(latency_jsons), json.loads(profile_json.read_text())
    for per in prof["results"].values():  # categories from the kernel names (the rules may be newer than the run)
        for r in per.values():
            cats: dict = {}
            for name, us in r["top_kernels_us"]:
                cats[_category(name)] = cats.get(_category(name), 0.0) + us
            cats["other"] = cats.get("other", 0.0) + r["kernel_us_total"] - sum(us for _, us in r["top_kernels_us"])
            r["share"] = {k: v / r["kernel_us_total"] for k, v in cats.items()}
    res, variants = lat["results"], list(lat["results"])
    batches = list(res[variants[0]])
    lines = [f"{lat['device']}, vLLM {lat['vllm']}, torch {lat['torch']}, {lat['date']}; {lat['model']}", ""]
    tput = lat.get("throughput", {}).get("results", {})
    if tput:
        lines += [f"Throughput ({lat['throughput']['measure']}):", "",
                  "| variant | tok/s, mean (min–max) | per repeat | vs " + base + " | vs stock_w8a8 |",
                  "|---|---|---|---|---|"]
        for v, r in tput.items():
            x = r["runs"]
            ratio = [a / b for a, b in zip(x, tput[base]["runs"])]  # repeat by repeat: interleaved
            lines.append(f"| {v} | {statistics.mean(x):,.0f} ({min(x):,.0f}–{max(x):,.0f}) | "
                         + ", ".join(f"{y:,.0f}" for y in x) + f" | {statistics.mean(ratio):.3f}× "
                         f"({min(ratio):.3f}–{max(ratio):.3f}) | "
                         f"{statistics.mean(x) / statistics.mean(tput['stock_w8a8']['runs']):.3f}× |")
        lines.append("")
    lines += [f"Latency ({lat['measure']}):", "",
              "| batch | " + " | ".join(f"{v} (s)" for v in variants) + " | " +
              " | ".join(f"{v} / {base}" for v in variants if v != base) + " |",
              "|---" * (1 + 2 * len(variants) - 1) + "|"]
    for b in batches:
        cells = [f"{res[v][b]['mean_s']:.4f} ± {res[v][b]['stdev_s']:.4f}" for v in variants]
        ratios = [f"{res[v][b]['mean_s'] / res[base][b]['mean_s']:.3f}×" for v in variants if v != base]
        lines.append(f"| {b} | " + " | ".join(cells + ratios) + " |")
    cats = sorted({c for per in prof["results"].values() for r in per.values() for c in r["share"]})
    lines += ["", f"Kernel time ({prof['measure']}), ms:", "",
              "| variant | batch | GPU kernel time | " + " | ".join(cats) + " |", "|---" * (3 + len(cats)) + "|"]
    for v, per in prof["results"].items():
        for b, r in per.items():
            lines.append(f"| {v} | {b} | {r['kernel_us_total'] / 1e3:.1f} | "
                         + " | ".join(f"{r['kernel_us_total'] * r['share'].get(c, 0) / 1e3:.2f}" for c in cats) + " |")
    fig, axes = plt.subplots(1, 3 if tput else 2, figsize=(17 if tput else 13, 4.5))
    if tput:
        ax = axes[0]
        ax.bar(range(len(tput)), [statistics.mean(r["runs"]) for r in tput.values()], 0.6,
               yerr=[[statistics.mean(r["runs"]) - min(r["runs"]) for r in tput.values()],
                     [max(r["runs"]) - statistics.mean(r["runs"]) for r in tput.values()]], capsize=4)
        ax.set_xticks(range(len(tput)), list(tput), fontsize=8)
        ax.set_ylabel("total tokens/s (mean, min-max over repeats)")
        ax.set_title("throughput, 1000 x 1024 in / 128 out")
        ax.set_ylim(min(min(r["runs"]) for r in tput.values()) * 0.95, None)
    a1, a2 = axes[-2], axes[-1]
    w = 0.8 / len(variants)
    for i, v in enumerate(variants):
        a1.bar([j + i * w for j in range(len(batches))], [res[v][b]["mean_s"] for b in batches], w,
               yerr=[res[v][b]["stdev_s"] for b in batches], label=v, capsize=3)
    a1.set_xticks([j + w for j in range(len(batches))], [f"batch {b}" for b in batches])
    a1.set_ylabel("latency, s (128 in / 128 out)")
    a1.set_title(f"{lat['model']}, {lat['device']}: latency")
    a1.legend(fontsize=8)
    rows = [(f"{v}\nb{b}", r) for v, per in prof["results"].items() for b, r in per.items()]
    bottoms = [0.0] * len(rows)
    for c in [c for c in cats if "norm" in c or "quant" in c]:  # the kernels the fusion is about
        vals = [r["kernel_us_total"] / 1e3 * r["share"].get(c, 0) for _, r in rows]
        a2.bar(range(len(rows)), vals, 0.7, bottom=bottoms, label=c)
        bottoms = [x + y for x, y in zip(bottoms, vals)]
    for i, total in enumerate(bottoms):
        a2.annotate(f"{total:.1f}", (i, total), ha="center", va="bottom", fontsize=8)
    a2.set_xticks(range(len(rows)), [n for n, _ in rows], fontsize=7)
    a2.set_ylabel("GPU time of norm and int8 quant kernels, ms")
    a2.set_title("norm + quant kernel time (vLLM torch profiler, 1024 in / 16 out)", fontsize=9)
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(table + "\n")
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["latency", "profile", "report"])
    p.add_argument("--latency-json", type=Path, nargs="+", help="report: the latency JSON(s), merged")
    p.add_argument("--base", default="smoothquant", help="report: the variant the ratios are taken against")
    p.add_argument("--profile-json", type=Path, help="report: the profile JSON")
    p.add_argument("--shape")
    p.add_argument("--root", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variants", nargs="+", default=["stock_w8a8", "smoothquant", "smoothquant_fused"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--throughput-prompts", type=int, default=0, help="latency: also time throughput (e.g. 1000)")
    p.add_argument("--throughput-input", type=int, default=1024)
    p.add_argument("--throughput-output", type=int, default=128)
    p.add_argument("--util", type=float, default=0.27, help="gpu_memory_utilization of each engine")
    p.add_argument("--profile-dir", default="/tmp/sq-profile")
    args = p.parse_args()
    if args.mode == "report":
        print(report(args.latency_json, args.profile_json, args.out, args.base))
        return
    if args.shape is None or args.root is None:
        p.error("latency and profile need --shape and --root")
    if args.mode == "profile" and args.output_len == 128:
        args.output_len = 16  # decode steps in the window
    result = latency(args) if args.mode == "latency" else profile(args)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
