"""Shared CUDA fixtures: tiny checkpoints quantized on the GPU, and the prompts."""

from __future__ import annotations

import pytest
import torch
from engines import PROMPT_LEN, PROMPTS


def _quantize(arch: str, root, rotate: str = "none", **kw):
    from tiny_models import calib_text, save_tiny

    from vllm_smoothquant.offline.pipeline import QuantizeOptions, quantize

    base = save_tiny(arch, root / f"{arch}-base", dtype=torch.float16, hidden=512, layers=4, heads=8, **kw)
    opts = QuantizeOptions(num_samples=16, seq_len=128, device="cuda", dtype="float16", rotate=rotate)
    return base, quantize(str(base), root / f"{arch}-sq", calib_text(root / "calib.txt"), opts).output


@pytest.fixture(scope="session")
def prompts():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 512, (PROMPTS, PROMPT_LEN), generator=g).tolist()


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    """(fp16 model, SmoothQuant checkpoint, the same int8 weights as compressed-tensors) of a tiny Llama."""
    from vllm_smoothquant.offline.convert import to_compressed_tensors

    root = tmp_path_factory.mktemp("llama")
    base, sq = _quantize("LlamaForCausalLM", root, kv_heads=4)
    return base, sq, to_compressed_tensors(sq, root / "ct")


@pytest.fixture(scope="session")
def llama_rotated(tmp_path_factory):
    """The same with down_proj's input rotated (the default), and its compressed-tensors conversion
    (transform_config: stock vLLM's hadacore path)."""
    from vllm_smoothquant.offline.convert import to_compressed_tensors

    root = tmp_path_factory.mktemp("llama-rot")
    base, sq = _quantize("LlamaForCausalLM", root, rotate="down_proj", kv_heads=4)
    return base, sq, to_compressed_tensors(sq, root / "ct")


@pytest.fixture(scope="session")
def opt(tmp_path_factory):
    """(fp16 model, SmoothQuant checkpoint) of a tiny OPT: LayerNorm with bias, ReLU."""
    return _quantize("OPTForCausalLM", tmp_path_factory.mktemp("opt"))
