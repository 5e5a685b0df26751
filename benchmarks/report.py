"""Pivot benchmark rows (one JSON line per tool run) into results JSON, a Markdown table and a PNG.

    python benchmarks/report.py benchmarks/results/raw/*.jsonl

Writes ``benchmarks/results/<device>-<date>.json`` (rows with fp16_*, stock_w8a8_*, smoothquant_*
side by side), ``benchmarks/results/<device>-<date>.md`` (the table) and ``...png`` (the plot).
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from vllm_smoothquant.offline.harness import PROVENANCE_KEYS

HERE = Path(__file__).resolve().parent
# gpu_bench.py's variants, in table order; "_kv8" = fp8 e4m3 KV cache, "_kv16" = 16-bit KV cache forced
VARIANTS = ("fp16", "fp16_kv8", "stock_w8a8", "smoothquant", "smoothquant_int32acc", "smoothquant_vllmmoe",
            "smoothquant_kv16", "smoothquant_kv8", "fp8", "fp8_kv8")
LABELS = {"fp16": "FP16", "fp16_kv8": "FP16 + fp8 KV", "stock_w8a8": "stock W8A8", "smoothquant": "SmoothQuant",
          "smoothquant_int32acc": "SmoothQuant, int32-acc experts", "smoothquant_vllmmoe": "SmoothQuant, vLLM's experts kernel",
          "smoothquant_kv16": "SmoothQuant, 16-bit KV", "smoothquant_kv8": "SmoothQuant + fp8 KV",
          "fp8": "FP8", "fp8_kv8": "FP8 + fp8 KV"}
# ratio columns (a, b): a's speed over b's, where both ran
RATIOS = (("smoothquant", "fp16"), ("smoothquant", "stock_w8a8"), ("smoothquant", "fp8"), ("smoothquant_int32acc", "fp16"),
          ("smoothquant_int32acc", "smoothquant"), ("smoothquant_vllmmoe", "fp16"),
          ("smoothquant_int32acc", "smoothquant_vllmmoe"), ("smoothquant_kv8", "fp16"), ("smoothquant_kv8", "fp8_kv8"))
METRIC = {"vllm bench throughput": "tok_s", "vllm bench latency": "latency_s", "vllm bench serve": "output_tok_s"}
EXTRA = ("latency_p50_s", "output_tok_s", "kv_cache_tokens", "model_load_gib", "mean_ttft_ms", "mean_tpot_ms",
         "attention_backend", "flash_attention_version", "kv_cache_dtype_arg", "kv_cache_fp8")


def pivot(rows: list[dict]) -> list[dict]:
    """One row per (device, vLLM, model, tool, workload), the variants side by side. A variant run more than once
    (repeats) gets the mean as its number, ``<variant>_<metric>_runs`` (every run, in order) and ``<variant>_runs``."""
    groups: dict[tuple, dict] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r["device"], r["vllm"], r["model"], r["tool"], r["workload"])][r["variant"]].append(r)
    out = []
    for (device, vllm, model, tool, workload), by_variant in groups.items():
        metric = METRIC[tool]
        first = next(iter(by_variant.values()))[0]
        row = {k: first[k] for k in PROVENANCE_KEYS if k in first}  # where and with what it ran (gpu_bench rows)
        row |= {"device": device, "vllm": vllm, "model": model, "tool": tool, "workload": workload,
                "date": first["date"], "metric": metric}
        for v in VARIANTS:
            if v in by_variant:
                runs, last = by_variant[v], by_variant[v][-1]
                row[f"{v}_{metric}"] = sum(r[metric] for r in runs) / len(runs)
                if len(runs) > 1:
                    row[f"{v}_{metric}_runs"], row[f"{v}_runs"] = [r[metric] for r in runs], len(runs)
                for k in EXTRA:
                    if k != metric and k in last:
                        row[f"{v}_{k}"] = last[k]
                row[f"{v}_command"] = last["command"]
        out.append(row)
    batch = lambda r: int(m.group(1)) if (m := re.search(r"batch (\d+)", r["workload"])) else 0
    return sorted(out, key=lambda r: (r["tool"], batch(r)))


def _ratio(row, a, b):
    m = row["metric"]
    if f"{a}_{m}" not in row or f"{b}_{m}" not in row:
        return None
    x, y = row[f"{a}_{m}"], row[f"{b}_{m}"]
    return x / y if m != "latency_s" else y / x  # > 1 means `a` is faster


def markdown(rows: list[dict]) -> str:
    """One column per variant that ran in any row, then the ratios of ``RATIOS`` that have numbers."""
    ran = lambda v: any(f"{v}_{r['metric']}" in r for r in rows)
    variants = [v for v in VARIANTS if ran(v)]
    ratios = [(a, b) for a, b in RATIOS if any(_ratio(r, a, b) for r in rows)]
    lines = ["| model | tool | workload | metric | " + " | ".join(LABELS[v] for v in variants) + "".join(
             f" | {LABELS[a]} / {LABELS[b]}" for a, b in ratios) + " |",
             "|---|---|---|---|" + "---:|" * (len(variants) + len(ratios))]
    for r in rows:
        m = r["metric"]
        num = lambda x: f"{x:,.3f}" if m == "latency_s" else f"{x:,.0f}"
        spread = lambda v: (f" (mean of {len(runs)}: {num(min(runs))}–{num(max(runs))})"
                            if (runs := r.get(f"{v}_{m}_runs")) else "")
        cell = lambda v: num(r[f"{v}_{m}"]) + spread(v) if f"{v}_{m}" in r else "not run"
        ratio = lambda a, b: f"{x:.2f}x" if (x := _ratio(r, a, b)) else "-"
        lines.append(f"| {r['model']} | {r['tool']} | {r['workload']} | {m} | " + " | ".join(cell(v) for v in variants)
                     + "".join(f" | {ratio(a, b)}" for a, b in ratios) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in VARIANTS if any(f"{v}_{r['metric']}" in r for r in rows)]
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(9, 0.25 * len(rows) * len(variants) + 1.5))
    labels, cmap, shown = [], plt.get_cmap("tab10"), set()
    for i, r in enumerate(rows):
        base = r.get(f"fp16_{r['metric']}")
        for j, v in enumerate(variants):
            val = r.get(f"{v}_{r['metric']}")
            if val is None or base is None:
                continue
            speed = val / base if r["metric"] != "latency_s" else base / val
            y = i + (j - (len(variants) - 1) / 2) * width
            runs = [x / base if r["metric"] != "latency_s" else base / x for x in r.get(f"{v}_{r['metric']}_runs", [])]
            err = [[speed - min(runs)], [max(runs) - speed]] if runs else None  # repeats: the range of the runs
            ax.barh(y, speed, height=width * 0.9, color=cmap(j), label=LABELS[v] if v not in shown else None,
                    xerr=err, capsize=3 if runs else 0)
            shown.add(v)
            ax.text(max([speed, *runs]), y, f" {speed:.2f}x", va="center", fontsize=7)
        labels.append(f"{r['model'].removesuffix(' (random weights)')}\n{r['tool'].split()[-1]}: {r['workload']}")
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.axvline(1.0, color="black", lw=0.5)
    ax.set_xlim(0, ax.get_xlim()[1] * 1.08)  # room for the ratio labels
    ax.set_xlabel("speed relative to FP16 (higher is better)")
    models = sorted({r["model"] for r in rows})
    ax.set_title(f"{models[0] if len(models) == 1 else 'random-weight shapes'} on {rows[0]['device']}, "
                 f"vLLM {rows[0]['vllm']}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(paths: list[Path], name: str | None = None) -> Path:
    """``name``: the results file stem (default ``<device>-<date>``), e.g. for one model's rows of one machine."""
    rows = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]
    table = pivot(rows)
    device = re.sub(r"[^A-Za-z0-9]+", "-", table[0]["device"]).strip("-").lower()
    stem = HERE / "results" / (name or f"{device}-{table[0]['date']}")
    stem.with_suffix(".json").write_text(json.dumps(table, indent=2))
    stem.with_suffix(".md").write_text(markdown(table) + "\n")
    plot(table, stem.with_suffix(".png"))
    print(markdown(table))
    print(f"wrote {stem}.json, .md, .png")
    return stem


