"""Convert a SmoothQuant checkpoint to compressed-tensors W8A8-int8, so stock vLLM loads it too.

The tensors are already in compressed-tensors' layout (``weight`` int8, ``weight_scale``,
``input_scale``) with the smoothing folded in, so only config.json changes: its
``quantization_config`` is built with the compressed-tensors library's own schema. The
safetensors are hard-linked when source and destination share a filesystem, else copied.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from vllm_smoothquant.format import FormatError, SmoothQuantFormat

from .export import STATS_DIR, atomic_dir


def compressed_tensors_config(fmt: SmoothQuantFormat) -> dict:
    """The compressed-tensors ``quantization_config`` equivalent to ``fmt``."""
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
    cfg = QuantizationConfig(
        config_groups={"group_0": scheme}, format="int-quantized", ignore=list(fmt.ignore),
        quantization_status="compressed",
    )
    return cfg.model_dump(exclude_none=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def to_compressed_tensors(src: str | Path, dst: str | Path, overwrite: bool = False) -> Path:
    src = Path(src)
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" not in config:
        raise FormatError(f"{src / 'config.json'} has no quantization_config: not a SmoothQuant checkpoint.")
    fmt = SmoothQuantFormat.from_dict(config["quantization_config"])
    config["quantization_config"] = compressed_tensors_config(fmt)
    with atomic_dir(Path(dst), overwrite) as tmp:
        for f in src.iterdir():
            if f.is_file() and f.name != "config.json":
                _link_or_copy(f, tmp / f.name)
            elif f.is_dir() and f.name == STATS_DIR:
                shutil.copytree(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return Path(dst).resolve()
