"""On CUDA: SmoothQuant plugin == stock vLLM W8A8 (compressed-tensors) on the same int8 weights, bit for bit
(greedy tokens and prompt logprobs, at TP=1 and TP=2), and the drift from the unquantized model is bounded.
vLLM defaults: torch.compile and CUDA graphs on; the plugin's defaults: the opt-in fused RMSNorm -> int8 kernel off
(it rounds on its own: ``test_cuda_fused_quant.py``).

Skipped where there is no CUDA. ``SQ_GPU_RECORD=FILE`` writes the measured numbers as JSON.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from engines import PROMPT_LEN, PROMPTS, run_engine

from vllm_smoothquant.offline import harness

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _report(record: dict, env: str) -> None:
    """Print the measured numbers, and write them as JSON to the file named by the environment variable ``env``."""
    print(json.dumps(record, indent=2))
    if path := os.environ.get(env):
        with open(path, "w") as f:
            json.dump(record, f, indent=2)


def _run(model_dir, quantization, prompts, tp: int = 1):
    r = run_engine(model_dir, quantization, prompts, tp)
    return r["tokens"], r["logprobs"], r["methods"]


def test_smoothquant_matches_stock_w8a8_and_stays_near_fp16(llama, prompts):
    base, sq, ct = llama
    sq_tok, sq_lp, sq_methods = _run(sq, "smoothquant", prompts)
    ct_tok, ct_lp, _ = _run(ct, None, prompts)
    fp_tok, fp_lp, _ = _run(base, None, prompts)

    assert set(sq_methods.values()) == {"SmoothQuantLinearMethod"}
    same_tokens = sum(a == b for a, b in zip(sq_tok, ct_tok))
    sq_vs_ct = (sq_lp - ct_lp).abs().max().item()
    drift = (sq_lp - fp_lp).abs().mean().item()
    record = {
        **harness.provenance(), "prompts": PROMPTS, "prompt_len": PROMPT_LEN,
        "greedy_sequences_equal_sq_vs_stock": f"{same_tokens}/{PROMPTS}",
        "max_abs_prompt_logprob_diff_sq_vs_stock": sq_vs_ct,
        "mean_abs_prompt_logprob_diff_sq_vs_fp16": drift,
        "greedy_sequences_equal_sq_vs_fp16": f"{sum(a == b for a, b in zip(sq_tok, fp_tok))}/{PROMPTS}",
    }
    _report(record, "SQ_GPU_RECORD")
    assert same_tokens == PROMPTS
    assert torch.equal(sq_lp, ct_lp), sq_vs_ct  # bit-identical, as docs/TESTING.md says
    assert drift < 0.1


def test_rotated_checkpoint_matches_stock_transforms_and_eager(llama_rotated, prompts):
    """down_proj's input rotated: the plugin (hadacore in place, no copy under torch.compile) is bit-identical to
    stock vLLM serving `convert`'s transform_config (hadacore, then the same int8 kernels), and compiled + CUDA
    graphs agree with eager (the copy path) up to the compiled graph's other fusions."""
    base, sq, ct = llama_rotated
    sq_tok, sq_lp, sq_methods = _run(sq, "smoothquant", prompts)
    ct_tok, ct_lp, ct_methods = _run(ct, None, prompts)
    eager = run_engine(sq, "smoothquant", prompts, enforce_eager=True)
    _, fp_lp, _ = _run(base, None, prompts)
    record = {
        **harness.provenance(), "prompts": PROMPTS, "prompt_len": PROMPT_LEN,
        "stock_down_proj_method": next(m for n, m in ct_methods.items() if n.endswith("down_proj")),
        "greedy_sequences_equal_sq_vs_stock": f"{sum(a == b for a, b in zip(sq_tok, ct_tok))}/{PROMPTS}",
        "max_abs_prompt_logprob_diff_sq_vs_stock": (sq_lp - ct_lp).abs().max().item(),
        "max_abs_prompt_logprob_diff_compiled_vs_eager": (sq_lp - eager["logprobs"]).abs().max().item(),
        "mean_abs_prompt_logprob_diff_sq_vs_fp16": (sq_lp - fp_lp).abs().mean().item(),
    }
    _report(record, "SQ_GPU_ROT_RECORD")
    assert set(sq_methods.values()) == {"SmoothQuantLinearMethod"}
    assert record["stock_down_proj_method"] == "CompressedTensorsLinearTransformMethod"
    assert sq_tok == ct_tok and torch.equal(sq_lp, ct_lp), record
    assert record["max_abs_prompt_logprob_diff_compiled_vs_eager"] < 0.05, record
    assert record["mean_abs_prompt_logprob_diff_sq_vs_fp16"] < 0.1, record


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tensor_parallel_2(llama, prompts):
    """TP=2 shards with vLLM's own loaders: bit-identical to stock W8A8 (compressed-tensors) at TP=2, tokens
    and prompt logprobs.

    Row-parallel layers (o_proj, down_proj) quantize each rank's input shard with its own per-token
    scale, so W8A8 at TP=2 is not bit-identical to TP=1 (stock's neither); logprobs stay close.
    """
    _, sq, ct = llama
    tok1, lp1, _ = _run(sq, "smoothquant", prompts, tp=1)
    tok2, lp2, methods = _run(sq, "smoothquant", prompts, tp=2)
    ct_tok2, ct_lp2, _ = _run(ct, None, prompts, tp=2)
    record = {
        **harness.provenance(), "tensor_parallel_size": 2,
        "greedy_equal_sq_tp2_vs_tp1": f"{sum(a == b for a, b in zip(tok1, tok2))}/{PROMPTS}",
        "max_abs_prompt_logprob_diff_sq_tp2_vs_tp1": (lp1 - lp2).abs().max().item(),
        "mean_abs_prompt_logprob_diff_sq_tp2_vs_tp1": (lp1 - lp2).abs().mean().item(),
        "greedy_equal_sq_tp2_vs_stock_tp2": f"{sum(a == b for a, b in zip(tok2, ct_tok2))}/{PROMPTS}",
        "max_abs_prompt_logprob_diff_sq_tp2_vs_stock_tp2": (lp2 - ct_lp2).abs().max().item(),
    }
    _report(record, "SQ_TP_RECORD")
    assert set(methods.values()) == {"SmoothQuantLinearMethod"}
    assert tok2 == ct_tok2
    assert torch.equal(lp2, ct_lp2), (lp2 - ct_lp2).abs().max().item()  # bit-identical, as docs/TESTING.md says
    assert (lp1 - lp2).abs().mean().item() < 0.1
