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

A rotated checkpoint (format 3 ``rotation``: the MLP output projection's input rotated by blockdiag(H_b)) gets
compressed-tensors' ``transform_config``: one Hadamard scheme (named ``R4``, SpinQuant's name for this rotation)
with ``head_dim`` = the block, applied online to the targets' ``input`` and (already folded, as llm-compressor
records it) to their ``weight_input`` with ``inverse``. Stock vLLM builds a ``HadamardTransform`` module named
``R4_input`` under each target and loads its matrix from the checkpoint, so ``transforms.safetensors`` holds one
``<linear>.R4_input.weight`` per rotated linear: the unnormalized Sylvester matrix that compressed-tensors creates
(its 1/sqrt(b) is applied at run time). Stock vLLM runs it with ``hadacore_transform`` (CUDA only) and refuses
online transforms at tensor-parallel size > 1; the plugin has neither limit.
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
    ).model_dump(exclude_none=True)
    if fmt.rotation is not None:
        cfg["transform_config"] = transform_config(fmt).model_dump(mode="json")
    return cfg


TRANSFORM = "R4"  # the scheme's name; vLLM names the module under each target f"{TRANSFORM}_input"
TRANSFORMS_FILE = "transforms.safetensors"


def transform_config(fmt: SmoothQuantFormat):
    """compressed-tensors' ``TransformConfig`` for ``fmt.rotation``: x -> x blockdiag(H_b) online, W -> W H_b^-1
    folded (H_b symmetric and orthonormal: the same matrix)."""
    import re

    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    targets = [f"re:.*\\.{re.escape(t)}$" for t in fmt.rotation.targets]
    scheme = TransformScheme(type="hadamard", head_dim=fmt.rotation.block_size, apply=[
        TransformArgs(targets=targets, location="input"),
        TransformArgs(targets=targets, location="weight_input", inverse=True),
    ])
    return TransformConfig(config_groups={TRANSFORM: scheme})


def _transform_tensors(src: Path, fmt: SmoothQuantFormat) -> dict:
    """``<linear>.R4_input.weight`` for every rotated linear of the checkpoint (tensor names from the headers)."""
    import torch
    from compressed_tensors.transform import deterministic_hadamard_matrix
    from safetensors import safe_open

    b = fmt.rotation.block_size
    matrix = deterministic_hadamard_matrix(b, torch.float32)
    linears = set()
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            linears |= {n.removesuffix(".weight") for n in st.keys()
                        if n.endswith(".weight") and any(n.endswith(f".{t}.weight") for t in fmt.rotation.targets)}
    if not linears:
        raise FormatError(f"{src}: quantization_config['rotation'] targets {list(fmt.rotation.targets)}, but no "
                          "safetensors file holds such a weight; re-create the checkpoint with `vllm-smoothquant "
                          "quantize`.")
    return {f"{n}.{TRANSFORM}_input.weight": matrix.clone() for n in sorted(linears)}


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
    transforms = _transform_tensors(src, fmt) if fmt.rotation is not None else {}
    index = src / "model.safetensors.index.json"
    with atomic_dir(Path(dst), overwrite) as tmp, writing(tmp):  # a full disk: one message, nothing left
        for f in src.iterdir():
            if f.is_file() and f.name != "config.json" and not (transforms and f == index):
                _link_or_copy(f, tmp / f.name)
            elif f.is_dir() and f.name == STATS_DIR:
                shutil.copytree(f, tmp / f.name)
        if transforms:
            from safetensors.torch import save_file

            save_file(transforms, tmp / TRANSFORMS_FILE, metadata={"format": "pt"})
            if index.exists():  # vLLM reads only the files the index lists
                idx = json.loads(index.read_text())
                idx["weight_map"].update({n: TRANSFORMS_FILE for n in transforms})
                (tmp / index.name).write_text(json.dumps(idx, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return Path(dst).resolve()