def plot_profile(path: Path) -> Path:
    """Stacked per-layer time (FP16 vs int8) from ``profile_layer.py`` JSON, as a PNG beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = json.loads(Path(path).read_text())
    rows = d["rows"]
    labels = [f"{r['phase']} {r['tokens']}" for r in rows]
    parts = [("GEMMs", "fp16_gemms_us", "int8_gemms_us", "#4c72b0"), ("per-token quant", None, "int8_quant_us", "#dd8452"),
             ("LayerNorm x2", "layernorm_x2_us", "layernorm_x2_us", "#55a868"), ("attention", "attention_us", "attention_us", "#c44e52")]
    fig, ax = plt.subplots(figsize=(9, 4))
    for k, (name, fp_key, i8_key, color) in enumerate(parts):
        for j, key in enumerate((fp_key, i8_key)):
            x = [i * 3 + j for i in range(len(rows))]
            total = [r["layer_fp16_us" if j == 0 else "layer_int8_us"] for r in rows]
            bottom = [sum(r[p[1 + j]] for p in parts[:k] if p[1 + j]) for r in rows]
            vals = [r[key] if key else 0.0 for r in rows]
            ax.bar(x, [v / t for v, t in zip(vals, total)], bottom=[b / t for b, t in zip(bottom, total)],
                   color=color, label=name if j == 1 else None, hatch="//" if j == 0 else None, edgecolor="white")
    ax.set_xticks([i * 3 + 0.5 for i in range(len(rows))], [f"{lb}\nFP16 | int8" for lb in labels], fontsize=7)
    ax.set_ylabel("share of one decoder layer's time")
    ax.set_title(f"OPT-13B decoder layer on {d['device']} (vLLM {d['vllm']} ops; hatched = FP16)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--profile"]:
        print(plot_profile(Path(sys.argv[2])))
    else:
        report([Path(p) for p in sys.argv[1:]])
