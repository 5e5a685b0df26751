"""One CUDA engine run -> tokens, logprobs, quant methods, RMSNorm -> int8 fusions (shared by the GPU tests)."""

from __future__ import annotations

import gc

import torch

from vllm_smoothquant.offline import harness

PROMPTS = 8
PROMPT_LEN = 64
NEW_TOKENS = 16


def run_engine(model_dir, quantization, prompts, tp: int = 1, **engine_args) -> dict:
    """Greedy tokens + prompt logprobs of ``prompts`` under vLLM's defaults (torch.compile, CUDA graphs), and
    each linear's quant method and the fusion pass's state on rank 0 (``fused_quant.fusion_stats``)."""
    from vllm_smoothquant.fused_quant import fusion_stats
    from vllm_smoothquant.linear_method import quant_methods

    llm = harness.make_llm(str(model_dir), quantization, max_model_len=512, gpu_memory_utilization=0.25,
                           tensor_parallel_size=tp, **engine_args)
    outs = harness.greedy(llm, prompts, NEW_TOKENS, prompt_logprobs=True)
    run = {
        "tokens": [g.token_ids for g in outs],
        "logprobs": torch.tensor([g.prompt_logprobs for g in outs]),
        "methods": llm.apply_model(quant_methods)[0],
        "fusion": llm.apply_model(fusion_stats)[0],
    }
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return run
