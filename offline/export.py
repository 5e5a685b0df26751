"""Write a checkpoint atomically and as it is made: a temporary directory renamed into place at the end, and a
safetensors writer that puts each tensor into its shard as soon as it is finished.

- :func:`check_output` runs before anything is loaded: it refuses an output that is the model (or contains it),
  an existing one without ``--overwrite``, and one that cannot be written.
- :func:`atomic_dir` yields ``.NAME.PID.XXXX.partial`` beside ``OUTPUT_DIR``, renamed to ``OUTPUT_DIR`` on
  success and removed on failure, so a directory at ``OUTPUT_DIR`` is always complete. A killed process cannot
  remove its own: the next run for the same output removes those whose PID is gone, and mentions the others.
- :class:`ShardWriter` knows every tensor's name, dtype and shape before the first is written (the shard plan is
  huggingface_hub's, 5 GB shards, ``model.safetensors.index.json``), so each shard's safetensors header comes
  first and each tensor is written at its offset when it arrives: the same bytes as ``safetensors.save_file``,
  and nothing held back in memory.

Files are created with mode 0666 minus the umask (0644 typically), like the rest of the directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards

from vllm_smoothquant.format import SmoothQuantFormat

from .options import OptionsError
from .write_errors import OutputWriteError, writing

WEIGHTS_NAME = "model{suffix}.safetensors"
INDEX_NAME = "model.safetensors.index.json"
STATS_DIR = "smoothquant"  # per-channel statistics for `inspect`; a subdirectory, so vLLM never loads it
MAX_SHARD_SIZE = "5GB"


class OutputExistsError(FileExistsError):
    pass


class OutputPathError(OptionsError):
    """OUTPUT_DIR cannot be used (it is the model, contains it, or cannot be written)."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output directory {str(out)!r} already exists; pass --overwrite to replace it.")


def check_output(output_dir: str | Path, overwrite: bool, model_dir: Path | None = None) -> Path:
    """The resolved OUTPUT_DIR, checked before any work: not the model directory nor one containing it, not
    existing unless ``overwrite``, and its parent creatable and writable."""
    out = Path(output_dir).expanduser().resolve()
    if model_dir is not None:
        src = Path(model_dir).resolve()
        if out == src:
            raise OutputPathError(f"OUTPUT_DIR {str(out)!r} is the model directory itself: the int8 checkpoint "
                                  "would replace the model it is made from; choose another OUTPUT_DIR.")
        if out in src.parents:
            raise OutputPathError(f"OUTPUT_DIR {str(out)!r} contains the model directory {str(src)!r}: replacing "
                                  "it would delete the model; choose an OUTPUT_DIR outside it.")
    check_output_dir(out, overwrite)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"OUTPUT_DIR {str(out)!r} is a file, not a directory; choose another OUTPUT_DIR.")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"cannot create OUTPUT_DIR {str(out)!r}: {str(parent)!r} is a file, not a directory.")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe.", dir=parent))
    except OSError as e:
        raise OutputPathError(f"cannot write OUTPUT_DIR {str(out)!r}: {str(parent)!r} is not writable "
                              f"({e.strerror}); choose another OUTPUT_DIR or fix its permissions.") from None
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_partials(out: Path) -> list[str]:
    """Remove ``.NAME.PID.*.partial`` / ``.activations`` leftovers of ``out`` whose writer is gone; describe the
    leftovers it keeps (a running writer's, or of unknown origin). Returns the messages."""
    notes = []
    if not out.parent.is_dir():
        return notes
    ours = re.compile(rf"^\.{re.escape(out.name)}\.(\d+)\.[a-z0-9_]+\.(partial|activations)$")
    other = re.compile(rf"^\.{re.escape(out.name)}\.([a-z0-9_]+\.partial|old-\d+)$")
    for p in sorted(out.parent.iterdir()):
        if (m := ours.match(p.name)) and p.is_dir():
            pid = int(m.group(1))
            if pid == os.getpid():
                continue
            if _alive(pid):
                notes.append(f"note: {p} belongs to a run that is still going (PID {pid}); left alone.")
            else:
                shutil.rmtree(p, ignore_errors=True)
                notes.append(f"removed {p}: left by an interrupted run (PID {pid}, no longer running).")
        elif other.match(p.name) and p.is_dir():
            notes.append(f"note: {p} was left by an interrupted run of an earlier version; remove it if no other "
                         "run is writing OUTPUT_DIR.")
    for n in notes:
        print(n, file=sys.stderr)
    return notes


