"""Write a SmoothQuant checkpoint atomically: a temporary directory, renamed into place at the end.

An interrupted or failed run leaves no ``OUTPUT_DIR`` (only a ``.NAME.*.partial`` directory that
is removed on failure), so a directory at ``OUTPUT_DIR`` is always complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

from vllm_smoothquant.format import SmoothQuantFormat

WEIGHTS_NAME = "model{suffix}.safetensors"
STATS_DIR = "smoothquant"  # per-channel statistics for `inspect`; a subdirectory, so vLLM never loads it


class OutputExistsError(FileExistsError):
    pass


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output directory {str(out)!r} already exists; pass --overwrite to replace it.")


def save_safetensors(state_dict: dict[str, torch.Tensor], directory: Path, max_shard_size: str = "5GB") -> None:
    """Sharded safetensors with an index (``model.safetensors.index.json``) when more than one shard."""
    split = split_torch_state_dict_into_shards(
        state_dict, filename_pattern=WEIGHTS_NAME, max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state_dict[n].contiguous() for n in names}, directory / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False):
    """Yield a temporary directory beside ``out``; on success it replaces ``out``, on error it is removed."""
    out = Path(out).resolve()
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; a checkpoint is meant to be shared
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_checkpoint(
    out: Path,
    *,
    state_dict: dict[str, torch.Tensor],
    config,
    fmt: SmoothQuantFormat,
    tokenizer,
    generation_config=None,
    stats: dict[str, torch.Tensor] | None = None,
    report: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the checkpoint into a temp dir beside ``out``, then rename it to ``out``."""
    with atomic_dir(out, overwrite) as tmp:
        save_safetensors(state_dict, tmp)
        config.quantization_config = fmt.to_dict()
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if stats or report:
            (tmp / STATS_DIR).mkdir()
            if stats:
                save_file({k: v.clone().contiguous() for k, v in stats.items()}, tmp / STATS_DIR / "stats.safetensors")
            if report:
                (tmp / STATS_DIR / "report.json").write_text(json.dumps(report, indent=2))
    return Path(out).resolve()


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
