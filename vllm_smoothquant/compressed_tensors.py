"""compressed-tensors int8 W8A8 checkpoints, served by the plugin on request: their config as the plugin's typed config.

``vllm serve CKPT --quantization smoothquant`` on a checkpoint whose ``quantization_config`` says
``"quant_method": "compressed-tensors"`` (what llm-compressor's W8A8 presets and ``vllm-smoothquant convert`` write):
``SmoothQuantConfig.override_quantization_method`` accepts it (only when the user asked for ``smoothquant``; without
the flag stock vLLM's compressed-tensors support serves it, untouched), and ``SmoothQuantConfig.from_config`` calls
:func:`to_format` here. The tensors are the plugin's own: ``<m>.weight`` int8 ``[out, in]``, ``<m>.weight_scale``
``[out, 1]`` (channel) or ``[1]`` (tensor), ``<m>.input_scale`` ``[1]`` for static activations, ``<attn>.k_scale`` /
``.v_scale`` for ``kv_cache_scheme``; compressed-tensors keeps scales in the model's dtype (bf16 / fp16) where this
project writes float32, and those widen to float32 exactly (``SmoothQuantFormat.scale_dtypes``). So dense linears run
the plugin's linear method and MoE experts the plugin's MoE method, on the same int8 tensors and scales.

Accepted, exactly what the plugin runs:

- one config group, ``targets: ["Linear"]``, ``format`` (top level or the group's) ``int-quantized`` or
  ``naive-quantized`` (both store int8 weights), ``quantization_status`` ``compressed``;
- ``weights``: int, 8 bits, symmetric, static, strategy ``channel`` or ``tensor``;
- ``input_activations``: int, 8 bits, symmetric, dynamic per ``token`` or static per ``tensor``;
- ``ignore``: module names, or ``re:PATTERN`` (matched with ``re.match``, as compressed-tensors does);
- ``kv_cache_scheme``: null, or float 8-bit symmetric static, strategy ``tensor`` or ``attn_head`` (fp8 e4m3);
- ``transform_config``: null, or one Hadamard scheme rotating linears' inputs block by block, what ``convert``
  writes for ``--rotate`` (SpinQuant's R4): ``type: hadamard``, not randomized, ``head_dim`` a power of two, applied
  at ``input`` (and, already folded into the weights, at ``weight_input`` with ``inverse``) of targets
  ``re:.*\\.<suffix>$``. It becomes the plugin's ``rotation`` (format 3), so it runs at any tensor-parallel size
  whose shards hold whole blocks (stock vLLM: TP 1 only). The checkpoint's ``<linear>.<scheme>_input.weight``
  matrices are checked against compressed-tensors' ``deterministic_hadamard_matrix`` as they load.

Anything else is a :class:`CompressedTensorsError` naming the config key, its value and the fix (serve the checkpoint
without ``--quantization smoothquant``): never a silent fallback. See docs/SERVING.md and docs/LIMITATIONS.md.
"""

from __future__ import annotations

import re
from typing import Any

from .checkpoint import CheckpointError
from .format import COMPRESSED_TENSORS, ActivationScheme, KVCacheScheme, RotationScheme, SmoothQuantFormat, WeightScheme
from .rotation import is_power_of_two

INT8_FORMATS = ("int-quantized", "naive-quantized")  # compressed-tensors formats that store int8 weights as int8
SERVE_STOCK = ("serve this checkpoint without --quantization smoothquant (stock vLLM's compressed-tensors support "
               "runs it)")
# Top-level keys compressed-tensors (0.9 to 0.17) and vLLM's get_quant_config (total_num_*heads) put there.
TOP_KEYS = frozenset({"quant_method", "config_groups", "format", "ignore", "kv_cache_scheme", "quantization_status",
                      "global_compression_ratio", "version", "sparsity_config", "transform_config", "run_compressed",
                      "total_num_heads", "total_num_kv_heads"})
GROUP_KEYS = frozenset({"targets", "weights", "input_activations", "output_activations", "format"})
ARGS_KEYS = frozenset({"num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic",
                       "actorder", "scale_dtype", "zp_dtype", "observer", "observer_kwargs"})
