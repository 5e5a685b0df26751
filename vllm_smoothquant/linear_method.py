"""vLLM ``LinearMethod`` for SmoothQuant W8A8: declare the int8 parameters, delegate to vLLM's kernel.

Parameters use vLLM's parameter classes, so fused layers (qkv, gate_up) and tensor-parallel
sharding go through vLLM's own ``weight_loader_v2``. The GEMM is vLLM's int8 kernel chosen
by ``init_int8_linear_kernel``: ``scaled_int8_quant`` (per-token dynamic or static) +
``cutlass_scaled_mm`` on CUDA, oneDNN on CPU. Under vLLM's compilation on CUDA, a compile pass
(``fused_quant.py``, installed here) replaces RMSNorm + the dynamic quant by vLLM's fused kernel.

The loaders are wrapped with checks, so a checkpoint tensor that does not match the declared
format (dtype, rank, columns, and rows: those vLLM's layer expects for the shard, before the
tensor-parallel slice) fails at load time with the tensor's name and the fix, instead of being
silently cast or reaching a bare ``AssertionError``. Each loader records the shards it received,
so a fused layer's shard (or a whole layer) the checkpoint lacks is an error after loading,
not uninitialised memory. The checkpoint's files were checked before loading (``checkpoint.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from vllm.config import get_current_vllm_config_or_none
from vllm.model_executor.kernels.linear import init_int8_linear_kernel
from vllm.model_executor.layers.linear import LinearMethodBase, MergedColumnParallelLinear, QKVParallelLinear
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    ModelWeightParameter,
    PerTensorScaleParameter,
)

from . import fused_quant
from .checkpoint import FIX as _FIX
from .checkpoint import CheckpointTensorError
from .format import ActivationScheme, SmoothQuantFormat
from .rotation import InputRotation

_TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}  # safetensors' names
# Load formats whose loader feeds checkpoint tensors through the model's ``load_weights`` (so through the
# loaders below), in vLLM 0.26 and 0.32 alike. Others (dummy, sharded_state, tensorizer, plugins) fill
# parameters by other means: there a shard no loader received is not missing.
_LOADER_FORMATS = frozenset(
    {"auto", "hf", "safetensors", "fastsafetensors", "instanttensor", "mistral", "npcache", "pt", "runai_streamer"}
)


def _load_format() -> str | None:
    """The engine's ``--load-format``, or None outside an engine (unit use of the method)."""
    from vllm.config import get_current_vllm_config_or_none

    cfg = get_current_vllm_config_or_none()
    fmt = getattr(getattr(cfg, "load_config", None), "load_format", None)
    return None if fmt is None else str(getattr(fmt, "value", fmt))


def _packed_modules() -> Mapping[str, list[str]]:
    """The model's fused layers (``qkv_proj -> [q_proj, k_proj, v_proj]``), set on the quant config by vLLM."""
    from vllm.config import get_current_vllm_config_or_none

    cfg = get_current_vllm_config_or_none()
    return getattr(getattr(cfg, "quant_config", None), "packed_modules_mapping", None) or {}


def layer_shards(layer: torch.nn.Module) -> tuple:
    """The shard ids vLLM's loaders pass for ``layer``: q/k/v, 0..n-1 of a merged layer, (None,) if not fused."""
    if isinstance(layer, QKVParallelLinear):
        return ("q", "k", "v")
    if isinstance(layer, MergedColumnParallelLinear):
        return tuple(range(len(layer.output_sizes)))
    return (None,)


