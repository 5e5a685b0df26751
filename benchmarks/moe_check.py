"""Mixtures of experts in a real vLLM engine: are the experts int8 W8A8, and do they compute what they should?

    python benchmarks/moe_check.py prepare --dir DIR                    # CPU: models, checkpoints, fp32 references
    python benchmarks/moe_check.py check --dir DIR --out RESULT.json [--dtype bfloat16] [--eager]   # GPU (or CPU)

``prepare`` builds, for each tiny MoE family of tests/tiny_models.py (Mixtral, Qwen3-MoE, Qwen2-MoE: 2 layers, 4
experts, top-2, hidden 128, bf16, injected outlier channels), the model and its SmoothQuant checkpoint made by the
CLI exactly as tests/integration/test_engine_moe.py makes it, and the fp32 prompt logprobs and greedy first tokens of
fixed prompts (8 x 48 random token ids, seed 0) under two references: the checkpoint's fake-quant model and the
unquantized model (transformers). The reference math lives in tests/ (reference.py, tiny_models.py), imported by
putting that directory on sys.path, so ``prepare`` needs the repository checkout; ``check`` needs only DIR (about
7 MB: models, checkpoints, reference.json) and the installed package.

``check`` serves each family's unquantized model and SmoothQuant checkpoint through vLLM (the project's harness, one
engine at a time), records every MoE experts layer's quant method and, as proof that expert activations are int8,
its fused-MoE quant config (``quant_dtype``, ``per_act_token_quant``) and kernel class, or the int8 linear kernel of
the per-expert path, plus every linear layer's quant method, and compares prompt logprobs: SmoothQuant engine vs the
fake-quant reference (the engine's error), unquantized engine vs the fp32 reference (the dtype's own noise), and
SmoothQuant vs unquantized engine (the quantization drift, next to the same drift in the exact references). The JSON
is rewritten after every family. Exit status 1 when an experts layer is not a SmoothQuant MoE method or its quant
config is not int8 with per-token activations. On CUDA use bfloat16: vLLM's CUTLASS int8 GEMM writes bf16/fp16 only.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from vllm_smoothquant.offline import harness

TESTS = Path(__file__).resolve().parents[1] / "tests"
MOE_METHODS = {"SmoothQuantMoEMethod", "SmoothQuantExpertLoopMoEMethod"}
PROMPTS, PROMPT_LEN = 8, 48


# ---------------------------------------------------------------- prepare (CPU, fp32 references)
@torch.no_grad()
def reference(model, prompts: list[list[int]]) -> dict:
    """fp32 prompt logprobs (tests/reference.py) and greedy first token of every prompt through an HF ``model``."""
    from reference import prompt_logprobs

    return {"prompt_logprobs": [prompt_logprobs(model, p).tolist() for p in prompts],
            "first_token": [int(model(torch.tensor([p])).logits[0, -1].argmax()) for p in prompts]}


def prepare(d: Path) -> None:
    sys.path.insert(0, str(TESTS))
    from reference import load_fake_quant_model
    from tiny_models import MOE_ARCHS, calib_text, save_tiny
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    d.mkdir(parents=True, exist_ok=True)
    cli = str(Path(sys.executable).with_name("vllm-smoothquant"))
    calib = calib_text(d / "calib.txt")
    prompts = torch.randint(3, 512, (PROMPTS, PROMPT_LEN), generator=torch.Generator().manual_seed(0)).tolist()
    record = {"prompts": prompts, "families": {}}
    for arch in MOE_ARCHS:
        t0 = time.perf_counter()
        model = save_tiny(arch, d / arch / "model", hidden=128)
        cmd = [cli, "quantize", str(model), str(d / arch / "sq"), "--calib", str(calib), "--num-samples", "8",
               "--seq-len", "64"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
        fp = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        record["families"][arch] = {
            "model": f"{arch}/model", "checkpoint": f"{arch}/sq",
            "quantize_command": " ".join(["vllm-smoothquant", *cmd[1:]]).replace(str(d), "DIR"),
            "fake_quant_reference": reference(load_fake_quant_model(d / arch / "sq"), prompts),
            "fp32_reference": reference(fp, prompts),
        }
        print(f"[moe_check] {arch}: prepared in {time.perf_counter() - t0:.1f} s", flush=True)
    (d / "reference.json").write_text(json.dumps(record))
    size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    print(f"[moe_check] {d}: {size / 2**20:.1f} MiB")


# ---------------------------------------------------------------- check (vLLM engines)
def _quant_config(cfg) -> dict | None:
    """The int8 evidence of a ``FusedMoEQuantConfig``: what vLLM's fused-MoE kernel quantizes activations to."""
    if cfg is None:
        return None
    # per_out_ch_quant is left out: vLLM's int8 configs set it False, and its Triton int8 kernel takes per-channel
    # weight scales whenever per_act_token_quant is set (its one ``per_channel_quant`` flag)
    keys = ("quant_dtype", "weight_quant_dtype", "per_act_token_quant", "use_int8_w8a8", "use_int8_w8a16")
    return {k: v if isinstance(v, bool) else str(v) for k in keys if (v := getattr(cfg, k, None)) is not None}


