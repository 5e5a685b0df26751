"""Perplexity through vLLM of SmoothQuant variants of one model: the table in docs/ACCURACY.md.

    python benchmarks/accuracy.py --out docs/accuracy-<device>-<date>.json [--device cuda] [--only ROW ...]

Builds every variant with ``vllm-smoothquant quantize`` (calibration text C), evaluates each with
``vllm-smoothquant eval`` on held-out text H (the real int8 kernels: CUTLASS on CUDA, oneDNN on
CPU) and writes JSON rows (device, versions, date, exact commands, perplexity, share of naive
W8A8's gap to the unquantized model that SmoothQuant closes) plus a PNG bar chart beside it.
Defaults: SmolLM2-135M-Instruct, convention speeches, movie reviews (``offline/assets.py``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from vllm_smoothquant.offline.harness import device_name, provenance

CLI = str(Path(sys.executable).with_name("vllm-smoothquant"))
ALL = "qkv,gate_up,o,down"
# name -> (activation scheme, quantize flags); None: the unquantized model
VARIANTS: dict[str, tuple[str, list[str] | None]] = {
    "unquantized": ("-", None),
    "naive-token": ("token", ["--no-smooth"]),
    "sq-0.8-norm-pairs-token": ("token", ["--alpha", "0.8", "--smooth-groups", "qkv,gate_up"]),
    "sq-0.8-all-pairs-token": ("token", ["--alpha", "0.8", "--smooth-groups", ALL]),
    "sq-auto-all-pairs-token": ("token", ["--alpha", "auto", "--smooth-groups", ALL]),
    "naive-static": ("static", ["--no-smooth", "--activations", "static"]),
    "sq-0.8-norm-pairs-static": ("static", ["--alpha", "0.8", "--smooth-groups", "qkv,gate_up", "--activations", "static"]),
    "sq-0.8-all-pairs-static": ("static", ["--alpha", "0.8", "--smooth-groups", ALL, "--activations", "static"]),
    "sq-auto-all-pairs-static": ("static", ["--alpha", "auto", "--smooth-groups", ALL, "--activations", "static"]),
    "sq-0.8-all-pairs-static-down-token": ("static", ["--alpha", "0.8", "--smooth-groups", ALL, "--activations", "static",
                                                      "--activation-override", "down_proj=token"]),
    # 8-bit KV cache (issue 10): "-kv8" rows run an fp8 e4m3 KV cache, the others a 16-bit one
    "unquantized-kv8-scale1": ("-", None),
    "sq-0.8-all-pairs-token-kv8-scale1": ("token", ["--alpha", "0.8", "--smooth-groups", ALL]),
    "sq-0.8-all-pairs-token-kv8": ("token", ["--alpha", "0.8", "--smooth-groups", ALL, "--kv-cache", "fp8"]),
    "sq-0.8-all-pairs-token-kv8-head": ("token", ["--alpha", "0.8", "--smooth-groups", ALL, "--kv-cache", "fp8",
                                                  "--kv-cache-scales", "head"]),
    "sq-auto-all-pairs-token-kv8": ("token", ["--alpha", "auto", "--smooth-groups", ALL, "--kv-cache", "fp8"]),
}
# eval flags of a row beyond the common ones: "-scale1" rows ask vLLM for an fp8 KV cache without calibrated scales
# (vLLM uses 1.0); rows whose checkpoint has --kv-cache fp8 get the fp8 cache by themselves (no flag).
EVAL_FLAGS = {name: ["--kv-cache-dtype", "fp8"] for name in VARIANTS if name.endswith("-kv8-scale1")}


def _run(cmd: list[str]) -> str:
    print("+", shlex.join(cmd), flush=True)
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout


def _eval(cmd: list[str]) -> dict:
    """The eval's JSON line. vLLM 0.26's engine sometimes aborts while shutting down (SIGABRT,
    "terminate called without an active exception") after the result is printed: accept that."""
    print("+", shlex.join(cmd), flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"eval exited with {p.returncode} and printed no result: {shlex.join(cmd)}")
    if p.returncode:
        print(f"(eval exited with {p.returncode} after printing its result)", flush=True)
    return json.loads(lines[-1])


def main() -> int:
    import torch

    from vllm_smoothquant.offline import assets

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF model dir (default: SmolLM2-135M-Instruct bf16)")
    p.add_argument("--calib", default=None)
    p.add_argument("--heldout", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="quantize on cpu|cuda")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--only", nargs="*", choices=list(VARIANTS), help="a subset of the rows")
    p.add_argument("--workdir", default=None, help="where checkpoints go (default: a temp dir)")
    p.add_argument("--out", required=True, help="JSON file to write (a PNG is written beside it)")
    p.add_argument("--plot-only", action="store_true", help="only draw the PNG of an existing --out JSON")
    a = p.parse_args()
    out = Path(a.out)
    if a.plot_only:
        _plot(json.loads(out.read_text()), out.with_suffix(".png"))
        return 0
    model = a.model or str(assets.smollm2_dir())
    calib, held = a.calib or str(assets.calibration_text()), a.heldout or str(assets.heldout_text())
    work = Path(a.workdir or tempfile.mkdtemp(prefix="sq-accuracy-"))
    eval_flags = ["--text", held, "--windows", str(a.windows), "--seq-len", str(a.seq_len), "--enforce-eager", "--json"]

    # Resumable: rows already in --out (same device) are kept, so a long table can be built in several calls.
    previous = json.loads(out.read_text()) if out.is_file() else {}
    rows = [r for r in previous.get("rows", []) if r["variant"] not in (a.only or VARIANTS)] \
        if previous.get("device") == device_name() else []
    built: dict[tuple[str, ...], tuple[str, dict]] = {}  # quantize flags -> (checkpoint, its row fields): built once
    for name in a.only or VARIANTS:
        scheme, flags = VARIANTS[name]
        row = {"variant": name, "activations": scheme, "model": Path(model).name}
        target = model
        if flags is not None and tuple(flags) in built:
            target, fields = built[tuple(flags)]
            row |= fields
        elif flags is not None:
            target = str(work / name)
            qcmd = [CLI, "quantize", model, target, "--calib", calib, "--num-samples", str(a.num_samples),
                    "--seq-len", str(a.seq_len), "--device", a.device, "--overwrite", *flags]
            row["quantize_output_tail"] = _run(qcmd).strip().splitlines()[-1]
            row["quantize_command"] = shlex.join(["vllm-smoothquant", *qcmd[1:]])
            built[tuple(flags)] = (target, {k: row[k] for k in ("quantize_output_tail", "quantize_command")})
        ecmd = [CLI, "eval", target, *eval_flags, *EVAL_FLAGS.get(name, [])]
        r = _eval(ecmd)
        row |= {"eval_command": shlex.join(["vllm-smoothquant", *ecmd[1:]]), "perplexity": r["ppl"], "tokens": r["tokens"],
                "kv_cache": "fp8" if "kv8" in name else "16-bit"}
        rows.append(row)
        print(f"{name}: {r['ppl']:.3f}", flush=True)
        _write(out, rows, a, calib, held)
    result = _write(out, rows, a, calib, held)
    try:
        _plot(result, out.with_suffix(".png"))
    except ImportError:
        print(f"matplotlib is missing here: draw the plot elsewhere with `{Path(__file__).name} --out {out} --plot-only`")
    print(f"wrote {out}")
    return 0


def _kv16_twin(variant: str) -> str | None:
    """The 16-bit-KV row a "-kv8" row is compared with (same weights)."""
    if "-kv8" not in variant:
        return None
    base = variant.split("-kv8")[0]
    return base if base in VARIANTS else None


def _write(out: Path, rows: list[dict], a, calib: str, held: str) -> dict:
    """Write the table so far (after every row: an interrupted run keeps what it measured)."""
    rows.sort(key=lambda r: list(VARIANTS).index(r["variant"]))
    base = next((r["perplexity"] for r in rows if r["variant"] == "unquantized"), None)
    for r in rows:
        naive = next((x["perplexity"] for x in rows if x["variant"] == f"naive-{r['activations']}"), None)
        kv16 = next((x["perplexity"] for x in rows if x["variant"] == _kv16_twin(r["variant"])), None)
        if kv16 is not None and kv16 != r["perplexity"]:
            r["vs_16bit_kv_pct"] = round(100 * (r["perplexity"] / kv16 - 1), 3)
        if base is not None:
            r["vs_unquantized_pct"] = round(100 * (r["perplexity"] / base - 1), 2)
            if naive is not None and naive != base and r["variant"] != "unquantized":
                r["naive_gap_closed_pct"] = round(100 * (naive - r["perplexity"]) / (naive - base), 1)
    result = {**provenance(), "quantize_device": a.device,
              "calibration": Path(calib).name, "heldout": Path(held).name, "windows": a.windows,
              "seq_len": a.seq_len, "num_samples": a.num_samples, "rows": rows}
    out.write_text(json.dumps(result, indent=2))
    return result


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    colors = ["gray" if r["variant"] == "unquantized" else "tab:red" if r["variant"].startswith("naive")
              else "tab:blue" for r in rows]
    ax.barh([r["variant"] for r in rows], [r["perplexity"] for r in rows], color=colors)
    for i, r in enumerate(rows):
        ax.text(r["perplexity"], i, f" {r['perplexity']:.2f}", va="center", fontsize=8)
    base = next((r["perplexity"] for r in rows if r["variant"] == "unquantized"), None)
    if base:
        ax.axvline(base, color="gray", ls="--", lw=0.8)
        ax.axvline(base * 1.01, color="green", ls=":", lw=0.8, label="unquantized + 1 %")
        ax.legend(loc="lower right", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("perplexity on held-out text (lower is better)")
    ax.set_title(f"{rows[0]['model']} through vLLM {result['vllm']} on {result['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
