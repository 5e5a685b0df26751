"""SmoothQuant checkpoint format, version 3 (versions 1 and 2 still read): the typed ``quantization_config``.

Shared by the offline writer and the vLLM plugin, so both sides validate the same
schema. A checkpoint is a normal Hugging Face model directory whose ``config.json``
carries::

    "quantization_config": {
        "quant_method": "smoothquant",
        "format_version": 1,          # 2 when kv_cache is set (version 1 has no kv_cache)
        "weights":     {"num_bits": 8, "strategy": "channel", "symmetric": true},
        "activations": {"num_bits": 8, "strategy": "token", "dynamic": true, "symmetric": true},
        "alpha": 0.5, "smoothed": true,
        "ignore": ["lm_head"],
        "activation_overrides": {"down_proj": {"num_bits": 8, "strategy": "token", "dynamic": true, "symmetric": true}},
        "calibration": {"source": "...", "num_samples": 128, "seq_len": 512},
        "kv_cache": {"dtype": "fp8_e4m3", "strategy": "tensor"},
        "weight_rounding": "nearest",
        "rotation": {"type": "hadamard", "matrix": "sylvester", "block_size": 256, "targets": ["mlp.down_proj"]}
    }

``activation_overrides`` (optional) gives some modules another activation scheme than
``activations``: a key matches a module whose dotted name ends with it (``down_proj``,
``mlp.down_proj``, ``model.layers.3.mlp.down_proj``); the longest matching key wins.
``weight_rounding`` (optional, absent: ``"nearest"``) records how the int8 weight values were chosen for
the same scales: round to nearest, or ``"gptq"`` (error compensation on the calibration inputs); the
tensors and their meaning are the same, so loading and serving do not depend on it.

and whose safetensors hold, for every quantized Linear ``<name>``:

- ``<name>.weight``       int8    ``[out, in]``  (symmetric, q_max = 127)
- ``<name>.weight_scale`` float32 ``[out, 1]`` (strategy "channel") or ``[1]`` ("tensor")
- ``<name>.input_scale``  float32 ``[1]`` only when activations are static.

``rotation`` (format 3; absent or null: none) declares linears whose input is rotated at run time: for a module
whose dotted name ends with one of ``targets`` (matched as ``activation_overrides`` keys are), the checkpoint's
``<name>.weight`` holds ``W R`` (before int8 rounding) and the layer computes ``(x R) (W R)^T``, with
``R = blockdiag(H_b, ...)``, ``H_b = deterministic_hadamard_matrix(b) / sqrt(b)`` (Sylvester, symmetric, so
row and column conventions agree) and ``b = block_size``, a power of two dividing the layer's input size (and
each tensor-parallel shard of it). ``x R`` is what the int8 activation quant sees (and, for static activations,
what ``input_scale`` was calibrated on). See ``rotation.py``.

``kv_cache`` (format 2; absent or null: none) declares calibrated 8-bit KV-cache scales: for every
decoder layer's attention module ``<attn>`` (the Hugging Face module that computes K and V, e.g.
``model.layers.3.self_attn``, BLOOM/Falcon ``transformer.h.3.self_attention``):

- ``<attn>.k_scale``, ``<attn>.v_scale`` float32, ``[1]`` (strategy "tensor") or ``[num_kv_heads]``
  ("head"): :func:`kv_scale` of the max |K| / |V| as they enter the cache (after rotary embedding
  and q/k norms; V after smoothing), over the calibration set. The cache holds ``fp8_e4m3(K / k_scale)``.

The tensor names and meanings are those of compressed-tensors' W8A8-int8 (and of its
``kv_cache_scheme``), so one set of safetensors serves both formats (see ``vllm-smoothquant convert``);
vLLM loads ``<attn>.k_scale`` as the scale of the attention layer ``<attn>.attn``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .rotation import HADAMARD, MATRIX, is_power_of_two

QUANT_METHOD = "smoothquant"
COMPRESSED_TENSORS = "compressed-tensors"  # a compressed-tensors int8 checkpoint, translated (compressed_tensors.py)
FORMAT_VERSION = 3  # the newest version this code reads and writes; each checkpoint gets the oldest that holds it
KV_CACHE_FORMAT_VERSION = 2  # the first version with kv_cache
ROTATION_FORMAT_VERSION = 3  # the first version with rotation
Q_MAX = 127
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
KV_SCALE_MIN = 1e-6  # floor of a KV-cache scale: a head whose K or V was all zeros still gets a valid (> 0) scale

WEIGHT_STRATEGIES = ("channel", "tensor")
WEIGHT_ROUNDINGS = ("nearest", "gptq")  # how the quantizer chose the int8 values; the plugin runs both alike
ACTIVATION_STRATEGIES = ("token", "tensor")  # token: dynamic; tensor: static input_scale
KV_CACHE_DTYPES = ("fp8_e4m3",)
KV_CACHE_STRATEGIES = ("tensor", "head")  # one scale per attention layer, or one per KV head


class FormatError(ValueError):
    """The checkpoint's quantization_config does not follow the SmoothQuant format."""


