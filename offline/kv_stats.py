"""KV-cache statistics: per KV head, max |K| and max |V| exactly as they enter the KV cache.

What vLLM writes to its cache is K after the rotary embedding (and Qwen3/Gemma 3's k_norm), before any
``repeat_kv``, and V. In the installed transformers (5.x) every supported family's attention module hands
exactly these tensors to the cache object it is given, ``cache.update(key_states, value_states, layer_idx)``:
the nine families built on ``AttentionInterface`` (OPT, Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 1/2/3)
through the ``past_key_values`` argument, BLOOM and Falcon (whose attention does not go through
``AttentionInterface``) through ``layer_past``. So one mechanism serves all eleven: while
:func:`record_kv` is active, a forward pre-hook on the attention module passes it a recording cache
(wrapping the real cache, if the caller passed one) whose ``update`` takes the absmax per head
(``[batch, kv_heads, seq, head_dim]`` -> ``[kv_heads]``) and returns K and V unchanged.

Use it around the pass whose K/V the served model will see: in the quantize loop, the run of the already
smoothed and int8-simulated layer (v->o smoothing rescales V's channels, so V's scale must come from it)::

    with record_kv(layer.get_submodule("self_attn")) as kv:
        run_layer(layer, hidden, kwargs)
    tensors = kv_scale_tensors(f"model.layers.{i}.self_attn", kv, KVCacheScheme("fp8_e4m3", "tensor"))

The checkpoint names are the format's (``format.py``): ``<attention module>.k_scale`` / ``.v_scale``,
which stock vLLM's loader maps to the attention layer ``<attention module>.attn`` for every family.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from vllm_smoothquant.format import KVCacheScheme, kv_scale

# The argument through which each supported family's attention module receives its KV cache.
CACHE_ARGUMENTS = ("past_key_values", "layer_past")


class KVStatsError(ValueError):
    """The attention module cannot be observed (an architecture or transformers version this code does not know)."""


@dataclass
class KVAbsmax:
    """Per KV head max |K| and max |V| (float32 ``[num_kv_heads]``, on the layer's device); None until the
    first call."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def add(self, key: torch.Tensor, value: torch.Tensor, where: str) -> None:
        if key.dim() != 4 or value.dim() != 4 or key.shape[1] != value.shape[1]:
            raise KVStatsError(f"{where}: the cache received K {tuple(key.shape)} and V {tuple(value.shape)}; "
                               "expected [batch, kv_heads, seq, head_dim] for both.")
        k, v = (t.detach().abs().amax(dim=(0, 2, 3)).float() for t in (key, value))
        if self.k is not None and self.k.shape != k.shape:
            raise KVStatsError(f"{where}: {k.numel()} KV heads in this call, {self.k.numel()} before.")
        self.k = k if self.k is None else torch.maximum(self.k, k)
        self.v = v if self.v is None else torch.maximum(self.v, v)


class _RecordingCache:
    """Takes K/V statistics at ``update``, then hands over to the real cache (or returns K and V unchanged)."""

    def __init__(self, stats: KVAbsmax, inner, where: str):
        self._stats, self._inner, self._where = stats, inner, where

    def update(self, key_states, value_states, *args, **kwargs):
        self._stats.add(key_states, value_states, self._where)
        if self._inner is None:
            return key_states, value_states
        return self._inner.update(key_states, value_states, *args, **kwargs)

    def __getattr__(self, name):  # anything else the attention asks of a real cache
        if self._inner is None:
            raise AttributeError(f"{self._where}: the attention module asked its KV cache for {name!r}; "
                                 "kv_stats only records update().")
        return getattr(self._inner, name)


def cache_argument(attention: nn.Module) -> str:
    """The name of the argument through which ``attention`` receives its KV cache."""
    params = inspect.signature(attention.forward).parameters
    for name in CACHE_ARGUMENTS:
        if name in params:
            return name
    raise KVStatsError(
        f"{type(attention).__name__}.forward takes none of {list(CACHE_ARGUMENTS)}: KV-cache statistics need an "
        "attention module that writes K and V to a transformers cache (OPT, Llama, Mistral, Qwen2, Qwen3, Phi-3, "
        "BLOOM, Falcon, Gemma 1/2/3 in transformers 5.x). Quantize without the calibrated KV cache."
    )


@contextmanager
def record_kv(attention: nn.Module) -> Iterator[KVAbsmax]:
    """While active, every forward of ``attention`` (a Hugging Face attention module) adds its K/V to the
    yielded :class:`KVAbsmax`. The module's outputs are unchanged."""
    name = cache_argument(attention)
    position = list(inspect.signature(attention.forward).parameters).index(name)
    where = type(attention).__name__
    stats = KVAbsmax()

    def hook(_module, args, kwargs):
        if len(args) > position:
            raise KVStatsError(f"{where}: its KV cache was passed positionally; kv_stats needs it by keyword "
                               f"({name}=...).")
        return args, {**kwargs, name: _RecordingCache(stats, kwargs.get(name), where)}

    handle = attention.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield stats
    finally:
        handle.remove()


def kv_scale_tensors(attention: str, kv: KVAbsmax, scheme: KVCacheScheme) -> dict[str, torch.Tensor]:
    """``{checkpoint name: float32 scale}`` of one layer: ``<attention>.k_scale`` / ``.v_scale``, ``[1]`` for
    strategy "tensor", ``[num_kv_heads]`` for "head" (``format.py``). ``attention`` is the attention module's
    name in the checkpoint, e.g. ``model.layers.3.self_attn``."""
    if kv.k is None:
        raise KVStatsError(f"{attention}: no K/V was recorded (the layer did not run inside record_kv).")
    out = {}
    for which, absmax in (("k", kv.k), ("v", kv.v)):
        a = absmax.detach().float().cpu()
        out[f"{attention}.{which}_scale"] = kv_scale(a if scheme.strategy == "head" else a.amax().reshape(1))
    return out
