"""Perplexity through vLLM: prompt logprobs of held-out windows, computed by the real engine
(the int8 kernels when the model is quantized)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tqdm.auto import tqdm


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token
    tokens: int  # predicted tokens (each window's first token is context only)


def prompt_logprobs(llm, windows: list[list[int]]) -> list[list[float]]:
    """Log p(token_t | tokens_<t) for t >= 1 of every window, through ``llm`` (a ``vllm.LLM``)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, use_tqdm=False)
    result = []
    for w, o in zip(windows, outs):
        result.append([o.prompt_logprobs[t][w[t]].logprob for t in range(1, len(w))])
    return result


def perplexity(llm, windows: list[list[int]], batch: int = 16) -> Perplexity:
    total, count = 0.0, 0
    for i in tqdm(range(0, len(windows), batch), desc="perplexity", unit="batch"):
        for lps in prompt_logprobs(llm, windows[i : i + batch]):
            total -= sum(lps)
            count += len(lps)
    nll = total / count
    return Perplexity(ppl=math.exp(nll), nll=nll, tokens=count)


def device_name() -> str:
    """What results files record as ``device``: the GPU's name, or the CPU architecture and thread count."""
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def make_llm(model: str, quantization: str | None = None, **kwargs):
    """A ``vllm.LLM`` with settings that suit evaluation on CPU and GPU alike."""
    import torch
    from vllm import LLM

    cpu = not torch.cuda.is_available()
    defaults = dict(
        # CPU: skip torch.compile warm-up (minutes per new model on 2 cores) and compute in fp32
        # (bf16 is emulated, ~2x slower, on CPUs without AVX512-BF16/AMX); CUDA: vLLM's defaults.
        enforce_eager=cpu,
        dtype="float32" if cpu else "auto",
        quantization=quantization,
        max_model_len=2048,
        enable_prefix_caching=False,  # every prompt logprob is computed, none served from cache
        gpu_memory_utilization=0.3,
        seed=0,
    )
    return LLM(model=model, **(defaults | kwargs))
