"""Host and GPU memory and time of `vllm-smoothquant quantize` on a large random-weight model (a benchmark).

    # CPU: a 2.2 GiB random Llama (bf16) quantized under a 1.5 GiB cgroup memory limit (smaller than its weights)
    python benchmarks/quantize_memory.py --shape llama-2.2g --limit 1.5GiB --num-samples 8 --seq-len 128
    # H100: the OPT-13B shape (24 GiB fp16), no limit
    python benchmarks/quantize_memory.py --shape opt-13b --device cuda --dtype float16 --num-samples 512 --seq-len 512

1. builds the model once under --root as sharded safetensors (random weights, written tensor by tensor: the
   build needs little memory), with the SmolLM2 tokenizer and calibration text that `demo` uses;
2. runs `vllm-smoothquant quantize` on it as a subprocess, optionally inside a cgroup v1 memory limit (root only:
   a child cgroup of this process's own memory cgroup, `memory.limit_in_bytes`, the child's pid in `cgroup.procs`
   before it execs), sampling the child's RSS every 50 ms;
3. writes benchmarks/results/quantize-memory-<shape>-<device>-<date>.json (wall time, peak RSS as the child
   measured it and as sampled, the cgroup's peak usage and failcnt, CUDA peak, per-layer time and memory, the
   limit, the command, provenance) and appends a row to benchmarks/results/quantize-memory.md.

Random weights measure memory and time only, never accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

SHAPES = {
    "opt-13b": dict(cls="OPTConfig", hidden_size=5120, num_hidden_layers=40, ffn_dim=20480, num_attention_heads=40,
                    vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=5120,
                    do_layer_norm_before=True, architectures=["OPTForCausalLM"], dtype="float16"),
    # TinyLlama-1.1B's layout with SmolLM2's vocabulary: 1.17 B parameters, 2.18 GiB in bf16
    "llama-2.2g": dict(cls="LlamaConfig", hidden_size=2048, num_hidden_layers=22, intermediate_size=5632,
                       num_attention_heads=32, num_key_value_heads=4, vocab_size=49152, max_position_embeddings=2048,
                       tie_word_embeddings=False, architectures=["LlamaForCausalLM"], dtype="bfloat16"),
    "tiny-llama": dict(cls="LlamaConfig", hidden_size=64, num_hidden_layers=2, intermediate_size=192,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=False,
                       architectures=["LlamaForCausalLM"], dtype="bfloat16"),  # for trying this script
}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B?)\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: use e.g. 1.5GiB, 1536MiB or a number of bytes")
    unit = m.group(2).upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(unit or " "))


# ---------------------------------------------------------------- build
def build(shape: str, path: Path, tokenizer: Path | None) -> Path:
    """A random-weight model of ``shape`` at ``path`` (kept: later runs reuse it)."""
    if (path / "config.json").is_file():
        return path
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from vllm_smoothquant.offline import assets
    from vllm_smoothquant.offline.export import ShardWriter, atomic_dir

    spec = dict(SHAPES[shape])
    dtype = getattr(torch, spec.pop("dtype"))
    config = getattr(transformers, spec.pop("cls"))(**spec)
    config.dtype = dtype
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=dtype)
    specs = {n: (tuple(t.shape), t.dtype) for n, t in meta.state_dict().items()}
    if config.tie_word_embeddings:
        specs.pop("lm_head.weight", None)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random numbers are made faster there
    gen = torch.Generator(device=device).manual_seed(0)
    with atomic_dir(path, overwrite=True) as tmp:
        with ShardWriter(tmp, specs) as w:
            for name, (shape_, dt) in specs.items():
                if name.endswith("norm.weight") or "layer_norm.weight" in name:
                    t = torch.ones(shape_, dtype=dt)
                elif name.endswith("bias"):
                    t = torch.zeros(shape_, dtype=dt)
                else:
                    t = (torch.randn(shape_, generator=gen, device=device) * 0.02).to(dt)
                w.write(name, t)
        config.save_pretrained(tmp)
        tok = tokenizer or assets.smollm2_dir()
        for f in tok.iterdir():
            if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens")) or f.suffix in (".txt", ".jinja")):
                shutil.copy2(f, tmp / f.name)
    return path


def _gib(n) -> float | None:
    return None if n is None else round(n / 2**30, 3)


# ---------------------------------------------------------------- cgroup v1
def memory_cgroup(name: str, limit: int) -> Path:
    """A child of this process's own memory cgroup, limited to ``limit`` bytes (swap too, where accounted)."""
    root = Path("/sys/fs/cgroup/memory")
    if not (root / "memory.limit_in_bytes").is_file():
        sys.exit(f"no cgroup v1 memory controller at {root}: run without --limit")
    own = next((line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                if "memory" in line.split(":", 2)[1].split(",")), "/")
    cg = root / own.lstrip("/") / name
    cg.mkdir(exist_ok=True)
    (cg / "memory.limit_in_bytes").write_text(str(limit))
    if (cg / "memory.memsw.limit_in_bytes").is_file():
        (cg / "memory.memsw.limit_in_bytes").write_text(str(limit))
    return cg