def scratch_dir(out: Path, kind: str) -> Path:
    """A fresh ``.NAME.PID.XXXX.<kind>`` directory beside ``out`` (mode 0777 minus the umask)."""
    with writing(out.parent):
        d = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=f".{kind}", dir=out.parent))
    d.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; a checkpoint is meant to be shared
    return d


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False):
    """Yield a temporary directory beside ``out``; on success it replaces ``out``, on error it is removed
    (and so are the parent directories this created)."""
    out = Path(out).resolve()
    check_output_dir(out, overwrite)
    clean_stale_partials(out)
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = scratch_dir(out, "partial")
    try:
        yield tmp
        with writing(out):
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old)
            else:
                tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # innermost first
            try:
                p.rmdir()
            except OSError:
                break
        raise


# ---------------------------------------------------------------- safetensors, written as tensors arrive
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
# safetensors lays a file out by dtype (this order, largest first), then by name: the same bytes as save_file
_ST_ORDER = ("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64")


class _Shard:
    def __init__(self, path: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        entries, offset = {}, 0
        for name in sorted(specs, key=lambda n: (-_ST_ORDER.index(_ST_DTYPES[specs[n][1]]), n)):
            shape, dtype = specs[name]
            size = torch.Size(shape).numel() * dtype.itemsize
            entries[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        self.path, self.specs, self.entries = path, specs, entries
        self.base = 8 + len(header)
        with writing(path):
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                os.write(self.fd, len(header).to_bytes(8, "little") + header)
                os.ftruncate(self.fd, self.base + offset)
            except OSError:
                os.close(self.fd)
                raise
        self.pending = set(specs)

    def write(self, name: str, t: torch.Tensor) -> None:
        shape, dtype = self.specs[name]
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise ValueError(f"tensor {name}: got {t.dtype} {tuple(t.shape)}, planned {dtype} {tuple(shape)}")
        data = memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        pos, end = self.base + self.entries[name]["data_offsets"][0], len(data)
        done = 0
        with writing(self.path):
            while done < end:
                done += os.pwrite(self.fd, data[done:], pos + done)
        self.pending.discard(name)

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            with writing(self.path):
                os.close(fd)


class ShardWriter:
    """Sharded safetensors (``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` + index) whose tensors
    are all declared up front (``specs``: name -> (shape, dtype), in checkpoint order) and written in any order."""

    def __init__(self, directory: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 max_shard_size: int | str | None = None, filename: str = WEIGHTS_NAME):
        meta = {n: torch.empty(shape, dtype=dtype, device="meta") for n, (shape, dtype) in specs.items()}
        self.split = split_torch_state_dict_into_shards(meta, filename_pattern=filename,
                                                        max_shard_size=max_shard_size or MAX_SHARD_SIZE)
        self.directory = Path(directory)
        self.shards = {f: _Shard(self.directory / f, {n: specs[n] for n in names})
                       for f, names in self.split.filename_to_tensors.items()}
        self.where = {n: self.shards[f] for f, names in self.split.filename_to_tensors.items() for n in names}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.where[name].write(name, tensor)

    def write_all(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            self.write(name, t)

    def close(self) -> None:
        for shard in self.shards.values():
            shard.close()
        missing = [n for s in self.shards.values() for n in s.pending]
        if missing:
            raise RuntimeError(f"checkpoint incomplete: {len(missing)} tensors never written, e.g. {missing[:3]}")
        if self.split.is_sharded:
            index = {"metadata": self.split.metadata, "weight_map": self.split.tensor_to_filename}
            with writing(self.directory / INDEX_NAME):
                (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:  # the error on its way out is the one to report
            for shard in self.shards.values():
                try:
                    shard.close()
                except OutputWriteError:
                    pass


def save_safetensors(state_dict: dict[str, torch.Tensor], directory: Path, max_shard_size: str | None = None,
                     filename: str = WEIGHTS_NAME) -> None:
    """A whole state dict as sharded safetensors (with an index when more than one shard)."""
    with ShardWriter(directory, {n: (tuple(t.shape), t.dtype) for n, t in state_dict.items()}, max_shard_size,
                     filename) as w:
        w.write_all(state_dict)


def write_metadata(directory: Path, *, config, fmt: SmoothQuantFormat, tokenizer, generation_config=None,
                   stats: dict[str, torch.Tensor] | None = None, report: dict | None = None) -> None:
    """config.json (with the quantization_config), tokenizer, generation config, and ``smoothquant/``."""
    config.quantization_config = fmt.to_dict()
    with writing(directory):
        config.save_pretrained(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        if generation_config is not None:
            generation_config.save_pretrained(directory)
        if stats or report:
            (directory / STATS_DIR).mkdir()
            if stats:
                save_safetensors(stats, directory / STATS_DIR, max_shard_size="1000GB", filename="stats.safetensors")
            if report:
                (directory / STATS_DIR / "report.json").write_text(json.dumps(report, indent=2))


def write_text_atomic(path: Path, text: str) -> None:
    """``path`` holds ``text`` or what it held before, never half of it: written beside it, then renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with writing(path):
            tmp.write_text(text)
            tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
