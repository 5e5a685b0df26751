"""The model to quantize, one decoder layer at a time.

- :func:`resolve_model`: a local model directory, or a hub id downloaded first (config, tokenizer and
  ``model*.safetensors`` only). A missing directory or a failed download is a clear error.
- :class:`LazyCheckpoint` (safetensors): the model skeleton is built with its parameters on the meta device
  (buffers made in ``__init__`` — rotary ``inv_freq``, Gemma's ``embed_scale`` — are real, computed as
  transformers computes them); a decoder layer's tensors are read from the shards tensor by tensor when the layer
  is processed (the next layer is read in the background meanwhile) and freed after it; the embeddings and other
  non-layer modules are read only for the calibration forward. Checkpoint names are mapped to the model's with
  transformers' own renamings and base-model prefix rule (e.g. OPT's ``decoder.*`` -> ``model.decoder.*``).
- :class:`InMemoryCheckpoint`: ``from_pretrained``, the whole model in host memory: the fallback for models
  without safetensors (``pytorch_model.bin``) or whose names do not map; the summary says which was used.

Either way a mixture-of-experts model's fused experts become per-expert linears named as the checkpoint names
them (``experts.split_experts``), so a checkpoint tensor such as ``...block_sparse_moe.experts.3.w1.weight`` is
read straight into the module of that name; its experts are checked against config.json's count first.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .experts import check_expert_tensors, split_experts
from .mappings import ArchMapping, mapping_for
from .options import OptionsError

INDEX_NAME = "model.safetensors.index.json"
HUB_FILES = ["*.json", "model*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class ModelSourceError(OptionsError):
    """MODEL_DIR is neither a model directory nor a downloadable hub id."""


def resolve_model(name: str) -> tuple[Path, str | None]:
    """(local model directory, hub id or None). A hub id is downloaded first (safetensors weights only)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"MODEL_DIR {name!r} has no config.json: not a Hugging Face model directory.")
        return path, None
    if path.exists():
        raise ModelSourceError(f"MODEL_DIR {name!r} is a file; give a Hugging Face model directory (with "
                               "config.json) or a hub id such as facebook/opt-125m.")
    if not _HUB_ID.match(name):
        raise ModelSourceError(f"model directory {name!r} does not exist; give a Hugging Face model directory (with "
                               "config.json) or a hub id such as facebook/opt-125m.")
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except Exception as e:  # not found, gated, offline, no network: every way a download fails
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelSourceError(
            f"{name!r} is neither a local directory nor a model downloadable from the Hugging Face Hub "
            f"({type(e).__name__}: {reason[:200]}). Check the path; for a hub id check its spelling, your network "
            "(HF_HUB_OFFLINE) and, for gated models, HF_TOKEN."
        ) from None
    if not (local / "config.json").is_file():
        raise ModelSourceError(f"hub repository {name!r} has no config.json: not a Hugging Face model.")
    return local, name


def safetensors_files(path: Path) -> dict[str, Path] | None:
    """Checkpoint tensor name -> its file, from ``model.safetensors.index.json`` or ``model.safetensors``."""
    from safetensors import safe_open

    index = path / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: path / f for k, f in weight_map.items()}
    single = path / "model.safetensors"
    if single.is_file():
        with safe_open(single, "pt") as f:
            return {k: single for k in f.keys()}
    return None


@contextmanager
def params_on_meta():
    """Modules built inside get their parameters on the meta device; buffers are made for real (on CPU)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _storage_dtype(config, files: dict[str, Path]) -> torch.dtype:
    """As ``from_pretrained(dtype="auto")``: config.json's dtype, else the checkpoint's first floating tensor's."""
    from safetensors import safe_open

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if dtype is not None:
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    first = next(iter(files.values()))
    with safe_open(first, "pt") as f:
        for k in f.keys():
            if (d := _ST_DTYPES.get(f.get_slice(k).get_dtype())) is not None:
                return d
    return torch.float32


def _key_map(model: nn.Module, checkpoint_keys) -> dict[str, str]:
    """Model state-dict key -> checkpoint key, by transformers' renamings (legacy names) and base-model prefix."""
    wanted = model.state_dict()
    prefix = model.base_model_prefix
    try:  # transformers >= 5
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]

        def rename(key):
            new, converted = rename_source_key(key, renamings, converters, prefix, wanted)
            return None if converted else new  # merged/split tensors: not a 1:1 read
    except ImportError:  # transformers 4: the base-model prefix rule only
        def rename(key):
            if key.startswith(prefix + ".") and key.removeprefix(prefix + ".") in wanted:
                return key.removeprefix(prefix + ".")
            return f"{prefix}.{key}" if f"{prefix}.{key}" in wanted else key

    out = {}
    for key in checkpoint_keys:
        if key in wanted:  # already the model's name (per-expert linears, see experts.split_experts)
            out[key] = key
        elif (new := rename(key)) in wanted:
            out[new] = key
    return out


