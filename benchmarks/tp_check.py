"""Tensor parallel on real weights: SmoothQuant TP=2 vs TP=1 greedy output (2 GPUs).

    python benchmarks/tp_check.py --out docs/gpu-tp2-real-<device>-<date>.json

SmolLM2-135M has 9 query / 3 kv heads, which 2 GPUs cannot split. The script pads it, exactly, to
12 query / 4 kv heads: the new heads have zero q/k/v rows and zero o_proj columns, so they add
nothing to the residual stream (same function; the unpadded vs padded FP greedy output is recorded
too). It then quantizes the padded model with SmoothQuant (default options), converts it to
compressed-tensors, and compares greedy continuations of held-out text at TP=1 and TP=2.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CLI = str(Path(sys.executable).with_name("vllm-smoothquant"))


@torch.no_grad()
def pad_heads(src: str, dst: Path, heads: int, kv_heads: int) -> Path:
    """Copy of a Llama model with ``heads``/``kv_heads`` attention heads; added heads are zero."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    old_h, old_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if (heads // kv_heads) != (old_h // old_kv):
        raise ValueError("padding must keep the number of query heads per kv head")
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
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = heads, kv_heads, d
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def generate(model: str, prompts: list[list[int]], tp: int, quantization: str | None, new_tokens: int):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, quantization=quantization, tensor_parallel_size=tp, max_model_len=1024,
              gpu_memory_utilization=0.3, enable_prefix_caching=False, seed=0)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, prompt_logprobs=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    lps = torch.tensor([[o.prompt_logprobs[t][p[t]].logprob for t in range(1, len(p))] for o, p in zip(outs, prompts)])
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return tokens, lps


def main() -> int:
    import vllm
    from transformers import AutoTokenizer

    from vllm_smoothquant.offline import assets
    from vllm_smoothquant.offline.calibration import token_windows

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sq-tp-"))
    src = str(assets.smollm2_dir())
    padded = pad_heads(src, work / "padded", heads=12, kv_heads=4)
    sq, ct = work / "sq", work / "ct"
    qcmd = [CLI, "quantize", str(padded), str(sq), "--calib", str(assets.calibration_text()), "--num-samples", "32",
            "--device", "cuda"]
    subprocess.run(qcmd, check=True)
    subprocess.run([CLI, "convert", str(sq), str(ct)], check=True)
    tok = AutoTokenizer.from_pretrained(src)
    prompts = token_windows(assets.heldout_text(), tok, a.prompts, a.prompt_len)

    runs = {
        "fp_unpadded_tp1": (src, 1, None), "fp_padded_tp1": (str(padded), 1, None),
        "sq_tp1": (str(sq), 1, "smoothquant"), "sq_tp2": (str(sq), 2, "smoothquant"), "stock_w8a8_tp2": (str(ct), 2, None),
    }
    res = {k: generate(m, prompts, tp, q, a.new_tokens) for k, (m, tp, q) in runs.items()}

    def cmp(x, y):
        (t1, l1), (t2, l2) = res[x], res[y]
        return {"greedy_sequences_equal": f"{sum(u == v for u, v in zip(t1, t2))}/{len(prompts)}",
                "greedy_tokens_equal": f"{sum(p == q for u, v in zip(t1, t2) for p, q in zip(u, v))}/{sum(map(len, t1))}",
                "mean_abs_prompt_logprob_diff": (l1 - l2).abs().mean().item(),
                "max_abs_prompt_logprob_diff": (l1 - l2).abs().max().item()}

    record = {
        "device": f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}", "vllm": vllm.__version__,
        "torch": torch.__version__, "date": datetime.date.today().isoformat(),
        "model": "SmolLM2-135M-Instruct padded to 12 q / 4 kv heads (exact)", "quantize_command": " ".join(qcmd[1:]),
        "prompts": len(prompts), "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
        "padded_vs_unpadded_fp": cmp("fp_padded_tp1", "fp_unpadded_tp1"),
        "sq_tp2_vs_sq_tp1": cmp("sq_tp2", "sq_tp1"),
        "sq_tp2_vs_stock_w8a8_tp2": cmp("sq_tp2", "stock_w8a8_tp2"),
        "sq_tp1_vs_fp_tp1": cmp("sq_tp1", "fp_padded_tp1"),
    }
    print(json.dumps(record, indent=2))
    Path(a.out).write_text(json.dumps(record, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