def layer_methods(model: torch.nn.Module) -> dict:
    """Every MoE experts layer's quant method and its int8 evidence, and every linear's quant method.

    Runs inside the engine process (``LLM.apply_model``). Attribute names are vLLM's (0.26 and 0.32 alike), all read
    with getattr: ``moe_quant_config`` (set after loading), ``moe_kernel.fused_experts`` (the experts kernel) and its
    own ``quant_config``; the per-expert path (no int8 MoE kernel on this device) has ``experts``: per expert
    ((kernel, holder) for w13, (kernel, holder) for w2) of vLLM's int8 linear kernel.
    """
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    from vllm_smoothquant.linear_method import quant_methods

    moe = {}
    for name, m in model.named_modules():
        if not isinstance(m, RoutedExperts):
            continue
        method = m.quant_method
        inner = getattr(method, "old_quant_method", method)  # vLLM's FusedMoEModularMethod wraps the method
        experts = getattr(getattr(inner, "moe_kernel", None), "fused_experts", None)
        loop = getattr(inner, "experts", None)
        moe[name] = {
            "method": type(inner).__name__, "wrapper": type(method).__name__ if inner is not method else None,
            "int8_backend": getattr(getattr(inner, "int8_backend", None), "value", None),
            "w13_weight_dtype": str(getattr(getattr(m, "w13_weight", None), "dtype", None)),
            "moe_quant_config": _quant_config(getattr(inner, "moe_quant_config", None)),
            "kernel": type(experts).__name__ if experts is not None else None,
            "kernel_quant_config": _quant_config(getattr(experts, "quant_config", None)),
            "expert_linear_kernel": type(loop[0][0][0]).__name__ if isinstance(loop, list) and loop else None,
        }
    return {"moe": moe, "linear": quant_methods(model)}


def int8_problems(moe: dict) -> list[str]:
    """Why the MoE layers are not SmoothQuant int8 W8A8 with per-token activations; empty when they are."""
    problems = [] if moe else ["no MoE experts layer"]
    for name, r in moe.items():
        if r["method"] not in MOE_METHODS:
            problems.append(f"{name}: {r['method']} is not a SmoothQuant MoE method")
        configs = [c for c in (r["moe_quant_config"], r["kernel_quant_config"]) if c]
        for c in configs:
            if c.get("quant_dtype") != "torch.int8" or c.get("per_act_token_quant") is False:
                problems.append(f"{name}: activations not int8 per token: {c}")
        if not configs and not r["expert_linear_kernel"]:
            problems.append(f"{name}: neither a fused-MoE quant config nor int8 linear kernels to show int8")
    return problems


def serve(model: Path, quantization: str | None, prompts: list[list[int]], log: Path, engine: dict) -> dict:
    """Prompt logprobs, greedy first tokens and layer methods of one engine, deleted afterwards."""
    t0 = time.perf_counter()
    llm = harness.make_llm(str(model), quantization, log=log, **engine)
    gens = harness.greedy(llm, prompts, 1, prompt_logprobs=True)
    # by module name, not __main__: the engine process unpickles it by importing benchmarks/moe_check.py
    methods = llm.apply_model(importlib.import_module("moe_check").layer_methods)[0]
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return {"prompt_logprobs": [g.prompt_logprobs for g in gens], "first_token": [g.token_ids[0] for g in gens],
            "methods": methods, "seconds": round(time.perf_counter() - t0, 1)}


def compare(a: dict, b: dict) -> dict:
    """|Δ prompt logprob| mean / max and greedy first-token agreement of two runs."""
    diff = (torch.tensor(a["prompt_logprobs"]) - torch.tensor(b["prompt_logprobs"])).abs()
    same = sum(x == y for x, y in zip(a["first_token"], b["first_token"]))
    return {"mean_abs_logprob_diff": diff.mean().item(), "max_abs_logprob_diff": diff.max().item(),
            "first_token_agreement": f"{same}/{len(a['first_token'])}"}