def _read_int(p: Path) -> int | None:
    try:
        return int(p.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _oom_kills(cg: Path) -> int | None:
    try:
        return int(dict(line.split() for line in (cg / "memory.oom_control").read_text().splitlines())["oom_kill"])
    except (OSError, KeyError, ValueError):
        return None


# ---------------------------------------------------------------- run
def run(args) -> dict:
    from vllm_smoothquant.offline import assets

    model = build(args.shape, args.root / f"{args.shape}-random", args.tokenizer)
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    out = args.root / f"{args.shape}-sq"
    exe = Path(sys.executable).with_name("vllm-smoothquant")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "vllm_smoothquant.offline.cli"]
    calib = args.calib or assets.calibration_text()
    cmd += ["quantize", str(model), str(out), "--calib", str(calib), "--num-samples",
            str(args.num_samples), "--seq-len", str(args.seq_len), "--device", args.device, "--dtype", args.dtype,
            "--overwrite", *args.extra]
    cg = memory_cgroup(f"quantize-memory-{os.getpid()}", args.limit) if args.limit else None

    def enter_cgroup():  # in the child, before exec: everything it allocates is accounted there
        if cg is not None:
            (cg / "cgroup.procs").write_text(str(os.getpid()))

    log = args.root / f"{args.shape}-quantize.log"
    print(f"$ {' '.join(cmd)}" + (f"   # in {cg} (limit {_gib(args.limit)} GiB)" if cg else "") + f"\n  log: {log}",
          flush=True)
    record_load = os.getloadavg()  # the machine may be shared: how busy it was
    start = time.perf_counter()
    with log.open("w") as f:
        child = subprocess.Popen(cmd, preexec_fn=enter_cgroup, stdout=f, stderr=subprocess.STDOUT)
        sampled = 0
        while child.poll() is None:
            try:
                status = Path(f"/proc/{child.pid}/status").read_text()
                sampled = max(sampled, int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) * 1024)
            except (OSError, AttributeError):
                pass
            time.sleep(0.05)
    wall = time.perf_counter() - start
    record = {"shape": args.shape, "config": SHAPES[args.shape], "weights_bytes": weights, "weights_gib": _gib(weights),
              "limit_bytes": args.limit, "limit_gib": _gib(args.limit), "command": " ".join(cmd),
              "returncode": child.returncode, "wall_seconds": round(wall, 1), "sampled_peak_rss_gib": _gib(sampled),
              "load_average_at_start": [round(x, 2) for x in record_load], "cpu_count": os.cpu_count()}
    if cg is not None:
        record |= {"cgroup": str(cg), "cgroup_max_usage_gib": _gib(_read_int(cg / "memory.max_usage_in_bytes")),
                   "cgroup_failcnt": _read_int(cg / "memory.failcnt"), "cgroup_oom_kills": _oom_kills(cg)}
        for _ in range(50):  # the cgroup can be removed once its last task is gone
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    report = out / "smoothquant" / "report.json"
    if child.returncode == 0 and report.is_file():
        r = json.loads(report.read_text())
        layers = r["layers"]
        record |= {
            "loading": r["loading"], "activations": r.get("activations"),
            "peak_rss_gib": _gib(r["peak_rss_bytes"]), "peak_cuda_gib": _gib(r.get("peak_cuda_bytes")),
            "output_gib": _gib(sum(f.stat().st_size for f in out.glob("*.safetensors"))),
            "layer_seconds_median": round(statistics.median(x["seconds"] for x in layers), 3),
            "layer_seconds_sum": round(sum(x["seconds"] for x in layers), 1),
            "layer_peak_rss_gib_max": _gib(max((x["peak_rss_bytes"] or 0) for x in layers)),
            "layer_peak_cuda_gib_max": _gib(max((x["peak_cuda_bytes"] or 0) for x in layers)) if args.device != "cpu"
            else None,
            "layers": layers,
        }
    else:
        record["output_tail"] = log.read_text(errors="replace")[-4000:]
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return record


