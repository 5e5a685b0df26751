"""vLLM ``QuantizationConfig`` for SmoothQuant W8A8 checkpoints (``quant_method: smoothquant``), and for
compressed-tensors int8 W8A8 checkpoints served with ``--quantization smoothquant`` (``compressed_tensors.py``)."""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from .format import QUANT_METHOD, ActivationScheme, FormatError, SmoothQuantFormat, _matches


class SmoothQuantConfig(QuantizationConfig):
    """int8 weights (per channel or per tensor) x int8 activations (per token, per tensor or static).

    Smoothing is already folded into the checkpoint's norms and linears, so at run time
    this is plain W8A8: vLLM's int8 kernel (CUTLASS on CUDA, oneDNN on CPU) does the work; a mixture of
    experts' routed experts run through vLLM's int8 fused-MoE kernels (``moe_method.py``), its routers
    stay in the model dtype (listed in ``ignore``).
    """

    def __init__(self, fmt: SmoothQuantFormat) -> None:
        super().__init__()
        self.fmt = fmt

    def __repr__(self) -> str:
        return f"SmoothQuantConfig({self.fmt})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        from vllm.platforms import current_platform

        # oneDNN's int8 GEMM also takes fp32 activations: CPUs without native bf16 need them.
        extra = [torch.float32] if current_platform.is_cpu() else []
        return [torch.float16, torch.bfloat16, *extra]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75  # Turing: the oldest GPU with CUTLASS int8 tensor-core GEMMs in vLLM

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # read from config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SmoothQuantConfig":
        from .compressed_tensors import is_compressed_tensors, to_format

        if is_compressed_tensors(config):  # only reached with --quantization smoothquant (see below)
            return cls(to_format(config))
        return cls(SmoothQuantFormat.from_dict(config))

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        """vLLM 0.26 and 0.32 call this once the engine config is built, before any weight is read:
        check the checkpoint's safetensors headers against the format (``checkpoint.py``)."""
        from .checkpoint import check_checkpoint

        check_checkpoint(model_name, self.fmt, hf_config)

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None):
        """Pick ``smoothquant`` for SmoothQuant checkpoints even without ``--quantization``, and for
        compressed-tensors checkpoints only when the user asked for it: vLLM 0.26 and 0.32 (``ModelConfig.
        _verify_quantization``) ask every registered method, custom ones before vLLM's own overrides, and
        otherwise refuse a ``--quantization`` that differs from config.json's ``quant_method``. Without the flag a
        compressed-tensors checkpoint stays stock vLLM's. Its config is validated by ``from_config``."""
        from .compressed_tensors import is_compressed_tensors

        if isinstance(hf_quant_cfg, dict) and hf_quant_cfg.get("quant_method") == QUANT_METHOD:
            if user_quant in (None, QUANT_METHOD):
                return QUANT_METHOD
        if user_quant == QUANT_METHOD and is_compressed_tensors(hf_quant_cfg):
            return QUANT_METHOD
        return None

    @property
    def kv_cache_scheme(self) -> dict[str, Any] | None:
        """Not None for a checkpoint with calibrated KV-cache scales: vLLM's ``Attention`` (0.26 and 0.32) then
        turns ``--kv-cache-dtype auto`` into ``fp8`` by itself (``kv_cache.py``), where the platform has an fp8
        KV cache."""
        from .kv_cache import fp8_kv_cache_unsupported

        if self.fmt.kv_cache is None or fp8_kv_cache_unsupported():
            return None
        return {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from .kv_cache import SmoothQuantKVCacheMethod, is_attention

        if is_attention(layer):
            return SmoothQuantKVCacheMethod.for_layer(self, self.fmt, layer, prefix)
        from vllm.model_executor.layers.fused_moe import RoutedExperts  # FusedMoE's experts, vLLM 0.26 and 0.32

        if isinstance(layer, RoutedExperts):
            from .moe_method import moe_method

            self.check_experts_quantized(prefix)
            return moe_method(self.fmt, layer, prefix)  # int8 experts through vLLM's fused-MoE kernels
        if not isinstance(layer, LinearBase):
            return None  # embeddings, lm_head, norms stay in the model dtype
        if self.is_skipped(prefix):
            return UnquantizedLinearMethod()
        from .linear_method import SmoothQuantLinearMethod

        return SmoothQuantLinearMethod(self.fmt, prefix, self.activations_for(prefix), self.rotation_for(prefix))

    def is_skipped(self, prefix: str) -> bool:
        """``ignore`` keeps the layer unquantized (names or compressed-tensors' ``re:`` patterns, ``format.py``);
        the shards of a fused layer (qkv_proj = q, k, v) must agree, or the fused name itself is listed."""
        if not self.fmt.ignore:
            return False
        if self.fmt.is_ignored(prefix):
            return True
        names = self._checkpoint_modules(prefix)
        ignored = {n: self.fmt.is_ignored(n) for n in names}
        if len(set(ignored.values())) > 1:
            raise FormatError(
                f"{prefix}: vLLM runs {', '.join(n.rpartition('.')[2] for n in names)} as one fused layer, but quantization_config['ignore'] keeps "
                f"only {', '.join(n for n, i in ignored.items() if i)} unquantized; list all of them or none."
            )
        return all(ignored.values())

    def check_experts_quantized(self, prefix: str) -> None:
        """MoE experts always run int8 here: an ``ignore`` entry naming them (or expert 0's linears) is refused."""
        probes = [prefix] + [f"{prefix}.0.{w}" for w in ("w1", "w2", "w3", "gate_proj", "up_proj", "down_proj")]
        hit = next((p for p in probes if self.fmt.is_ignored(p)), None)
        if hit is not None:
            fix = ("serve this checkpoint without --quantization smoothquant" if self.fmt.compressed_tensors else
                   "re-quantize without keeping the experts in 16 bits")
            raise FormatError(f"{prefix}: quantization_config['ignore'] keeps {hit} unquantized, but vllm-smoothquant "
                              f"runs MoE experts in int8 only; {fix}.")

    def _checkpoint_modules(self, prefix: str) -> list[str]:
        """The checkpoint's modules that vLLM's layer ``prefix`` holds: the shards of its ``packed_modules_mapping``
        (qkv_proj -> q_proj, k_proj, v_proj), or the layer itself where the checkpoint stores the fused layer under
        vLLM's name although the mapping lists shards (GLM / GLM-4's gate_up_proj: vLLM's Llama-style mapping says
        gate_proj, up_proj). The format names a module only as the checkpoint does, so a layer named in ``ignore``,
        an activation override or the rotation's targets is such a fused layer."""
        parent, _, leaf = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(leaf) or [leaf]
        fmt = self.fmt
        if leaf not in shards and (fmt.is_ignored(prefix) or any(_matches(prefix, k) for k in fmt.activation_overrides)
                                   or (fmt.rotation is not None and fmt.rotation.block_for(prefix) is not None)):
            return [prefix]
        return [f"{parent}.{s}" if parent else s for s in shards]

    def rotation_for(self, prefix: str) -> int | None:
        """The Hadamard block of the layer's input rotation (format 3 ``rotation``), or None. A fused layer's shards
        share one input, so they must all be rotated or none."""
        if self.fmt.rotation is None:
            return None
        names = self._checkpoint_modules(prefix)
        shards = [n.rpartition(".")[2] for n in names]
        blocks = {self.fmt.rotation.block_for(n) for n in names}
        if len(blocks) > 1:
            raise FormatError(f"{prefix}: vLLM runs {', '.join(shards)} as one fused layer with one input, but "
                              "quantization_config['rotation']['targets'] rotates only some of them; list all of them "
                              "or none.")
        return blocks.pop()

    def activations_for(self, prefix: str) -> ActivationScheme:
        """The layer's activation scheme; the shards of a fused layer (qkv_proj = q, k, v) must agree."""
        names = self._checkpoint_modules(prefix)
        shards = [n.rpartition(".")[2] for n in names]
        schemes = {n: self.fmt.activations_for(n) for n in names}
        if len(set(schemes.values())) > 1:
            detail = ", ".join(f"{n}: {'static' if not a.dynamic else 'token'}" for n, a in schemes.items())
            raise FormatError(
                f"{prefix}: vLLM runs {', '.join(shards)} as one fused layer with one activation scheme, but "
                f"activation_overrides gives them different ones ({detail}); override all of them or none."
            )
        return next(iter(schemes.values()))