PAIRS = {  # what the record compares: (run, run); "ref" runs are fp32 transformers, the others vLLM engines
    "sq_vs_fake_quant_ref": ("sq", "fake_quant_reference"),
    "fp_vs_fp32_ref": ("fp", "fp32_reference"),
    "sq_vs_fp": ("sq", "fp"),
    "fake_quant_ref_vs_fp32_ref": ("fake_quant_reference", "fp32_reference"),
}


def check(a: argparse.Namespace) -> int:
    log = harness.quiet_vllm("moe-check")  # before vLLM is imported
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # LLM.apply_model ships layer_methods
    ref = json.loads((a.dir / "reference.json").read_text())
    engine = dict(dtype=a.dtype, max_model_len=256, gpu_memory_utilization=a.gpu_memory_utilization,
                  enable_prefix_caching=False, seed=0) | ({"enforce_eager": True} if a.eager else {})
    record = {**harness.provenance(), "command": " ".join(sys.argv), "dtype": a.dtype, "enforce_eager": a.eager,
              "engine_args": engine, "prompts": f"{len(ref['prompts'])} x {len(ref['prompts'][0])} token ids",
              "vllm_log": str(log), "families": {}}
    problems = []
    for arch, fam in ref["families"].items():
        runs = {k: fam[k] for k in ("fake_quant_reference", "fp32_reference")}
        runs["fp"] = serve(a.dir / fam["model"], None, ref["prompts"], log, engine)
        runs["sq"] = serve(a.dir / fam["checkpoint"], "smoothquant", ref["prompts"], log, engine)
        fam_problems = [f"{arch}: {p}" for p in int8_problems(runs["sq"]["methods"]["moe"])]
        linear = runs["sq"]["methods"]["linear"]
        record["families"][arch] = {
            "ok": not fam_problems, "problems": fam_problems, "moe_layers": runs["sq"]["methods"]["moe"],
            "linear_methods": {m: sorted(n for n, v in linear.items() if v == m) for m in sorted(set(linear.values()))},
            "unquantized_moe_methods": sorted(set(r["method"] for r in runs["fp"]["methods"]["moe"].values())),
            **{k: compare(runs[x], runs[y]) for k, (x, y) in PAIRS.items()},
            "engine_seconds": {k: runs[k]["seconds"] for k in ("fp", "sq")},
        }
        problems += fam_problems
        record["ok"] = not problems
        Path(a.out).write_text(json.dumps(record, indent=2))
        print(f"[moe_check] {arch} done ({runs['fp']['seconds']} + {runs['sq']['seconds']} s)", flush=True)

    print(f"\n{'family':<22}{'MoE method / kernel':<62}" + "".join(f"{k:>28}" for k in PAIRS))
    for arch, r in record["families"].items():
        layer = next(iter(r["moe_layers"].values()), {})
        kernel = f"{layer.get('method')} / {layer.get('kernel') or layer.get('expert_linear_kernel')}"
        cells = "".join(f"{r[k]['mean_abs_logprob_diff']:.4f} {r[k]['max_abs_logprob_diff']:.4f} "
                        f"{r[k]['first_token_agreement']:>5}".rjust(28) for k in PAIRS)
        print(f"{arch:<22}{kernel:<62}{cells}")
    print("(each pair: |Δ prompt logprob| mean, max, greedy first-token agreement)")
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    print(f"[moe_check] {'OK' if not problems else 'FAILED'}; record: {a.out}")
    return 1 if problems else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare", help="CPU: tiny MoE models, SmoothQuant checkpoints, fp32 references").add_argument(
        "--dir", type=Path, required=True)
    c = sub.add_parser("check", help="serve them through vLLM and compare with the references")
    c.add_argument("--dir", type=Path, required=True, help="what `prepare` wrote")
    c.add_argument("--out", required=True, help="the JSON record")
    c.add_argument("--dtype", default="bfloat16", help="engine dtype (CUDA: bfloat16 or float16; CPU: float32 too)")
    c.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile / CUDA graphs)")
    c.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    a = p.parse_args()
    if a.cmd == "prepare":
        prepare(a.dir)
        return 0
    return check(a)


if __name__ == "__main__":
    sys.exit(main())
