"""Tensor parallel on real weights: SmoothQuant TP=2 vs TP=1 greedy output (2 GPUs).

    python benchmarks/tp_check.py --out docs/gpu-tp2-real-<device>-<date>.json

SmolLM2-135M has 9 query / 3 kv heads, which 2 GPUs cannot split. The script pads it, exactly, to
12 query / 4 kv heads: the new heads have zero q/k/v rows and zero o_proj columns, so they add
nothing to the residual stream (checked: transformers logits of the padded vs unpadded model).
It quantizes the padded model with SmoothQuant twice (per-token activations, the default, and
static per-tensor activations), converts the per-token one to compressed-tensors, and compares
greedy continuations and prompt logprobs of held-out text at TP=1 and TP=2, the FP model included
as the yardstick for how much TP alone moves bf16 numerics. It also fetches every rank's loaded
int8 tensors (``LLM.apply_model``) and checks them bit for bit against the slices of the TP=1
tensors that vLLM's sharding prescribes. Decoding uses ``max_num_seqs 1`` so that batch shapes,
and hence numerics, do not depend on scheduling. The JSON is rewritten after every engine, so a
run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vllm_smoothquant.offline.harness import greedy, make_llm, provenance

CLI = str(Path(sys.executable).with_name("vllm-smoothquant"))


@torch.no_grad()
def pad_heads(src: str, dst: Path, heads: int, kv_heads: int) -> Path:
    """Copy of a Llama model with ``heads``/``kv_heads`` attention heads; added heads are zero.

    New q/k/v rows and o_proj columns are zero: a zero value head contributes nothing to o_proj's
    output, whatever its attention pattern, so the padded model computes the same function.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    old_h, old_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if heads % kv_heads or heads // kv_heads != old_h // old_kv:
        raise ValueError(f"padding {old_h}/{old_kv} -> {heads}/{kv_heads} heads must keep query heads per kv head")
    for layer in model.model.layers:
        a = layer.self_attn
        for lin, n_old, n_new in ((a.q_proj, old_h, heads), (a.k_proj, old_kv, kv_heads), (a.v_proj, old_kv, kv_heads)):
            w = torch.zeros(n_new * d, lin.in_features, dtype=lin.weight.dtype)
            w[: n_old * d] = lin.weight
            lin.weight = torch.nn.Parameter(w)
            lin.out_features = n_new * d
        w = torch.zeros(a.o_proj.out_features, heads * d, dtype=a.o_proj.weight.dtype)
        w[:, : old_h * d] = a.o_proj.weight
        a.o_proj.weight = torch.nn.Parameter(w)
        a.o_proj.in_features = heads * d
        a.num_key_value_groups = heads // kv_heads
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = heads, kv_heads, d
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


@torch.no_grad()
def padding_error(src: str, padded: Path, prompts: list[list[int]]) -> float:
    """Max |logit difference| between the unpadded and padded model (fp32, transformers)."""
    from transformers import AutoModelForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ids = torch.tensor(prompts[:4], device=dev)
    logits = []
    for path in (src, padded):
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
        logits.append(m(ids).logits.float())
        del m
    return (logits[0] - logits[1]).abs().max().item()


LAYERS = (0, 15, 29)  # decoder layers whose loaded int8 shards are compared


def linear_shards(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """This rank's loaded quantized tensors of the linears in ``LAYERS``, weights as ``[out, in]``.

    Runs inside each vLLM worker (``LLM.apply_model``); the kernel may store the weight transposed.
    """
    from vllm.model_executor.layers.linear import LinearBase

    keep = tuple(f"layers.{i}." for i in LAYERS)
    out = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)  # vLLM's CPU (oneDNN) kernel packs it away: nothing to compare there
        if not isinstance(m, LinearBase) or not any(k in name for k in keep) or w is None or w.dtype != torch.int8:
            continue
        if w.shape[0] != m.output_size_per_partition or w.shape[1] != m.input_size_per_partition:
            w = w.t()
        out[name] = {"weight": w.contiguous().cpu(), "weight_scale": m.weight_scale.detach().flatten().cpu()}
        if getattr(m, "input_scale", None) is not None:
            out[name]["input_scale"] = m.input_scale.detach().flatten().cpu()
    return out