def _provenance() -> dict:
    try:
        from vllm_smoothquant.offline.harness import provenance

        return provenance()
    except ImportError:  # a GPU machine without vLLM: quantize needs none
        import datetime
        import platform

        import torch
        import transformers

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {platform.machine()}"
        return {"date": datetime.date.today().isoformat(), "device": gpu, "torch": torch.__version__,
                "transformers": transformers.__version__, "python": platform.python_version()}


def save(record: dict, args) -> Path:
    record = {**_provenance(), "settings": {"num_samples": args.num_samples, "seq_len": args.seq_len,
                                           "device": args.device, "dtype": args.dtype, "extra": args.extra},
              **record}
    slug = re.sub(r"[^a-z0-9]+", "-", record["device"].lower()).strip("-")
    limit = f"-limit-{record['limit_gib']}GiB" if args.limit else ""
    path = RESULTS / f"quantize-memory-{args.shape}{limit}-{slug}-{record['date']}.json"
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    table = RESULTS / "quantize-memory.md"
    if not table.is_file():
        table.write_text(
            "# `vllm-smoothquant quantize` memory and time (benchmarks/quantize_memory.py)\n\n"
            "| date | device | model (random) | weights GiB | limit GiB | samples x seq | wall s | peak RSS GiB "
            "| sampled RSS GiB | cgroup max GiB | peak CUDA GiB | s / layer (median) | ok |\n"
            "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|\n")
    cells = [record["date"], record["device"], args.shape, record["weights_gib"], record["limit_gib"] or "-",
             f"{args.num_samples} x {args.seq_len}", record["wall_seconds"], record.get("peak_rss_gib", "-"),
             record["sampled_peak_rss_gib"], record.get("cgroup_max_usage_gib", "-"),
             record.get("peak_cuda_gib") or "-", record.get("layer_seconds_median", "-"),
             "yes" if record["returncode"] == 0 else f"no (exit {record['returncode']})"]
    with table.open("a") as f:
        f.write("| " + " | ".join(str(c) for c in cells) + " |\n")
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-2.2g")
    p.add_argument("--root", type=Path, default=Path("/tmp/quantize-memory"), help="where the models are built")
    p.add_argument("--limit", type=parse_size, default=None, help="cgroup v1 memory limit, e.g. 1.5GiB (root)")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory (default: demo's SmolLM2)")
    p.add_argument("--calib", type=Path, default=None, help="calibration text (default: demo's)")
    p.add_argument("--keep", action="store_true", help="keep the quantized output")
    p.add_argument("extra", nargs="*", help="more quantize arguments, after --")
    args = p.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    record = run(args)
    path = save(record, args)
    print(json.dumps({k: v for k, v in record.items() if k not in ("layers", "config", "output_tail")}, indent=2))
    print(f"wrote {path} and a row of {RESULTS / 'quantize-memory.md'}")
    return 0 if record["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