def _require(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise FormatError(
            f"quantization_config{where} is missing the key {key!r}; re-create the checkpoint "
            f"with `vllm-smoothquant quantize` or add the key to config.json."
        )
    return d[key]


def _check_choice(value: Any, choices: tuple[str, ...], key: str) -> str:
    if value not in choices:
        raise FormatError(f"quantization_config{key} = {value!r} is not supported; use one of {list(choices)}.")
    return value


def _check_int8(d: dict[str, Any], where: str) -> None:
    bits = _require(d, "num_bits", where)
    if bits != 8:
        raise FormatError(f"quantization_config{where}.num_bits = {bits!r}; SmoothQuant format v1 is int8 only (8).")
    if d.get("symmetric", True) is not True:
        raise FormatError(f"quantization_config{where}.symmetric must be true: format v1 has no zero points.")


@dataclass(frozen=True)
class WeightScheme:
    """int8 symmetric weights; one scale per output channel ("channel") or per tensor ("tensor")."""

    strategy: str = "channel"
    num_bits: int = 8
    symmetric: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WeightScheme":
        _check_int8(d, "['weights']")
        strategy = _check_choice(_require(d, "strategy", "['weights']"), WEIGHT_STRATEGIES, "['weights']['strategy']")
        return cls(strategy=strategy)


@dataclass(frozen=True)
class ActivationScheme:
    """int8 symmetric activations: dynamic per token / per tensor, or static per tensor (``input_scale``)."""

    strategy: str = "token"
    dynamic: bool = True
    num_bits: int = 8
    symmetric: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "['activations']") -> "ActivationScheme":
        if not isinstance(d, dict):
            raise FormatError(f"quantization_config{where} must be an object like {asdict(cls())}.")
        _check_int8(d, where)
        strategy = _check_choice(_require(d, "strategy", where), ACTIVATION_STRATEGIES, where + "['strategy']")
        dynamic = _require(d, "dynamic", where)
        if not isinstance(dynamic, bool):
            raise FormatError(f"quantization_config{where}['dynamic'] must be true or false, got {dynamic!r}.")
        if strategy == "token" and not dynamic:
            raise FormatError(
                f"quantization_config{where}: static activation scales are per tensor; "
                "set strategy to 'tensor' or dynamic to true."
            )
        if strategy == "tensor" and dynamic:
            raise FormatError(
                f"quantization_config{where}: dynamic per-tensor activations are not supported by vLLM's int8 "
                "kernels (dynamic is per token, static is per tensor); use strategy 'token' or dynamic false."
            )
        return cls(strategy=strategy, dynamic=dynamic)


def kv_scale(absmax):
    """The fp8 e4m3 KV-cache scale for a max |K| or |V| (a float32 tensor of any shape): ``absmax / 448``,
    at least :data:`KV_SCALE_MIN`, so the largest calibrated value maps to e4m3's largest finite value."""
    return (absmax.float() / FP8_E4M3_MAX).clamp(min=KV_SCALE_MIN)


@dataclass(frozen=True)
class KVCacheScheme:
    """Calibrated 8-bit KV cache: ``dtype`` of the cache, one scale per layer ("tensor") or per KV head ("head")."""

    dtype: str = "fp8_e4m3"
    strategy: str = "tensor"

    @classmethod
    def from_dict(cls, d: Any, where: str = "['kv_cache']") -> "KVCacheScheme":
        if not isinstance(d, dict):
            raise FormatError(f"quantization_config{where} must be null or an object like {asdict(cls())}.")
        unknown = sorted(set(d) - {"dtype", "strategy"})
        if unknown:
            raise FormatError(f"quantization_config{where} has unknown key(s) {unknown}; it takes 'dtype' and "
                              "'strategy'.")
        return cls(
            dtype=_check_choice(_require(d, "dtype", where), KV_CACHE_DTYPES, where + "['dtype']"),
            strategy=_check_choice(_require(d, "strategy", where), KV_CACHE_STRATEGIES, where + "['strategy']"),
        )


