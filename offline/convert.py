"""Convert a SmoothQuant checkpoint to compressed-tensors W8A8-int8, so stock vLLM loads it too.

The tensors are already in compressed-tensors' layout (``weight`` int8, ``weight_scale``,
``input_scale``) with the smoothing folded in, so only config.json changes: its
``quantization_config`` is built with the compressed-tensors library's own schema. The
safetensors are hard-linked when source and destination share a filesystem, else copied.

Calibrated KV-cache scales (format 2's ``kv_cache``) become compressed-tensors' ``kv_cache_scheme``
(float 8-bit, symmetric, static; strategy ``tensor`` or ``attn_head``). Their tensors,
``<attention module>.k_scale`` / ``.v_scale``, already carry the names llm-compressor writes and stock vLLM
maps to its attention layer (``<attention module>.attn``), so stock vLLM's ``CompressedTensorsKVCacheMethod``
loads them and, with no ``--kv-cache-dtype``, picks an fp8 KV cache as the plugin does.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from vllm_smoothquant.format import FormatError, SmoothQuantFormat

from .export import STATS_DIR, atomic_dir
from .write_errors import writing


def compressed_tensors_config(fmt: SmoothQuantFormat, kv_heads_per_scale: int | None = None) -> dict:
    """The compressed-tensors ``quantization_config`` equivalent to ``fmt``. ``kv_heads_per_scale``: the
    number of values in the checkpoint's ``k_scale`` tensors; per-head scales of a model with one KV head
    (Falcon-7B's multi-query) are written as per tensor: stock vLLM counts Falcon's KV heads from
    ``num_key_value_heads``, which FalconConfig lacks, and would mis-slice ``attn_head`` scales."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    if fmt.activation_overrides:
        raise FormatError(
            f"this checkpoint has per-module activation overrides ({sorted(fmt.activation_overrides)}); "
            "`convert` writes one compressed-tensors scheme for all linears and cannot express them yet. "
            "Serve it with --quantization smoothquant, or re-quantize without --activation-override."
        )
    if fmt.rotation is not None:
        raise FormatError(
            f"this checkpoint rotates the input of {list(fmt.rotation.targets)} (format 3 'rotation', the default "
            "since vllm-smoothquant 2026-12-03); `convert` does not write compressed-tensors' transform_config yet, "
            "and without it stock vLLM would run the rotated weights on unrotated inputs (wrong outputs). Serve it "
            "with --quantization smoothquant, or re-quantize with --rotate none to convert."
        )
    static = not fmt.activations.dynamic
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, dynamic=False,
                                 strategy=fmt.weights.strategy),
        input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=True, dynamic=not static,
                                           strategy="tensor" if static else "token"),
    )
    kv_cache = None
    if fmt.kv_cache is not None:  # format.KV_CACHE_DTYPES is e4m3 only: compressed-tensors' float 8-bit
        per_head = fmt.kv_cache.strategy == "head" and kv_heads_per_scale != 1
        kv_cache = QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=False,
                                    strategy="attn_head" if per_head else "tensor")
    cfg = QuantizationConfig(
        config_groups={"group_0": scheme}, format="int-quantized", ignore=list(fmt.ignore),
        quantization_status="compressed", kv_cache_scheme=kv_cache,
    )
    return cfg.model_dump(exclude_none=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _k_scale_size(src: Path) -> int | None:
    """Values per ``*.k_scale`` tensor in the checkpoint's safetensors (headers only), None if there is none."""
    from safetensors import safe_open

    for f in sorted(src.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for name in st.keys():
                if name.endswith(".k_scale"):
                    return math.prod(st.get_slice(name).get_shape())
    return None


def to_compressed_tensors(src: str | Path, dst: str | Path, overwrite: bool = False) -> Path:
    src = Path(src)
    try:
        config = json.loads((src / "config.json").read_text())
    except FileNotFoundError:
        raise FormatError(f"{src} has no config.json: pass a SmoothQuant checkpoint directory.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{src / 'config.json'} is not valid JSON ({e}): re-create the checkpoint with "
                          "`vllm-smoothquant quantize`.") from None
    if "quantization_config" not in config:
        raise FormatError(f"{src / 'config.json'} has no quantization_config: not a SmoothQuant checkpoint.")
    fmt = SmoothQuantFormat.from_dict(config["quantization_config"])
    heads = _k_scale_size(src) if fmt.kv_cache is not None else None
    config["quantization_config"] = compressed_tensors_config(fmt, heads)
    with atomic_dir(Path(dst), overwrite) as tmp, writing(tmp):  # a full disk: one message, nothing left
        for f in src.iterdir():
            if f.is_file() and f.name != "config.json":
                _link_or_copy(f, tmp / f.name)
            elif f.is_dir() and f.name == STATS_DIR:
                shutil.copytree(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return Path(dst).resolve()
