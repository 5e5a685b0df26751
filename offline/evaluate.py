"""Perplexity through vLLM: prompt logprobs of held-out windows, computed by the real engine
(the int8 kernels when the model is quantized)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .harness import progress_bar, prompt_logprobs


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token
    tokens: int  # predicted tokens (each window's first token is context only)


def perplexity(llm, windows: list[list[int]], batch: int = 16, progress: bool = True) -> Perplexity:
    """Perplexity of ``llm`` (a ``vllm.LLM``) over token windows, ``batch`` windows per ``generate`` call;
    ``progress`` shows one bar that advances as each window is done."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        last = i + batch >= len(windows)
        bar = progress_bar("perplexity", "window", len(windows), i, leave=last) if progress else None
        for lps in prompt_logprobs(llm, windows[i : i + batch], progress=bar):
            total -= sum(lps)
            count += len(lps)
    nll = total / count
    return Perplexity(ppl=math.exp(nll), nll=nll, tokens=count)