@dataclass(frozen=True)
class RotationScheme:
    """Linears whose input is rotated by a block-diagonal Hadamard matrix (``rotation.py``)."""

    targets: tuple[str, ...]  # module-name suffixes, e.g. ("mlp.down_proj",)
    block_size: int = 256
    type: str = HADAMARD
    matrix: str = MATRIX

    @classmethod
    def from_dict(cls, d: Any, where: str = "['rotation']") -> "RotationScheme":
        if not isinstance(d, dict):
            raise FormatError(f"quantization_config{where} must be null or an object like "
                              f"{{'type': 'hadamard', 'matrix': 'sylvester', 'block_size': 256, 'targets': ['mlp.down_proj']}}.")
        unknown = sorted(set(d) - {"type", "matrix", "block_size", "targets"})
        if unknown:
            raise FormatError(f"quantization_config{where} has unknown key(s) {unknown}; it takes 'type', 'matrix', "
                              "'block_size' and 'targets'.")
        _check_choice(_require(d, "type", where), (HADAMARD,), where + "['type']")
        _check_choice(_require(d, "matrix", where), (MATRIX,), where + "['matrix']")
        block = _require(d, "block_size", where)
        if not is_power_of_two(block):
            raise FormatError(f"quantization_config{where}['block_size'] = {block!r} must be a power of two.")
        targets = _require(d, "targets", where)
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise FormatError(f"quantization_config{where}['targets'] must be a non-empty list of module-name "
                              "suffixes, e.g. ['mlp.down_proj'].")
        return cls(targets=tuple(targets), block_size=block)

    def block_for(self, module: str) -> int | None:
        """The block size if the module named ``module`` is rotated, else None."""
        return self.block_size if any(_matches(module, t) for t in self.targets) else None


def _matches(module: str, key: str) -> bool:
    return module == key or module.endswith("." + key)


def matches_ignore(module: str, entry: str) -> bool:
    """An ``ignore`` entry names ``module``: the exact dotted name, or ``re:PATTERN`` matched at the start of the
    name (``re.match``), as compressed-tensors and vLLM's compressed-tensors support read ``ignore``."""
    return bool(re.match(entry[3:], module)) if entry.startswith("re:") else module == entry


@dataclass(frozen=True)
class Calibration:
    source: str = ""
    num_samples: int = 0
    seq_len: int = 0


