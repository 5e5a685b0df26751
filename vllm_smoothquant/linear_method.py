"""vLLM ``LinearMethod`` for SmoothQuant W8A8: declare the int8 parameters, delegate to vLLM's kernel.

Parameters use vLLM's parameter classes, so fused layers (qkv, gate_up) and tensor-parallel
sharding go through vLLM's own ``weight_loader_v2``. The GEMM is vLLM's int8 kernel chosen
by ``init_int8_linear_kernel``: ``scaled_int8_quant`` (per-token dynamic or static) +
``cutlass_scaled_mm`` on CUDA, oneDNN on CPU.

The loaders are wrapped with checks, so a checkpoint that does not match the declared
format fails at load time with the tensor's name and the fix, instead of being silently cast.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from vllm.model_executor.kernels.linear import init_int8_linear_kernel
from vllm.model_executor.layers.linear import LinearMethodBase
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    ModelWeightParameter,
    PerTensorScaleParameter,
)

from .format import ActivationScheme, SmoothQuantFormat

_FIX = "re-create the checkpoint with `vllm-smoothquant quantize` (format v1: int8 weight [out, in], float32 scales)"


class CheckpointTensorError(ValueError):
    """A checkpoint tensor does not match the SmoothQuant format declared in config.json."""


def _checked(loader: Callable, name: str, dtype: torch.dtype, ndim: int, last_dim: int | None) -> Callable:
    """Wrap a vLLM weight loader so wrong dtype/shape is an error naming the tensor."""

    def load(param, loaded_weight: torch.Tensor, *args, **kwargs):
        shard = args[0] if args else kwargs.get("loaded_shard_id")
        where = f"{name}" + (f" (shard {shard!r})" if shard is not None else "")
        if loaded_weight.dtype != dtype:
            raise CheckpointTensorError(
                f"{where}: checkpoint tensor has dtype {loaded_weight.dtype}, the SmoothQuant format "
                f"declares {dtype}; {_FIX}."
            )
        if loaded_weight.dim() != ndim or (last_dim is not None and loaded_weight.shape[-1] != last_dim):
            want = f"{ndim}-d" + (f" with last dim {last_dim}" if last_dim is not None else "")
            raise CheckpointTensorError(
                f"{where}: checkpoint tensor has shape {tuple(loaded_weight.shape)}, expected {want}; {_FIX}."
            )
        return loader(param, loaded_weight, *args, **kwargs)

    return load


def _dummy_load() -> bool:
    """True under ``--load-format dummy`` (random scales: speed runs only, values not checked)."""
    try:
        from vllm.config import get_current_vllm_config

        return str(get_current_vllm_config().load_config.load_format) == "dummy"
    except Exception:  # no vLLM config in scope (unit use of the method)
        return False


class SmoothQuantLinearMethod(LinearMethodBase):
    """W8A8 int8 linear: ``y = (s_x * s_w) * (q(x) @ W_q^T) + bias``."""

    def __init__(self, fmt: SmoothQuantFormat, prefix: str = "", activations: ActivationScheme | None = None) -> None:
        self.fmt = fmt
        self.prefix = prefix
        self.activations = activations or fmt.activations  # this layer's scheme (activation_overrides applied)
        self.kernel = None

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        loader = extra_weight_attrs["weight_loader"]
        channelwise = self.fmt.weights.strategy == "channel"
        static = not self.activations.dynamic
        layer.logical_widths = output_partition_sizes
        self.kernel = init_int8_linear_kernel(
            is_channelwise=channelwise,
            is_static_input_scheme=static,
            input_symmetric=True,
            module_name=type(self).__name__,
        )
        rows = sum(output_partition_sizes)
        p = self.prefix

        weight = ModelWeightParameter(
            data=torch.empty(rows, input_size_per_partition, dtype=torch.int8),
            input_dim=1,
            output_dim=0,
            weight_loader=_checked(loader, f"{p}.weight", torch.int8, 2, input_size),
        )
        layer.register_parameter("weight", weight)

        # Scales start as NaN: a tensor missing from the checkpoint stays NaN and is reported.
        if channelwise:
            weight_scale = ChannelQuantScaleParameter(
                data=torch.full((rows, 1), float("nan"), dtype=torch.float32),
                output_dim=0,
                weight_loader=_checked(loader, f"{p}.weight_scale", torch.float32, 2, 1),
            )
        else:
            weight_scale = PerTensorScaleParameter(
                data=torch.full((len(output_partition_sizes),), float("nan"), dtype=torch.float32),
                weight_loader=_checked(loader, f"{p}.weight_scale", torch.float32, 1, 1),
            )
        layer.register_parameter("weight_scale", weight_scale)

        input_scale = None
        if static:
            input_scale = BasevLLMParameter(
                data=torch.full((1,), float("nan"), dtype=torch.float32),
                weight_loader=_checked(loader, f"{p}.input_scale", torch.float32, 1, 1),
            )
        layer.register_parameter("input_scale", input_scale)
        layer.register_parameter("input_zero_point", None)
        if not hasattr(layer, "azp_adj"):
            layer.register_parameter("azp_adj", None)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if not _dummy_load():
            for name in ("weight_scale", "input_scale"):
                t = getattr(layer, name, None)
                if t is not None and not bool((torch.isfinite(t) & (t > 0)).all()):
                    raise CheckpointTensorError(
                        f"{self.prefix}.{name}: missing from the checkpoint or holds NaN/inf/zero/negative "
                        f"values (scales must be finite and > 0); {_FIX}."
                    )
        self.kernel.process_weights_after_loading(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.kernel.apply_weights(layer, x, bias)


def quant_methods(model: torch.nn.Module) -> dict[str, str]:
    """``{module name: quant method class}`` of every linear layer; use with ``LLM.apply_model``."""
    from vllm.model_executor.layers.linear import LinearBase

    return {n: type(m.quant_method).__name__ for n, m in model.named_modules() if isinstance(m, LinearBase)}