SCALE_DTYPES = (None, "torch.float32", "torch.bfloat16", "torch.float16", "float32", "bfloat16", "float16")


class CompressedTensorsError(CheckpointError):
    """A compressed-tensors ``quantization_config`` asks for something the plugin cannot run exactly.

    A ``CheckpointError`` (not a ``ValueError``): it is raised while vLLM builds its config, where pydantic would
    bury a ``ValueError`` in a ``ValidationError``."""


def is_compressed_tensors(config: Any) -> bool:
    """``config`` (a checkpoint's ``quantization_config``) is compressed-tensors' (either spelling vLLM accepts)."""
    return isinstance(config, dict) and str(config.get("quant_method", "")).lower().replace("_", "-") == \
        COMPRESSED_TENSORS


def _refuse(key: str, value: Any, what: str) -> CompressedTensorsError:
    return CompressedTensorsError(
        f"quantization_config{key} = {value!r}: {what}; vllm-smoothquant serves compressed-tensors int8 W8A8 only "
        f"(symmetric int8 weights per channel or per tensor, int8 activations dynamic per token or static per "
        f"tensor). {SERVE_STOCK[0].upper()}{SERVE_STOCK[1:]}."
    )


def _unknown_keys(d: dict, known: frozenset, where: str) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise CompressedTensorsError(
            f"quantization_config{where} has key(s) {unknown} that vllm-smoothquant does not know, so it cannot tell "
            f"whether the checkpoint runs exactly; {SERVE_STOCK}."
        )


def _int8_args(d: Any, where: str) -> dict:
    """The keys every int8 argument set shares: int, 8 bits, symmetric, no groups / blocks / zero points."""
    if not isinstance(d, dict):
        raise _refuse(where, d, "expected an object of quantization arguments")
    _unknown_keys(d, ARGS_KEYS, where)
    if d.get("type", "int") != "int":
        raise _refuse(f"{where}['type']", d.get("type"), f"{d.get('type')} quantization (e.g. fp8) is not int8")
    if d.get("num_bits") != 8:
        raise _refuse(f"{where}['num_bits']", d.get("num_bits"), "only 8-bit integers run on the plugin's int8 "
                      "kernels (int4 and other widths do not)")
    if d.get("symmetric", True) is not True:
        raise _refuse(f"{where}['symmetric']", d.get("symmetric"), "asymmetric quantization (zero points) is not "
                      "supported")
    if d.get("zp_dtype") is not None:
        raise _refuse(f"{where}['zp_dtype']", d.get("zp_dtype"), "zero points are not supported")
    if d.get("group_size") not in (None, -1) or d.get("strategy") in ("group", "tensor_group"):
        raise _refuse(f"{where}['group_size']" if d.get("group_size") not in (None, -1) else f"{where}['strategy']",
                      d.get("group_size") if d.get("group_size") not in (None, -1) else d.get("strategy"),
                      "group-wise scales are not supported")
    if d.get("block_structure") is not None or d.get("strategy") == "block":
        key = "block_structure" if d.get("block_structure") is not None else "strategy"
        raise _refuse(f"{where}[{key!r}]", d.get(key), "block-wise scales are not supported")
    if d.get("scale_dtype") not in SCALE_DTYPES:
        raise _refuse(f"{where}['scale_dtype']", d.get("scale_dtype"), "scales in a dtype that does not widen to "
                      "float32 exactly (float32, bfloat16 and float16 do)")
    return d


def _weights(d: Any, where: str) -> WeightScheme:
    if d is None:
        raise _refuse(where, d, "activation-only quantization (unquantized weights) is not supported")
    _int8_args(d, where)
    if d.get("dynamic", False) is not False:
        raise _refuse(f"{where}['dynamic']", d.get("dynamic"), "dynamic weight quantization is not supported")
    if d.get("actorder") not in (None, "static", "weight"):  # "group" stores g_idx; static / weight change nothing
        raise _refuse(f"{where}['actorder']", d.get("actorder"), "activation ordering with g_idx is not supported")
    strategy = d.get("strategy")
    if strategy not in ("channel", "tensor"):
        raise _refuse(f"{where}['strategy']", strategy, "int8 weights take one scale per output channel "
                      "('channel') or per tensor ('tensor')")
    return WeightScheme(strategy=strategy)


