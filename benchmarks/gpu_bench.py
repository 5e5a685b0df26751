"""Speed of SmoothQuant W8A8 vs FP16 vs stock vLLM W8A8 (compressed-tensors), with vLLM's own tools.

    # 1. random-weight checkpoints of a real shape: FP16, SmoothQuant, and compressed-tensors
    #    that hard-links the *same* int8 safetensors (identical weights, only config.json differs)
    python benchmarks/gpu_bench.py build --shape opt-13b --root /tmp/ckpt --tokenizer TOKENIZER_DIR
    # 2. run vLLM's tools on each variant; one JSON row per run is appended to --rows
    python benchmarks/gpu_bench.py run --shape opt-13b --root /tmp/ckpt --suite throughput --rows rows.jsonl
    # 3. pivot the rows into benchmarks/results/<device>-<date>.json, RESULTS.md table and a PNG
    python benchmarks/gpu_bench.py report rows.jsonl [--name STEM]

Suites: throughput (1000 prompts, 1024 in / 128 out), throughput-512 (512 in / 256 out),
latency (batch 1, 8, 64; 128 in / 128 out), serve (vllm serve + vllm bench serve at a few rates).
Random weights measure speed only, never accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# variant -> (checkpoint directory suffix, engine flags). The variant name says the KV-cache dtype: "_kv8" runs an
# fp8 (e4m3) KV cache, the others a 16-bit one. smoothquant_kv8 is `vllm-smoothquant quantize --kv-cache fp8` of the
# fp16 model (calibrated k/v scales; vLLM picks the fp8 cache from the checkpoint by itself, no flag), and the
# same checkpoint served with --kv-cache-dtype bfloat16 is "smoothquant (16-bit KV)" (run every variant with
# -- --dtype bfloat16: vLLM 0.26's FlashAttention 3 with an fp8 KV cache needs bf16 activations); fp8_kv8 is vLLM's online FP8
# (no KV scales: vLLM uses 1.0). See `build` and `build-sq`.
VARIANTS = {
    "fp16": ("fp16", []),
    "fp16_kv8": ("fp16", ["--kv-cache-dtype", "fp8"]),
    "stock_w8a8": ("stock_w8a8", []),
    "smoothquant": ("smoothquant", ["--quantization", "smoothquant"]),
    # RMSNorm -> int8 in vLLM's fused kernel (opt-in: fused_quant.py)
    "smoothquant_fused": ("smoothquant", ["--quantization", "smoothquant", "--additional-config",
                                          '{"smoothquant": {"fused_quant": true}}']),
    # the int8 experts through the plugin's int32-accumulating kernel (moe_int8.py; the CUDA default since
    # 2026-11-23 session 10, asked for explicitly here), or through vLLM's int8 fused-MoE kernel
    "smoothquant_int32acc": ("smoothquant", ["--quantization", "smoothquant", "--additional-config",
                                             '{"smoothquant": {"moe_kernel": "int32_acc"}}']),
    "smoothquant_vllmmoe": ("smoothquant", ["--quantization", "smoothquant", "--additional-config",
                                            '{"smoothquant": {"moe_kernel": "vllm"}}']),
    "smoothquant_kv16": ("smoothquant-kv8", ["--quantization", "smoothquant", "--kv-cache-dtype", "bfloat16"]),
    "smoothquant_kv8": ("smoothquant-kv8", ["--quantization", "smoothquant"]),
    "fp8_kv8": ("fp16", ["--quantization", "fp8", "--kv-cache-dtype", "fp8"]),
    "fp8": ("fp16", ["--quantization", "fp8"]),
    # the smoothquant int8 tensors (hard links) with format 3's rotation declared for every down_proj (issue 22):
    # the same GEMMs plus the run-time Hadamard rotation of down_proj's input (hadacore), blocks of 256
    "smoothquant_rot": ("smoothquant-rot", ["--quantization", "smoothquant"]),
}
QUANT_ARG = {v: flags for v, (_, flags) in VARIANTS.items()}

SHAPES = {
    "opt-13b": dict(
        cls="OPTConfig", hidden_size=5120, num_hidden_layers=40, ffn_dim=20480, num_attention_heads=40,
        vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=5120, do_layer_norm_before=True,
        architectures=["OPTForCausalLM"],
    ),
    "llama-3-8b": dict(
        cls="LlamaConfig", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
    ),
    # Qwen3-30B-A3B with 24 of its 48 decoder layers (15.5B parameters, 31 GB in 16 bits: fits one H100 with room
    # for the KV cache, and the fp16 + int8 checkpoints fit the GPU machine's disk); 128 experts, top-8
    "qwen3-30b-a3b-24l": dict(
        cls="Qwen3MoeConfig", hidden_size=2048, num_hidden_layers=24, intermediate_size=6144, moe_intermediate_size=768,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, architectures=["Qwen3MoeForCausalLM"],
    ),
    # Mixtral-8x7B with 8 of its 32 decoder layers (11.9B parameters, 24 GB in 16 bits): 8 large experts
    # (14336 x 4096), top-2 -- the MoE shape where int8 expert GEMMs are long, as in a dense model
    "mixtral-8x7b-8l": dict(
        cls="MixtralConfig", hidden_size=4096, num_hidden_layers=8, intermediate_size=14336, num_local_experts=8,
        num_experts_per_tok=2, num_attention_heads=32, num_key_value_heads=8, vocab_size=49152,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        architectures=["MixtralForCausalLM"],
    ),
    # for testing this script on a CPU
    "tiny-qwen3-moe": dict(
        cls="Qwen3MoeConfig", hidden_size=64, num_hidden_layers=2, intermediate_size=128, moe_intermediate_size=32,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=50272, max_position_embeddings=2048, architectures=["Qwen3MoeForCausalLM"],
    ),
    "tiny-opt": dict(
        cls="OPTConfig", hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4, vocab_size=50272,
        max_position_embeddings=2048, word_embed_proj_dim=64, architectures=["OPTForCausalLM"],
    ),
}


def _dirs(root: Path, shape: str) -> dict[str, Path]:
    return {v: root / f"{shape}-{d}" for v, (d, _) in VARIANTS.items()}


# ---------------------------------------------------------------- build
def build(shape: str, root: Path, tokenizer: Path, device: str, fp16_only: bool = False) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from vllm_smoothquant.format import Calibration, SmoothQuantFormat
    from vllm_smoothquant.offline.convert import to_compressed_tensors
    from vllm_smoothquant.offline.experts import split_experts
    from vllm_smoothquant.offline.export import atomic_dir, save_safetensors
    from vllm_smoothquant.offline.mappings import mapping_for
    from vllm_smoothquant.offline.quantization import quantize_weight

    spec = dict(SHAPES[shape])
    config = getattr(transformers, spec.pop("cls"))(**spec)
    config.dtype = torch.float16
    dirs = _dirs(root, shape)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    mapping = mapping_for(config)
    split_experts(meta, mapping)  # MoE: per-expert tensors under the checkpoint's names, as vLLM loads them
    layers = mapping.layers
    linears = {n for n, m in meta.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(layers + ".")}
    gen = torch.Generator(device=device).manual_seed(0)
    fp16: dict[str, torch.Tensor] = {}
    for name, p in meta.state_dict().items():
        if name.endswith("norm.weight"):
            t = torch.ones(p.shape, dtype=torch.float16, device=device)
        elif name.endswith("bias"):
            t = torch.zeros(p.shape, dtype=torch.float16, device=device)
        else:
            t = (torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * 0.02).half()
        fp16[name] = t
    if getattr(config, "tie_word_embeddings", False):
        fp16.pop("lm_head.weight", None)
    int8 = dict(fp16)
    for n in linears:
        q, s = quantize_weight(fp16[f"{n}.weight"], "channel")
        int8[f"{n}.weight"], int8[f"{n}.weight_scale"] = q, s
    fmt = SmoothQuantFormat(alpha=None, smoothed=False, calibration=Calibration(source="random weights (speed only)"))
    for variant, sd in (("fp16", fp16), ("smoothquant", int8))[:1 if fp16_only else 2]:
        with atomic_dir(dirs[variant], overwrite=True) as tmp:
            save_safetensors(sd, tmp)
            if variant == "smoothquant":
                config.quantization_config = fmt.to_dict()
            config.save_pretrained(tmp)
            for f in tokenizer.iterdir():
                if f.is_file() and f.name != "config.json":
                    shutil.copy2(f, tmp / f.name)
        print(f"built {dirs[variant]} ({_gib(dirs[variant]):.2f} GiB)", flush=True)
    if fp16_only:
        return
    _with_rotation(dirs["smoothquant"], dirs["smoothquant_rot"], config, fmt, mapping)
    to_compressed_tensors(dirs["smoothquant"], dirs["stock_w8a8"], overwrite=True)
    print(f"built {dirs['stock_w8a8']} (hard links to the smoothquant int8 tensors)", flush=True)


def _with_rotation(src: Path, dst: Path, config, fmt, mapping, block: int = 256) -> None:
    """``dst``: ``src``'s int8 tensors (hard links) with format 3's rotation of the MLP output projection declared
    (random weights: rotated or not, the same speed)."""
    import dataclasses

    from vllm_smoothquant.format import RotationScheme

    if mapping.mlp_out is None:
        return  # MoE experts: not rotatable
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json":
            os.link(f, dst / f.name)
    config.quantization_config = dataclasses.replace(
        fmt, rotation=RotationScheme(targets=(mapping.mlp_out,), block_size=block)).to_dict()
    config.save_pretrained(dst)
    print(f"built {dst} (hard links to the smoothquant int8 tensors; rotation declared)", flush=True)


def _gib(d: Path) -> float:
    return sum(f.stat().st_size for f in d.glob("*.safetensors")) / 2**30


# ---------------------------------------------------------------- run
def _tool(cmd: list[str], log: Path) -> str:
    print("$ " + " ".join(cmd), flush=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
    out = log.read_text()
    if proc.returncode != 0:
        print(out[-4000:], flush=True)
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def _engine_facts(log: str) -> dict:
    facts = {}
    if m := re.search(r"KV cache size: ([\d,]+) tokens", log):
        facts["kv_cache_tokens"] = int(m.group(1).replace(",", ""))
    if m := re.search(r"Model loading took ([\d.]+) GiB", log):
        facts["model_load_gib"] = float(m.group(1))
    if m := re.search(r"Using (\S+) (?:attention )?backend", log):
        facts["attention_backend"] = m.group(1)
    if m := re.search(r"Using FlashAttention version (\d+)", log):
        facts["flash_attention_version"] = int(m.group(1))
    if m := re.search(r"kv_cache_dtype=(\w+)", log):
        facts["kv_cache_dtype_arg"] = m.group(1)
    if m := re.search(r"Using fp8 data type to store kv cache", log):
        facts["kv_cache_fp8"] = True
    return facts


def run_suite(shape: str, root: Path, suite: str, rows: Path, work: Path, variants: list[str], extra: list[str],
              num_prompts: int = 1000, batch_sizes: tuple[int, ...] = (1, 8, 64)):
    from vllm_smoothquant.offline.harness import provenance

    env = provenance()
    work.mkdir(parents=True, exist_ok=True)
    dirs = _dirs(root, shape)
    base = {**env, "model": f"{shape} (random weights)"}

    def emit(row):
        with open(rows, "a") as f:
            f.write(json.dumps(row) + "\n")
        print("  " + json.dumps(row), flush=True)

    for v in variants:
        model = [str(dirs[v])]
        common = ["--model", *model, *QUANT_ARG[v], *extra]
        if suite.startswith("throughput"):
            i, o = (1024, 128) if suite == "throughput" else (512, 256)
            n = num_prompts
            out = work / f"{shape}-{v}-{suite}.json"
            cmd = ["vllm", "bench", "throughput", *common, "--dataset-name", "random", "--random-input-len", str(i),
                   "--random-output-len", str(o), "--num-prompts", str(n), "--output-json", str(out)]
            log = _tool(cmd, work / f"{shape}-{v}-{suite}.log")
            r = json.loads(out.read_text())
            emit({**base, "tool": "vllm bench throughput", "workload": f"random {n} prompts, {i} in / {o} out",
                  "variant": v, "tok_s": r["tokens_per_second"], "output_tok_s": n * o / r["elapsed_time"],
                  "req_s": r["requests_per_second"], "weights_gib": _gib(dirs[v]), **_engine_facts(log),
                  "command": " ".join(cmd)})
        elif suite == "latency":
            for b in batch_sizes:
                out = work / f"{shape}-{v}-latency-b{b}.json"
                cmd = ["vllm", "bench", "latency", *common, "--input-len", "128", "--output-len", "128",
                       "--batch-size", str(b), "--num-iters-warmup", "2", "--num-iters", "5", "--output-json", str(out)]
                log = _tool(cmd, work / f"{shape}-{v}-latency-b{b}.log")
                r = json.loads(out.read_text())
                emit({**base, "tool": "vllm bench latency", "workload": f"batch {b}, 128 in / 128 out",
                      "variant": v, "latency_s": r["avg_latency"], "latency_p50_s": r["percentiles"]["50"],
                      "iters": len(r["latencies"]), **_engine_facts(log), "command": " ".join(cmd)})
        elif suite == "serve":
            serve_suite(shape, v, dirs[v], work, emit, base, extra)
        else:
            raise SystemExit(f"unknown suite {suite!r}")


def wait_healthy(server: subprocess.Popen, port: int, log: str, timeout: float = 300) -> None:
    """Until ``vllm serve`` on ``port`` answers /health; its exit or the timeout is an error naming its log."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"vllm serve did not start; see {log}")
            time.sleep(2)