def shard_check(tp1: dict, ranks: list[dict], heads: int, kv_heads: int, head_dim: int) -> dict:
    """Do the TP ranks hold exactly the slices of the TP=1 tensors that vLLM's sharding prescribes?

    Column-parallel (qkv_proj: [q | k | v] per rank, gate_up_proj: [gate | up] per rank) split output
    rows and their scales; row-parallel (o_proj, down_proj) split input columns and keep all scales.
    """
    n = len(ranks)
    checked, mismatched = 0, []
    for name, full in tp1.items():
        w = full["weight"]
        for r, shard in enumerate(ranks):
            if name.endswith(("o_proj", "down_proj")):
                cols = w.shape[1] // n
                want = {"weight": w[:, r * cols:(r + 1) * cols], "weight_scale": full["weight_scale"]}
            else:
                if name.endswith("qkv_proj"):
                    q, kv = heads * head_dim, kv_heads * head_dim
                    parts = [(0, q), (q, kv), (q + kv, kv)]
                else:  # gate_up_proj: [gate | up]
                    half = w.shape[0] // 2
                    parts = [(0, half), (half, half)]
                rows = torch.cat([torch.arange(o + r * size // n, o + (r + 1) * size // n) for o, size in parts])
                want = {"weight": w[rows], "weight_scale": full["weight_scale"][rows]}
            if "input_scale" in full:
                want["input_scale"] = full["input_scale"]
            for key, t in want.items():
                checked += 1
                if key not in shard[name] or not torch.equal(shard[name][key], t):
                    mismatched.append(f"rank{r}:{name}.{key}")
    return {"tensors_compared": checked, "bit_identical": checked > 0 and not mismatched, "mismatched": mismatched[:10],
            "layers": list(LAYERS)}


def generate(model: str, prompts: list[list[int]], tp: int, quantization: str | None, new_tokens: int, eager: bool,
             max_num_seqs: int):
    """Greedy tokens, prompt logprobs and (quantized models) every rank's ``linear_shards``."""
    llm = make_llm(model, quantization, tensor_parallel_size=tp, max_model_len=1024, enforce_eager=eager,
                   max_num_seqs=max_num_seqs)
    outs = greedy(llm, prompts, new_tokens, prompt_logprobs=True)
    tokens = [g.token_ids for g in outs]
    lps = torch.tensor([g.prompt_logprobs for g in outs])
    # by module name, not __main__: the workers unpickle it by importing benchmarks/tp_check.py
    shards = llm.apply_model(importlib.import_module("tp_check").linear_shards) if quantization else None
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return tokens, lps, shards


def compare(a, b) -> dict:
    """Greedy agreement and prompt-logprob difference of two runs (tokens, logprobs)."""
    (t1, l1, _), (t2, l2, _) = a, b
    first_diff = [next((i for i, (p, q) in enumerate(zip(u, v)) if p != q), None) for u, v in zip(t1, t2)]
    return {"greedy_sequences_equal": f"{sum(u == v for u, v in zip(t1, t2))}/{len(t1)}",
            "greedy_tokens_equal": f"{sum(p == q for u, v in zip(t1, t2) for p, q in zip(u, v))}/{sum(map(len, t1))}",
            "first_divergence_position": first_diff,
            "mean_abs_prompt_logprob_diff": (l1 - l2).abs().mean().item(),
            "max_abs_prompt_logprob_diff": (l1 - l2).abs().max().item()}


PAIRS = {  # what the record compares: (run, run)
    "sq_tp2_vs_sq_tp1": ("sq_tp2", "sq_tp1"),
    "sq_tp2_vs_stock_w8a8_tp2": ("sq_tp2", "stock_w8a8_tp2"),
    "sq_static_tp2_vs_sq_static_tp1": ("sq_static_tp2", "sq_static_tp1"),
    "fp_tp2_vs_fp_tp1": ("fp_tp2", "fp_tp1"),
    "sq_tp1_vs_fp_tp1": ("sq_tp1", "fp_tp1"),
}


HEADS, KV_HEADS, HEAD_DIM = 12, 4, 64  # SmolLM2-135M padded (576 = 9 x 64)


def main() -> int:
    from transformers import AutoTokenizer

    from vllm_smoothquant.offline import assets
    from vllm_smoothquant.offline.calibration import token_windows

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--compile", action="store_true", help="vLLM defaults (torch.compile + CUDA graphs) instead of eager")
    p.add_argument("--max-num-seqs", type=int, default=1,
                   help="1 (default): every decode step has batch 1 in every engine, so runs differ only by TP and "
                        "quantization, not by how the scheduler happened to batch requests")
    p.add_argument("--no-static", action="store_true", help="skip the static-activation pair")
    p.add_argument("--skip", default="", help="comma-separated runs to leave out, e.g. fp_tp1,fp_tp2")
    a = p.parse_args()
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # LLM.apply_model ships linear_shards
    work = Path(tempfile.mkdtemp(prefix="sq-tp-"))
    src = str(assets.smollm2_dir())
    tok = AutoTokenizer.from_pretrained(src)
    prompts = token_windows(assets.heldout_text(), tok, a.prompts, a.prompt_len)
    padded = pad_heads(src, work / "padded", heads=HEADS, kv_heads=KV_HEADS)
    record = {
        **provenance(), "command": " ".join(sys.argv),
        "model": "SmolLM2-135M-Instruct padded to 12 q / 4 kv heads", "enforce_eager": not a.compile,
        "prompts": len(prompts), "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "max_num_seqs": a.max_num_seqs,
        "padded_vs_unpadded_max_abs_logit_diff_fp32": padding_error(src, padded, prompts),
    }
    base = [CLI, "quantize", str(padded), "--calib", str(assets.calibration_text()), "--num-samples", "32",
            "--device", "cuda"]
    sq, sq_static, ct = work / "sq", work / "sq-static", work / "ct"
    for out, extra in ((sq, []), (sq_static, ["--activations", "static"]))[: 1 if a.no_static else 2]:
        cmd = base[:3] + [str(out)] + base[3:] + extra
        subprocess.run(cmd, check=True)
        record[f"quantize_command_{out.name}"] = " ".join(["vllm-smoothquant", *cmd[1:]])
    subprocess.run([CLI, "convert", str(sq), str(ct)], check=True)

    runs = {
        "fp_tp1": (str(padded), 1, None), "fp_tp2": (str(padded), 2, None),
        "sq_tp1": (str(sq), 1, "smoothquant"), "sq_tp2": (str(sq), 2, "smoothquant"),
        "stock_w8a8_tp2": (str(ct), 2, None),
    }
    if not a.no_static:
        runs |= {"sq_static_tp1": (str(sq_static), 1, "smoothquant"), "sq_static_tp2": (str(sq_static), 2, "smoothquant")}
    runs = {k: v for k, v in runs.items() if k not in a.skip.split(",")}
    res, record["engine_seconds"] = {}, {}
    for name, (model, tp, quant) in runs.items():
        t0 = time.perf_counter()
        res[name] = generate(model, prompts, tp, quant, a.new_tokens, not a.compile, a.max_num_seqs)
        record["engine_seconds"][name] = round(time.perf_counter() - t0, 1)
        for key, (x, y) in PAIRS.items():
            if x in res and y in res:
                record[key] = compare(res[x], res[y])
        for kind in ("sq", "sq_static"):
            if name == f"{kind}_tp2" and f"{kind}_tp1" in res:
                tp1_shards = res[f"{kind}_tp1"][2][0]
                record[f"{kind}_tp2_shards_vs_tp1"] = shard_check(tp1_shards, res[name][2], HEADS, KV_HEADS, HEAD_DIM)
        Path(a.out).write_text(json.dumps(record, indent=2))
        print(f"[tp_check] {name} done in {record['engine_seconds'][name]} s", flush=True)
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
