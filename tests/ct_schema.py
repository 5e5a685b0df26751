"""compressed-tensors ``quantization_config`` in llm-compressor's exact schema, and checkpoints that carry it.

What llm-compressor's ``W8A8`` preset (``QuantizationModifier`` / ``GPTQModifier(scheme="W8A8")``, with or without
``SmoothQuantModifier``) saves in config.json (compressed-tensors 0.12: every argument key written, the group's own
``format``, empty ``sparsity_config`` / ``transform_config``); static activations are the ``W8A8`` preset with
``input_activations: {strategy: tensor, dynamic: false}``; its MoE examples add ``re:.*mlp.gate$`` (Qwen3-MoE) /
``re:.*block_sparse_moe.gate$`` (Mixtral) to ``ignore``. Written by hand here, so the CI needs no llm-compressor (it
needs its own venv); what llm-compressor 0.14.0.1 itself wrote is in ``tests/data/``
(``benchmarks/llmc_serve_check.py``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def _args(strategy: str, dynamic: bool, observer: str | None, type_: str = "int") -> dict:
    return {"actorder": None, "block_structure": None, "dynamic": dynamic, "group_size": None, "num_bits": 8,
            "observer": observer, "observer_kwargs": {}, "scale_dtype": None, "strategy": strategy,
            "symmetric": True, "type": type_, "zp_dtype": None}


def llmcompressor_w8a8(ignore=("lm_head",), static: bool = False, weights: str = "channel",
                       kv_cache: str | None = None) -> dict:
    """The ``quantization_config`` llm-compressor writes for W8A8 int8 (``kv_cache``: "tensor" / "attn_head" for
    its ``kv_cache_scheme``)."""
    activations = _args("tensor", False, "minmax") if static else _args("token", True, None)
    return {
        "config_groups": {"group_0": {"format": "int-quantized", "input_activations": activations,
                                      "output_activations": None, "targets": ["Linear"],
                                      "weights": _args(weights, False, "minmax")}},
        "format": "int-quantized",
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None if kv_cache is None else _args(kv_cache, False, "minmax", "float"),
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.12.2",
    }


def with_quantization_config(src: Path, dst: Path, quantization_config: dict) -> Path:
    """A copy of checkpoint ``src`` whose config.json carries ``quantization_config`` (tensors unchanged)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