def serve_suite(shape, v, model_dir, work, emit, base, extra, port=8123, rates=("4", "16", "inf")):
    log = open(work / f"{shape}-{v}-serve.log", "w")
    cmd = ["vllm", "serve", str(model_dir), *QUANT_ARG[v], "--port", str(port), *extra]
    print("$ " + " ".join(cmd), flush=True)
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(server, port, log.name)
        for rate in rates:
            name = f"{shape}-{v}-serve-r{rate}.json"
            bcmd = ["vllm", "bench", "serve", "--backend", "vllm", "--model", str(model_dir), "--port", str(port),
                    "--dataset-name", "random", "--random-input-len", "1024", "--random-output-len", "128",
                    "--num-prompts", "200", "--request-rate", rate, "--save-result", "--result-dir", str(work),
                    "--result-filename", name]
            _tool(bcmd, work / f"{name}.log")
            r = json.loads((work / name).read_text())
            emit({**base, "tool": "vllm bench serve", "workload": f"random 200 prompts, 1024 in / 128 out, rate {rate}",
                  "variant": v, "output_tok_s": r["output_throughput"], "req_s": r["request_throughput"],
                  "mean_ttft_ms": r["mean_ttft_ms"], "mean_tpot_ms": r["mean_tpot_ms"],
                  "p99_ttft_ms": r.get("p99_ttft_ms"), "command": " ".join(bcmd)})
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--shape", choices=sorted(SHAPES), default="opt-13b")
    b.add_argument("--root", type=Path, required=True)
    b.add_argument("--tokenizer", type=Path, required=True, help="dir with tokenizer files to copy into each model")
    b.add_argument("--device", default="cuda")
    b.add_argument("--fp16-only", action="store_true",
                   help="only the fp16 model (the _kv8 SmoothQuant checkpoint comes from `vllm-smoothquant quantize`)")
    r = sub.add_parser("run")
    r.add_argument("--shape", choices=sorted(SHAPES), default="opt-13b")
    r.add_argument("--root", type=Path, required=True)
    r.add_argument("--suite", choices=["throughput", "throughput-512", "latency", "serve"], required=True)
    r.add_argument("--variants", default=",".join(VARIANTS))
    r.add_argument("--rows", type=Path, required=True, help="JSONL file the rows are appended to")
    r.add_argument("--work", type=Path, default=Path("/tmp/bench-work"))
    r.add_argument("--num-prompts", type=int, default=1000)
    r.add_argument("--batch-sizes", default="1,8,64", help="latency suite batch sizes")
    r.add_argument("extra", nargs="*", help="extra engine args after --, e.g. -- --max-model-len 2048")
    rp = sub.add_parser("report")
    rp.add_argument("rows", type=Path, nargs="+")
    rp.add_argument("--name", help="results file stem (default <device>-<date>)")
    a = p.parse_args(argv)
    if a.cmd == "build":
        build(a.shape, a.root, a.tokenizer, a.device, a.fp16_only)
    elif a.cmd == "run":
        run_suite(a.shape, a.root, a.suite, a.rows, a.work, a.variants.split(","), a.extra, a.num_prompts,
                  tuple(int(b) for b in a.batch_sizes.split(",")))
    else:
        from report import report  # benchmarks/report.py

        report(a.rows, a.name)


if __name__ == "__main__":
    sys.exit(main())
