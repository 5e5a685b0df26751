#!/usr/bin/env bash
# Issue 10 speed runs on one GPU: FP16, FP16 + fp8 KV, SmoothQuant (16-bit KV), SmoothQuant + calibrated fp8 KV,
# and FP8 + fp8 KV, all on the same machine, with vLLM's own tools (through gpu_bench.py).
#
#   bash benchmarks/kv_bench.sh build SHAPE ROOT TOKENIZER_DIR CALIB_TXT     # fp16 random weights + SQ with KV scales
#   bash benchmarks/kv_bench.sh run SHAPE ROOT ROWS.jsonl VARIANT[,VARIANT...] [SUITE]   # default suite throughput
#
# The SmoothQuant checkpoint is `vllm-smoothquant quantize --kv-cache fp8` of the random fp16 model on a short
# calibration (16 windows x 512 tokens of real text): its k/v scales are what calibration gives for these weights,
# never left at 1.0. Random weights measure speed only.
set -euo pipefail
cmd=$1; shape=$2; root=$3
here="$(cd "$(dirname "$0")" && pwd)"
case "$cmd" in
  build)
    tok=$4; calib=$5
    python3 "$here/gpu_bench.py" build --shape "$shape" --root "$root" --tokenizer "$tok" --fp16-only
    vllm-smoothquant quantize "$root/$shape-fp16" "$root/$shape-smoothquant-kv8" --calib "$calib" \
      --num-samples 16 --seq-len 512 --device cuda --dtype float16 --kv-cache fp8 --overwrite | tail -n 4
    ;;
  run)
    rows=$4; variants=$5; suite=${6:-throughput}
    python3 "$here/gpu_bench.py" run --shape "$shape" --root "$root" --suite "$suite" --variants "$variants" \
      --rows "$rows" -- --dtype bfloat16   # FA3 with an fp8 KV cache needs bf16 (vLLM 0.26): every variant alike
    ;;
  *) echo "usage: $0 build|run ..." >&2; exit 2 ;;
esac
