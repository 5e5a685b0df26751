"""Will the output fit? Checked before any weight is read, so a full disk is refused up front instead of failing
(``ENOSPC``) after the model was loaded and calibration had run.

Every output tensor's shape and dtype is known from the model's config (``pipeline.output_specs``), so the
checkpoint's size is too; the tokenizer and config files are about the size of the model's own, the statistics
under ``smoothquant/`` two float32 vectors per linear. With ``--offload-activations disk`` the calibration
activations are written beside OUTPUT_DIR as well, at the same time. All of it goes to OUTPUT_DIR's parent
directory (the ``.partial`` directory renamed into place at the end, the ``.activations`` scratch), whose file
system is asked with ``shutil.disk_usage``.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from .options import OptionsError

SLACK = 1 << 20  # safetensors headers, config.json, generation_config.json, report.json, file-system blocks
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
ACTIVATIONS = "calibration activations on disk"  # the key of the scratch in ``need``


class DiskSpaceError(OptionsError):
    """The output (and scratch) will not fit where it goes; the message says how much is needed and free, where."""


def tensor_bytes(specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    """Bytes of the tensors of ``specs`` (name -> (shape, dtype))."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs.values())


def metadata_bytes(model_dir: Path) -> int:
    """The files of the model directory other than weights (tokenizer, configs): what the output gets a copy of."""
    try:
        return sum(f.stat().st_size for f in Path(model_dir).iterdir()
                   if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES))
    except OSError:
        return 0


def size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def existing_parent(path: Path) -> Path:
    """``path``'s nearest existing ancestor: where what is made beside ``path`` lands."""
    p = Path(path).parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_free_space(out: Path, need: dict[str, int]) -> None:
    """Refuse (:class:`DiskSpaceError`) when the bytes of ``need`` (what -> bytes) exceed the free space of the
    file system OUTPUT_DIR ``out`` goes to."""
    where = existing_parent(out)
    free, total = shutil.disk_usage(where).free, sum(need.values())
    if total <= free:
        return
    parts = ", ".join(f"{what} {size(n)}" for what, n in need.items())
    hint = ", or keep the calibration activations in memory (no --offload-activations disk)" if need.get(ACTIVATIONS) \
        else ""
    raise DiskSpaceError(f"not enough free space for OUTPUT_DIR {str(out)!r}: the run writes about {size(total)} "
                         f"({parts}) in {str(where)!r}, where {size(free)} is free; free some space there, or choose "
                         f"an OUTPUT_DIR on another file system{hint}.")