def _set_tensor(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    parent, _, leaf = name.rpartition(".")
    module = root.get_submodule(parent) if parent else root
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


class Checkpoint:
    """A model to quantize: its config, mapping, and a model whose decoder layers are loaded one at a time."""

    path: Path
    config: object
    mapping: ArchMapping
    model: nn.Module
    how: str  # for the summary: how the weights are read

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.mapping.layers)

    def tensors(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` in the checkpoint's dtype, one at a time (non-layer tensors, for the output)."""
        raise NotImplementedError

    def load_base(self) -> None:
        """Make the base model's non-layer modules (embeddings, final norm) real, for the calibration forward."""

    def release_base(self) -> None:
        pass

    def load_layer(self, i: int) -> nn.Module:
        """Decoder layer ``i`` with its weights, on CPU, in the checkpoint's dtype."""
        return self.layers[i]

    def release_layer(self, i: int) -> None:
        self.layers[i].to_empty(device="meta")  # free this layer's weights

    def close(self) -> None:
        pass


class InMemoryCheckpoint(Checkpoint):
    def __init__(self, path: Path, mapping: ArchMapping, model: nn.Module, how: str):
        self.path, self.mapping, self.model, self.config, self.how = path, mapping, model, model.config, how

    def tensors(self, names):
        sd = self.model.state_dict()
        for n in names:
            yield n, sd[n]


class LazyCheckpoint(Checkpoint):
    def __init__(self, path: Path, mapping: ArchMapping, model: nn.Module, files: dict[str, Path],
                 keys: dict[str, str]):
        self.path, self.mapping, self.model, self.config = path, mapping, model, model.config
        self.files, self.keys = files, keys
        self.meta = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
        self.how = f"lazy: layer by layer from {len(set(files.values()))} safetensors file(s)"
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="read-layer")
        self._next: tuple[int, Future] | None = None

    def _read(self, names: list[str], owned: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Each tensor read from its shard and cast to the model's dtype; ``owned``: copied out of the file mapping."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[self.keys[n]], []).append(n)
        for file, ns in by_file.items():
            with safe_open(file, "pt") as f:
                for n in ns:
                    t = f.get_tensor(self.keys[n])
                    shape, dtype = self.meta[n]
                    if tuple(t.shape) != shape:
                        raise ModelSourceError(f"{file.name}: tensor {self.keys[n]} has shape {tuple(t.shape)}, the "
                                               f"model's {n} is {shape}; config.json and the weights disagree.")
                    cast = t.to(dtype)
                    yield n, cast.clone() if owned and cast.data_ptr() == t.data_ptr() else cast

    def _names(self, prefix: str) -> list[str]:
        return [k for k in self.meta if k.startswith(prefix)]

    def tensors(self, names):
        yield from self._read(names, owned=False)

    def _base_names(self) -> list[str]:
        layers = self.mapping.layers + "."
        return [k for k in self._names(self.model.base_model_prefix + ".") if not k.startswith(layers)]

    def load_base(self):
        for n, t in self._read(self._base_names()):
            _set_tensor(self.model, n, t)

    def release_base(self):
        for n in self._base_names():
            shape, dtype = self.meta[n]
            _set_tensor(self.model, n, torch.empty(shape, dtype=dtype, device="meta"))

    def _layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        prefix = f"{self.mapping.layers}.{i}."
        return {n.removeprefix(prefix): t for n, t in self._read(self._names(prefix))}

    def load_layer(self, i):
        pending = self._next[1] if self._next and self._next[0] == i else self._pool.submit(self._layer_tensors, i)
        tensors = pending.result()
        self._next = (i + 1, self._pool.submit(self._layer_tensors, i + 1)) if i + 1 < len(self.layers) else None
        layer = self.layers[i]
        for n, t in tensors.items():
            _set_tensor(layer, n, t)
        return layer

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)


def open_checkpoint(name: str, load: str = "auto") -> Checkpoint:
    """The model ``name`` (directory or hub id), read lazily from safetensors when it can be (``load="auto"``),
    else whole (``"memory"``: always whole; ``"lazy"``: an error when it cannot be)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path, hub_id = resolve_model(name)
    config = AutoConfig.from_pretrained(path)
    mapping = mapping_for(config)  # an unknown architecture fails before any weights are read
    files = safetensors_files(path) if load != "memory" else None
    why = "asked for" if load == "memory" else f"no model.safetensors / {INDEX_NAME} in {path}"
    if files:
        with params_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=_storage_dtype(config, files)).eval()
        check_expert_tensors(mapping, config, files, str(path))
        split_experts(model, mapping)
        keys = _key_map(model, files)
        tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        missing = [k for k in model.state_dict() if k not in keys and k not in tied]
        if not missing:
            return LazyCheckpoint(path, mapping, model, files, keys)
        why = f"the safetensors names do not map to the model's ({len(missing)} missing, e.g. {missing[0]})"
    if load == "lazy":
        raise ModelSourceError(f"cannot read {name!r} layer by layer: {why}.")
    source = hub_id if hub_id and not files else path  # a hub repo without safetensors: let transformers fetch .bin
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto").eval()
    split_experts(model, mapping)
    return InMemoryCheckpoint(path, mapping, model, f"in memory: {why}; the whole model is loaded (from_pretrained)")