def _activations(d: Any, where: str) -> ActivationScheme:
    if d is None:
        raise _refuse(where, d, "weight-only quantization (W8A16) is not supported: the plugin runs W8A8")
    _int8_args(d, where)
    if d.get("actorder") is not None:
        raise _refuse(f"{where}['actorder']", d.get("actorder"), "activation ordering applies to weights only")
    strategy, dynamic = d.get("strategy"), d.get("dynamic")
    if strategy == "token" and dynamic is True:
        return ActivationScheme(strategy="token", dynamic=True)
    if strategy == "tensor" and dynamic is False:
        return ActivationScheme(strategy="tensor", dynamic=False)
    key = "dynamic" if strategy in ("token", "tensor") else "strategy"
    raise _refuse(f"{where}[{key!r}]", d.get(key), f"activations with strategy {strategy!r} and dynamic {dynamic!r} "
                  "are not supported (dynamic: strategy 'token'; static: strategy 'tensor' with an input_scale)")


def _kv_cache(d: Any) -> KVCacheScheme | None:
    where = "['kv_cache_scheme']"
    if d is None:
        return None
    if not isinstance(d, dict):
        raise _refuse(where, d, "expected null or an object of quantization arguments")
    _unknown_keys(d, ARGS_KEYS, where)
    want = {"type": "float", "num_bits": 8, "symmetric": True, "dynamic": False}
    for key, value in want.items():
        if d.get(key, value) != value:
            raise _refuse(f"{where}[{key!r}]", d.get(key), "the plugin's KV cache takes calibrated fp8 e4m3 scales "
                          "(type float, 8 bits, symmetric, static) only")
    strategy = {"tensor": "tensor", "attn_head": "head"}.get(d.get("strategy"))
    if strategy is None:
        raise _refuse(f"{where}['strategy']", d.get("strategy"), "KV-cache scales per tensor or per attention head "
                      "('tensor', 'attn_head') only")
    return KVCacheScheme(dtype="fp8_e4m3", strategy=strategy)


def _empty(value: Any) -> bool:
    return value is None or value == {} or value == []


def to_format(config: dict[str, Any]) -> SmoothQuantFormat:
    """The plugin's typed config for a compressed-tensors ``quantization_config``; :class:`CompressedTensorsError`
    naming the key for anything the plugin cannot run exactly (see the module doc)."""
    if not is_compressed_tensors(config):
        raise CompressedTensorsError(f"quantization_config['quant_method'] = {config.get('quant_method')!r} "
                                     f"is not {COMPRESSED_TENSORS!r}.")
    _unknown_keys(config, TOP_KEYS, "")
    if not _empty(config.get("sparsity_config")):
        raise _refuse("['sparsity_config']", config["sparsity_config"], "sparse weights (e.g. 2:4) are not supported")
    rotation, transform = (None, None) if _empty(config.get("transform_config")) else \
        _rotation(config["transform_config"])
    status = config.get("quantization_status", "compressed")
    if status != "compressed":
        raise _refuse("['quantization_status']", status, "weights not stored compressed (int8) are not supported")
    top_format = config.get("format")
    if top_format not in (None, *INT8_FORMATS):
        raise _refuse("['format']", top_format, f"the plugin reads int8 weights stored as int8 ({list(INT8_FORMATS)})")
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise _refuse("['config_groups']", groups if not isinstance(groups, dict) else sorted(groups),
                      "exactly one config group (one scheme for every Linear) is supported")
    (name, group), = groups.items()
    where = f"['config_groups'][{name!r}]"
    if not isinstance(group, dict):
        raise _refuse(where, group, "expected an object")
    _unknown_keys(group, GROUP_KEYS, where)
    if group.get("targets") != ["Linear"]:
        raise _refuse(f"{where}['targets']", group.get("targets"), "only targets ['Linear'] (one scheme for every "
                      "linear layer, exceptions in 'ignore') is supported")
    if group.get("format") not in (None, *INT8_FORMATS):
        raise _refuse(f"{where}['format']", group.get("format"),
                      f"the plugin reads int8 weights stored as int8 ({list(INT8_FORMATS)})")
    if top_format is None and group.get("format") is None:
        raise _refuse("['format']", None, f"no storage format given (expected one of {list(INT8_FORMATS)})")
    if group.get("output_activations") is not None:
        raise _refuse(f"{where}['output_activations']", group["output_activations"], "output quantization is not "
                      "supported")
    weights = _weights(group.get("weights"), f"{where}['weights']")
    activations = _activations(group.get("input_activations"), f"{where}['input_activations']")
    ignore = config.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
        raise _refuse("['ignore']", ignore, "expected a list of module names or 're:' patterns")
    return SmoothQuantFormat(
        weights=weights, activations=activations,
        alpha=None, smoothed=False,  # unknown to compressed-tensors' config, and nothing at serving time reads them
        ignore=tuple(ignore), kv_cache=_kv_cache(config.get("kv_cache_scheme")), quant_method=COMPRESSED_TENSORS,
        rotation=rotation, rotation_tensor=transform,
    )