def checkpoint_rows(layer: torch.nn.Module, shard) -> int | None:
    """Output rows of the checkpoint tensor that vLLM loads into ``layer`` as ``shard`` (every TP rank gets
    the whole tensor and slices it); None where unknown (a layer type with other shards)."""
    if isinstance(layer, QKVParallelLinear):
        v_head = getattr(layer, "v_head_size", layer.head_size)
        sizes = {"q": layer.total_num_heads * layer.head_size, "k": layer.total_num_kv_heads * layer.head_size,
                 "v": layer.total_num_kv_heads * v_head}
    elif isinstance(layer, MergedColumnParallelLinear):
        sizes = dict(enumerate(layer.output_sizes))  # full sizes: vLLM divides them by tp_size itself
    else:
        return layer.output_size if shard is None else None
    ids = tuple(sizes) if shard is None else shard if isinstance(shard, tuple) else (shard,)
    return sum(sizes[i] for i in ids) if all(i in sizes for i in ids) else None

class SmoothQuantLinearMethod(LinearMethodBase):
    """W8A8 int8 linear: ``y = (s_x * s_w) * (q(x) @ W_q^T) + bias``."""

    def __init__(self, fmt: SmoothQuantFormat, prefix: str = "", activations: ActivationScheme | None = None,
                 rotation_block: int | None = None) -> None:
        self.fmt = fmt
        self.prefix = prefix
        self.activations = activations or fmt.activations  # this layer's scheme (activation_overrides applied)
        self.rotation_block = rotation_block  # the input is rotated by blockdiag(H_b) before the quant (rotation.py)
        self.rotation: InputRotation | None = None
        self.kernel = None
        self.shards: tuple = (None,)  # the shard ids this layer's loaders must each receive
        self.received: dict[str, set] = {}  # parameter name -> shard ids its loader received (None: whole)
        self.checkpoint_names: dict = {}  # shard id -> checkpoint module name (q -> ...self_attn.q_proj)

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
        if self.rotation_block is not None:
            self.rotation = self._input_rotation(input_size_per_partition, input_size)
        channelwise = self.fmt.weights.strategy == "channel"
        scale_dtypes = tuple(_TORCH_DTYPES[d] for d in self.fmt.scale_dtypes)  # widened to float32 by vLLM's loader
        static = not self.activations.dynamic
        layer.logical_widths = output_partition_sizes
        self.kernel = init_int8_linear_kernel(
            is_channelwise=channelwise,
            is_static_input_scheme=static,
            input_symmetric=True,
            module_name=type(self).__name__,
        )
        engine = get_current_vllm_config_or_none()
        if fused_quant.engine_fuses(engine) and self.activations.dynamic:  # parsing checks the option everywhere
            fused_quant.install(engine)  # RMSNorm -> int8 in vLLM's fused kernel (CUDA, compiled, opted in)
        self.shards = layer_shards(layer)
        parent, _, leaf = self.prefix.rpartition(".")
        parts = _packed_modules().get(leaf) or []
        if len(parts) == len(self.shards) > 1:
            self.checkpoint_names = {s: f"{parent}.{n}" if parent else n for s, n in zip(self.shards, parts)}
        rows = sum(output_partition_sizes)

        weight = ModelWeightParameter(
            data=torch.empty(rows, input_size_per_partition, dtype=torch.int8),
            input_dim=1,
            output_dim=0,
            weight_loader=self._checked(layer, loader, "weight", (torch.int8,), (None, input_size)),
        )
        layer.register_parameter("weight", weight)

        # Scales start as NaN: a value the checkpoint does not set is reported, not used.
        if channelwise:
            weight_scale = ChannelQuantScaleParameter(
                data=torch.full((rows, 1), float("nan"), dtype=torch.float32),
                output_dim=0,
                weight_loader=self._checked(layer, loader, "weight_scale", scale_dtypes, (None, 1)),
            )
        else:
            weight_scale = PerTensorScaleParameter(
                data=torch.full((len(output_partition_sizes),), float("nan"), dtype=torch.float32),
                weight_loader=self._checked(layer, loader, "weight_scale", scale_dtypes, (1,)),
            )
        layer.register_parameter("weight_scale", weight_scale)

        input_scale = None
        if static:
            input_scale = BasevLLMParameter(
                data=torch.full((1,), float("nan"), dtype=torch.float32),
                weight_loader=self._checked(layer, loader, "input_scale", scale_dtypes, (1,)),
            )
        layer.register_parameter("input_scale", input_scale)
        layer.register_parameter("input_zero_point", None)
        if not hasattr(layer, "azp_adj"):
            layer.register_parameter("azp_adj", None)
        if self.rotation is not None and self.fmt.rotation_tensor:  # a compressed-tensors checkpoint's R4_input
            layer.register_module(self.fmt.rotation_tensor, self._rotation_matrix())

    def _rotation_matrix(self) -> torch.nn.Module:
        """Where a compressed-tensors checkpoint's ``<linear>.<scheme>_input.weight`` loads: checked to be
        compressed-tensors' ``deterministic_hadamard_matrix(b)`` (the matrix the rotation computes), then dropped."""
        b, name = self.rotation_block, f"{self.prefix}.{self.fmt.rotation_tensor}.weight"

        def load(param, loaded_weight: torch.Tensor, *args, **kwargs):
            from compressed_tensors.transform import deterministic_hadamard_matrix

            want = deterministic_hadamard_matrix(b, torch.float64)
            if tuple(loaded_weight.shape) != (b, b) or not torch.equal(loaded_weight.double(), want):
                raise CheckpointTensorError(
                    f"{name}: the checkpoint's transform_config declares a Hadamard transform of head_dim {b}, but "
                    f"this tensor (shape {list(loaded_weight.shape)}) is not compressed-tensors' "
                    f"deterministic_hadamard_matrix({b}) (a randomized or other matrix: the plugin computes that "
                    f"one); serve this checkpoint without --quantization smoothquant."
                )

        holder = torch.nn.Module()  # a plain parameter (nothing to shard): vLLM's loaders call its weight_loader
        holder.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        holder.weight.weight_loader = load
        return holder

    def _input_rotation(self, input_size_per_partition: int, input_size: int) -> InputRotation:
        """The layer's run-time input rotation; its input slice on this rank must hold whole Hadamard blocks."""
        b = self.rotation_block
        if input_size_per_partition % b:
            tp = input_size // input_size_per_partition
            raise CheckpointTensorError(
                f"{self.prefix}: its input ({input_size} channels) is rotated in Hadamard blocks of {b} "
                f"(quantization_config['rotation']), but at tensor-parallel size {tp} each rank holds "
                f"{input_size_per_partition} channels, not a multiple of {b}, so a block would straddle two ranks; "
                f"serve it at a tensor-parallel size whose shard is a multiple of {b}, or re-quantize with a "
                f"smaller --rotate-block (a power of two dividing {input_size_per_partition})."
            )
        return InputRotation(b)

    def describe(self, param: str, shard=None) -> str:
        """The checkpoint tensor behind ``param`` (and ``shard``), with vLLM's name where they differ."""
        vllm_name = f"{self.prefix}.{param}"
        if shard is None:
            return vllm_name
        if shard in self.checkpoint_names:
            return f"{self.checkpoint_names[shard]}.{param} (vLLM: {vllm_name}, shard {shard!r})"
        return f"{vllm_name} (shard {shard!r})"

    def _checked(self, layer: torch.nn.Module, loader: Callable, param: str, dtypes: tuple[torch.dtype, ...],
                 shape: tuple[int | None, ...]) -> Callable:
        """Wrap vLLM's loader: dtype and shape checked (a None row count: the rows vLLM's layer expects for
        the shard), then the shard recorded as received."""
        received = self.received.setdefault(param, set())

        def load(p, loaded_weight: torch.Tensor, *args, **kwargs):
            shard = args[0] if args else kwargs.get("loaded_shard_id")
            where = self.describe(param, shard)
            if loaded_weight.dtype not in dtypes:
                raise CheckpointTensorError(
                    f"{where}: checkpoint tensor has dtype {loaded_weight.dtype}, the SmoothQuant format "
                    f"declares {' or '.join(map(str, dtypes))}; {_FIX}."
                )
            want = tuple(checkpoint_rows(layer, shard) if d is None else d for d in shape)
            got = tuple(loaded_weight.shape)
            if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
                show = "[" + ", ".join("?" if w is None else str(w) for w in want) + "]"
                raise CheckpointTensorError(
                    f"{where}: checkpoint tensor has shape {list(got)}, but vLLM's layer {self.prefix} (built "
                    f"from config.json) expects {show}; the checkpoint was made for another model config or "
                    f"was edited: {_FIX} from the model whose config.json it has."
                )
            out = loader(p, loaded_weight, *args, **kwargs)
            received.update(shard if isinstance(shard, tuple) else (shard,))
            return out

        return load

    def missing(self) -> list[str]:
        """Checkpoint tensors (and shards) no loader received: ``[]`` once every shard of every parameter came."""
        out = []
        for param, got in self.received.items():
            if None in got:
                continue  # loaded whole (a non-fused layer, or a fused tensor such as Phi-3's qkv_proj)
            out += [self.describe(param, s) for s in self.shards if s not in got]
        return out

    def bad_scales(self, layer: torch.nn.Module, name: str) -> list[str]:
        """The checkpoint tensors whose values in ``layer.<name>`` are not finite and > 0 (a shard's rows of a
        channel scale, a shard's entry of a per-tensor scale, or the one input scale)."""
        t = getattr(layer, name, None)
        if t is None:
            return []
        ok = (torch.isfinite(t) & (t > 0)).reshape(t.shape[0], -1).all(dim=1).tolist()
        if all(ok):
            return []
        if name == "input_scale" or None in self.shards or None in self.received.get(name, ()):
            return [self.describe(name)]  # one checkpoint tensor
        if t.dim() == 1:  # per tensor: one entry per shard
            return [self.describe(name, self.shards[i]) for i, good in enumerate(ok) if not good]
        bounds = torch.tensor(layer.logical_widths).cumsum(0).tolist()  # per channel: this rank's rows per shard
        bad = {next(i for i, b in enumerate(bounds) if r < b) for r, good in enumerate(ok) if not good}
        return [self.describe(name, self.shards[i]) for i in sorted(bad)]

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        load_format = _load_format()
        if load_format != "dummy":  # dummy: random scales, speed runs only, values not checked
            if load_format in _LOADER_FORMATS and (missing := self.missing()):
                raise CheckpointTensorError(
                    f"{', '.join(missing)}: missing from the checkpoint (vLLM's layer {self.prefix} received no "
                    f"data for these and would run on uninitialised memory); {_FIX}."
                )
            for name in ("weight_scale", "input_scale"):
                if bad := self.bad_scales(layer, name):
                    raise CheckpointTensorError(
                        f"{', '.join(bad)}: holds NaN/inf/zero/negative values or was never loaded (scales must be "
                        f"finite and > 0); {_FIX}."
                    )
        if self.rotation is not None:
            self.rotation.to(layer.weight.device)  # before the kernel's own processing, which may drop `weight`
        if self.fmt.rotation_tensor and hasattr(layer, self.fmt.rotation_tensor):
            delattr(layer, self.fmt.rotation_tensor)  # checked as it loaded; the rotation is computed
        self.kernel.process_weights_after_loading(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.rotation is not None:
            x = self.rotation(x)
        return self.kernel.apply_weights(layer, x, bias)


def quant_methods(model: torch.nn.Module) -> dict[str, str]:
    """``{module name: quant method class}`` of every linear layer; use with ``LLM.apply_model``."""
    from vllm.model_executor.layers.linear import LinearBase

    return {n: type(m.quant_method).__name__ for n, m in model.named_modules() if isinstance(m, LinearBase)}