@dataclass(frozen=True)
class SmoothQuantFormat:
    """The validated ``quantization_config`` of a SmoothQuant checkpoint."""

    weights: WeightScheme = field(default_factory=WeightScheme)
    activations: ActivationScheme = field(default_factory=ActivationScheme)
    alpha: float | str | None = 0.5  # a number, "auto" (per group, see `alphas`) or None (not smoothed)
    alphas: dict[str, float] = field(default_factory=dict)  # "<layer>.<group>" -> alpha, for alpha "auto"
    smoothed: bool = True
    ignore: tuple[str, ...] = ("lm_head",)
    activation_overrides: dict[str, ActivationScheme] = field(default_factory=dict)  # module-name suffix -> scheme
    calibration: Calibration = field(default_factory=Calibration)
    kv_cache: KVCacheScheme | None = None  # None: the KV cache is not calibrated (16-bit, or fp8 with scale 1.0)
    weight_rounding: str = "nearest"  # optional (absent: nearest); informational, same tensors and meaning
    rotation: RotationScheme | None = None  # None: no linear's input is rotated
    quant_method: str = QUANT_METHOD  # COMPRESSED_TENSORS: translated from a compressed-tensors config, not written
    # compressed-tensors only: the rotation's matrix under each rotated linear, "<scheme>_input" (checked, unused)
    rotation_tensor: str | None = None

    @property
    def compressed_tensors(self) -> bool:
        """Translated from a compressed-tensors checkpoint's config (``compressed_tensors.py``)."""
        return self.quant_method == COMPRESSED_TENSORS

    @property
    def scale_dtypes(self) -> tuple[str, ...]:
        """safetensors dtypes accepted for weight / input / KV-cache scales. This format writes float32;
        compressed-tensors writes them in the model's dtype by default (llm-compressor: bf16 / fp16), which
        widen to float32 exactly, as stock vLLM loads them."""
        return ("F32", "BF16", "F16") if self.compressed_tensors else ("F32",)

    def is_ignored(self, module: str) -> bool:
        """``module`` (a dotted checkpoint name) is kept unquantized by ``ignore``."""
        return any(matches_ignore(module, entry) for entry in self.ignore)

    @property
    def format_version(self) -> int:
        """The oldest format version that holds this config (so older readers keep loading what they can)."""
        if self.rotation is not None:
            return ROTATION_FORMAT_VERSION
        return KV_CACHE_FORMAT_VERSION if self.kv_cache is not None else 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SmoothQuantFormat":
        if not isinstance(d, dict):
            raise FormatError(f"quantization_config must be a JSON object, got {type(d).__name__}.")
        method = _require(d, "quant_method", "")
        if method != QUANT_METHOD:
            raise FormatError(f"quantization_config['quant_method'] is {method!r}, expected {QUANT_METHOD!r}.")
        version = _require(d, "format_version", "")
        if isinstance(version, bool) or version not in range(1, FORMAT_VERSION + 1):
            raise FormatError(
                f"quantization_config['format_version'] = {version!r} is not supported by this version of "
                f"vllm-smoothquant (it reads versions 1 to {FORMAT_VERSION}); upgrade vllm-smoothquant or re-quantize."
            )
        kv_cache = d.get("kv_cache")
        if kv_cache is not None and version < KV_CACHE_FORMAT_VERSION:
            raise FormatError(
                f"quantization_config['kv_cache'] needs format_version {KV_CACHE_FORMAT_VERSION} (this config says "
                f"{version}); set format_version to {KV_CACHE_FORMAT_VERSION} or re-quantize."
            )
        rotation = d.get("rotation")
        if rotation is not None and version < ROTATION_FORMAT_VERSION:
            raise FormatError(
                f"quantization_config['rotation'] needs format_version {ROTATION_FORMAT_VERSION} (this config says "
                f"{version}); set format_version to {ROTATION_FORMAT_VERSION} or re-quantize."
            )
        ignore = d.get("ignore", [])
        if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
            raise FormatError("quantization_config['ignore'] must be a list of module names.")
        alpha = d.get("alpha")
        if alpha is not None and alpha != "auto" and not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise FormatError(f"quantization_config['alpha'] = {alpha!r} must be a number in [0, 1], 'auto' or null.")
        alphas = d.get("alphas") or {}
        if not isinstance(alphas, dict) or not all(isinstance(v, (int, float)) for v in alphas.values()):
            raise FormatError("quantization_config['alphas'] must map '<layer>.<group>' to numbers.")
        overrides = d.get("activation_overrides") or {}
        if not isinstance(overrides, dict) or not all(isinstance(k, str) and k for k in overrides):
            raise FormatError("quantization_config['activation_overrides'] must map module-name suffixes to schemes.")
        cal = d.get("calibration") or {}
        return cls(
            weights=WeightScheme.from_dict(_require(d, "weights", "")),
            activations=ActivationScheme.from_dict(_require(d, "activations", "")),
            alpha=alpha,
            alphas=dict(alphas),
            smoothed=bool(d.get("smoothed", True)),
            ignore=tuple(ignore),
            activation_overrides={
                k: ActivationScheme.from_dict(v, f"['activation_overrides'][{k!r}]") for k, v in overrides.items()
            },
            calibration=Calibration(
                source=str(cal.get("source", "")),
                num_samples=int(cal.get("num_samples", 0)),
                seq_len=int(cal.get("seq_len", 0)),
            ),
            kv_cache=None if kv_cache is None else KVCacheScheme.from_dict(kv_cache),
            weight_rounding=_check_choice(d.get("weight_rounding", "nearest"), WEIGHT_ROUNDINGS,
                                          "['weight_rounding']"),
            rotation=None if rotation is None else RotationScheme.from_dict(rotation),
        )

    def activations_for(self, module: str) -> ActivationScheme:
        """The activation scheme of the module named ``module`` (e.g. ``model.layers.0.mlp.down_proj``)."""
        keys = [k for k in self.activation_overrides if _matches(module, k)]
        return self.activation_overrides[max(keys, key=len)] if keys else self.activations

    def to_dict(self) -> dict[str, Any]:
        if self.compressed_tensors:
            raise FormatError("a config translated from compressed-tensors is served, never written as a "
                              "SmoothQuant config; quantize the model with `vllm-smoothquant quantize` instead.")
        d = asdict(self)
        d["ignore"] = list(self.ignore)
        if d["kv_cache"] is None:
            del d["kv_cache"]  # a version-1 config, as version-1 readers know it
        if d["rotation"] is None:
            del d["rotation"]  # version 1/2 readers know no rotation
        else:
            d["rotation"]["targets"] = list(self.rotation.targets)
        # Keys first that a reader looks for first.
        return {"quant_method": d.pop("quant_method"), "format_version": self.format_version, **d}