# re:.*\.mlp\.down_proj$ (convert), re:.*down_proj$ (llm-compressor's SpinQuant) -> a module-name suffix
_TARGET = re.compile(r"re:\.\*(?:\\\.)?(\w+(?:(?:\\\.|\.)\w+)*)\$")


def _rotation(tc: Any) -> tuple[RotationScheme, str]:
    """The plugin's rotation for a compressed-tensors ``transform_config`` of the one shape it runs (module doc),
    and the name of the matrix tensor under each target (``<scheme>_input``)."""
    where = "['transform_config']"
    what = ("the plugin runs one non-random Hadamard transform of a power-of-two head_dim on linears' inputs "
            "(vllm-smoothquant convert's R4)")
    if not isinstance(tc, dict) or set(tc) - {"config_groups"} or not isinstance(tc.get("config_groups"), dict) \
            or len(tc["config_groups"]) != 1:
        raise _refuse(where, tc, what)
    (name, scheme), = tc["config_groups"].items()
    where += f"['config_groups'][{name!r}]"
    if not isinstance(scheme, dict):
        raise _refuse(where, scheme, what)
    for key, want in (("type", "hadamard"), ("randomize", False), ("requires_grad", False)):
        if scheme.get(key, want) != want:
            raise _refuse(f"{where}[{key!r}]", scheme.get(key), what)
    block = scheme.get("head_dim")
    if not is_power_of_two(block):
        raise _refuse(f"{where}['head_dim']", block, what + "; a transform over a whole input dimension (no head_dim) "
                      "is not one")
    unknown = sorted(set(scheme) - {"type", "apply", "randomize", "requires_grad", "head_dim", "precision"})
    if unknown:
        raise _refuse(f"{where}", unknown, "unknown keys")
    applies = scheme.get("apply")
    if not isinstance(applies, list) or not applies:
        raise _refuse(f"{where}['apply']", applies, what)
    online = []
    for i, a in enumerate(applies):
        w = f"{where}['apply'][{i}]"
        if not isinstance(a, dict) or a.get("ignore") not in (None, []):
            raise _refuse(w, a, what + " (no 'ignore' inside a transform)")
        location, inverse = a.get("location"), bool(a.get("inverse", False))
        if (location, inverse) == ("input", False):
            online.append(a)
        elif (location, inverse) != ("weight_input", True):  # the folded half: already in the int8 weights
            raise _refuse(f"{w}['location']", location, what + " (locations 'input', and 'weight_input' with "
                          "inverse; Hadamard matrices are symmetric)")
    if len(online) != 1:
        raise _refuse(f"{where}['apply']", applies, what + " (exactly one 'input' entry)")
    targets = []
    for t in online[0].get("targets") or []:
        m = _TARGET.fullmatch(t) if isinstance(t, str) else None
        if m is None:
            raise _refuse(f"{where}['apply'][...]['targets']", t, "targets the plugin can match as module-name "
                          "suffixes, e.g. 're:.*\\.mlp\\.down_proj$'")
        targets.append(m.group(1).replace("\\.", "."))
    if not targets:
        raise _refuse(f"{where}['apply'][...]['targets']", [], what)
    return RotationScheme(targets=tuple(targets), block_size=block), f"{name}_input"
