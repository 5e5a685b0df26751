"""What ``quantize`` is asked to do: :class:`QuantizeOptions`, validated once, at construction.

The CLI maps its flags 1:1 onto the fields; activation and weight schemes are format.py's objects from here on
(the CLI's words ``token`` / ``static`` are looked up once, in :data:`ACTIVATION_SCHEMES`). Checks that need the
model's architecture (smoothing groups, overrides, fused layers) are :func:`check_against_model`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Mapping

import torch

from vllm_smoothquant.format import (
    KV_CACHE_STRATEGIES,
    WEIGHT_ROUNDINGS,
    WEIGHT_STRATEGIES,
    ActivationScheme,
    KVCacheScheme,
    SmoothQuantFormat,
    WeightScheme,
)

from .gptq import DAMP
from .mappings import ArchMapping, SmoothGroup


class OptionsError(ValueError):
    """A quantize input (a flag, the model, the output) is wrong; the message names it and says what to do."""


TOKEN = ActivationScheme()  # dynamic, one scale per token at run time
STATIC = ActivationScheme(strategy="tensor", dynamic=False)  # one calibrated input_scale per tensor
ACTIVATION_SCHEMES = {"token": TOKEN, "static": STATIC}  # the CLI's words for the schemes vLLM's int8 kernels run
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
OFFLOAD = ("cpu", "disk")  # where calibration activations go instead of --device
KV_CACHES = {"none": None, "fp8": "fp8_e4m3"}  # the CLI's --kv-cache words -> format.py's KVCacheScheme.dtype
ROTATIONS = ("down_proj", "none")  # the CLI's --rotate words (down_proj: the MLP output projection of any family)
DEFAULT_ROTATE_BLOCK = 256  # measured best on SmolLM2 (docs/ACCURACY.md); divides 14336 / 8 (Llama-3-8B at TP 8)


def kv_cache_scheme(word: str, strategy: str = "tensor") -> KVCacheScheme | None:
    """``--kv-cache none|fp8`` and ``--kv-cache-scales tensor|head`` -> the checkpoint's KV-cache scheme."""
    if word not in KV_CACHES:
        raise OptionsError(f"--kv-cache {word!r}: use fp8 (calibrated e4m3 scales) or none.")
    if strategy not in KV_CACHE_STRATEGIES:
        raise OptionsError(f"--kv-cache-scales {strategy!r}: use tensor (one scale per layer) or head (per KV head).")
    return None if KV_CACHES[word] is None else KVCacheScheme(dtype=KV_CACHES[word], strategy=strategy)


def activation_scheme(word: str) -> ActivationScheme:
    if word not in ACTIVATION_SCHEMES:
        raise OptionsError(f"activation scheme {word!r}: use token (dynamic per token) or static (calibrated per "
                           "tensor).")
    return ACTIVATION_SCHEMES[word]


def parse_override(text: str) -> tuple[str, ActivationScheme]:
    """``MODULE=token|static`` -> (module-name suffix, scheme)."""
    key, sep, word = (s.strip() for s in text.partition("="))
    if not sep or not key or word not in ACTIVATION_SCHEMES:
        raise OptionsError(f"--activation-override {text!r}: use MODULE=token or MODULE=static, e.g. down_proj=token.")
    return key, ACTIVATION_SCHEMES[word]


def parse_alpha(text: str) -> float | str:
    """``--alpha``: a number in [0, 1] or ``auto`` (an argparse type: a bad value is a usage error)."""
    try:
        value = text if text == "auto" else float(text)
        _check_alpha(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e) if isinstance(e, OptionsError) else f"{text!r} is not a number "
                                         "in [0, 1] or 'auto'") from None
    return value


def _check_alpha(alpha) -> None:
    if alpha is not None and alpha != "auto" and not (
        isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0.0 <= alpha <= 1.0
    ):
        raise OptionsError(f"--alpha {alpha} is outside [0, 1]; the paper uses 0.5 (OPT) to 0.85 (Llama), "
                           "or pass auto.")


@dataclass(frozen=True)
class QuantizeOptions:
    alpha: float | str | None = None  # None: the architecture's default; "auto": searched per group
    smooth: bool = True
    groups: tuple[str, ...] | None = None  # None: every group of the architecture (mappings.py)
    weights: WeightScheme = field(default_factory=WeightScheme)
    activations: ActivationScheme = TOKEN
    activation_overrides: Mapping[str, ActivationScheme] = field(default_factory=dict)  # module suffix -> scheme
    num_samples: int = 128
    seq_len: int = 512
    batch_size: int = 1  # calibration windows per forward (memory: batch_size x seq_len activations per layer)
    device: str = "cpu"
    dtype: str = "bfloat16"  # of the checkpoint's unquantized tensors (embeddings, norms, lm_head)
    offload_activations: str | None = None  # None: calibration activations stay on `device`; "cpu" | "disk"
    kv_cache: KVCacheScheme | None = None  # calibrated fp8 KV-cache scales (None: none written)
    ignore: tuple[str, ...] = ("lm_head",)
    weight_rounding: str = "nearest"  # how the int8 values are chosen (the scales are the same): WEIGHT_ROUNDINGS
    gptq_damp: float | None = None  # --weight-rounding gptq: fraction of mean(diag H) added to H (None: 0.01)
    gptq_act_order: bool = False  # --weight-rounding gptq: columns in order of descending diag(H)
    # None: down_proj where the family allows (dense MLPs) and smoothing is on; "down_proj" | "none"
    rotate: str | None = None
    rotate_block: int | None = None  # Hadamard block size (None: 256, or the largest power of two dividing the input)
    keep_16bit: tuple[str, ...] = ()  # globs over full linear names left in --dtype (offline/keep.py)

    def __post_init__(self):
        _check_alpha(self.alpha)
        if not self.smooth and self.alpha is not None:
            raise OptionsError(f"--alpha {self.alpha} with --no-smooth: alpha is the strength of the smoothing that "
                               "--no-smooth turns off; drop one of the two.")
        if not self.smooth and self.groups is not None:
            raise OptionsError("--smooth-groups with --no-smooth: nothing is smoothed; drop one of the two.")
        if not isinstance(self.weights, WeightScheme) or self.weights.strategy not in WEIGHT_STRATEGIES:
            raise OptionsError(f"--weights {getattr(self.weights, 'strategy', self.weights)!r}: use 'channel' or "
                               "'tensor'.")
        for key, scheme in {"": self.activations, **self.activation_overrides}.items():
            flag = f"--activation-override {key}" if key else "--activations"
            if scheme not in ACTIVATION_SCHEMES.values():
                raise OptionsError(f"{flag}: {scheme!r} is not a scheme vLLM's int8 kernels run; use token (dynamic "
                                   "per token) or static (calibrated per tensor).")
        if any(not k or not isinstance(k, str) for k in self.activation_overrides):
            raise OptionsError("--activation-override: the module name is empty; use MODULE=token|static.")
        if self.num_samples < 1 or self.seq_len < 2:
            raise OptionsError("--num-samples must be >= 1 and --seq-len >= 2.")
        if self.batch_size < 1:
            raise OptionsError(f"--batch-size {self.batch_size}: use 1 or more windows per forward.")
        if self.dtype not in DTYPES:
            raise OptionsError(f"--dtype {self.dtype!r}: use bfloat16 or float16.")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise OptionsError(f"--device {self.device!r}: use auto, cpu or cuda (cuda:N).")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise OptionsError("--device cuda but torch sees no CUDA device; use --device cpu.")
        if self.kv_cache is not None and not isinstance(self.kv_cache, KVCacheScheme):
            raise OptionsError(f"--kv-cache {self.kv_cache!r}: use fp8 or none.")
        if self.offload_activations not in (None, *OFFLOAD):
            raise OptionsError(f"--offload-activations {self.offload_activations!r}: use cpu or disk.")
        self._check_rounding()
        self._check_rotation()
        if not isinstance(self.keep_16bit, tuple) or not all(isinstance(p, str) and p.strip() for p in self.keep_16bit):
            raise OptionsError(f"--keep-16bit {self.keep_16bit!r}: give module-name patterns, e.g. '*.mlp.down_proj'.")
        if self.offload_activations == "cpu" and self.device == "cpu":
            raise OptionsError("--offload-activations cpu with --device cpu: the activations are in host memory "
                               "already; use --offload-activations disk to keep them out of memory.")

    def _check_rounding(self) -> None:
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise OptionsError(f"--weight-rounding {self.weight_rounding!r}: use nearest (round to nearest) or gptq "
                               "(GPTQ error compensation on the calibration inputs; same scales and format).")
        if self.weight_rounding != "gptq":
            given = [f for f, on in (("--gptq-damp", self.gptq_damp is not None),
                                     ("--gptq-act-order", self.gptq_act_order)) if on]
            if given:
                they, them = ("they tune", "them") if len(given) > 1 else ("it tunes", "it")
                raise OptionsError(f"{' and '.join(given)} with --weight-rounding {self.weight_rounding}: {they} "
                                   f"GPTQ, which only runs with --weight-rounding gptq; add that, or drop {them}.")
        d = self.gptq_damp
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d < 1.0):
            raise OptionsError(f"--gptq-damp {d!r} is outside (0, 1): it is the fraction of mean(diag H) added to "
                               "the Hessian's diagonal; 0.01 is the usual value, 0.1 for a Hessian that will not "
                               "invert.")

    def _check_rotation(self) -> None:
        if self.rotate is not None and self.rotate not in ROTATIONS:
            raise OptionsError(f"--rotate {self.rotate!r}: use down_proj (rotate the MLP output projection's input; "
                               "fc2 / dense_4h_to_h in OPT / BLOOM / Falcon) or none.")
        b = self.rotate_block
        if b is not None:
            if self.rotate == "none":
                raise OptionsError(f"--rotate-block {b} with --rotate none: the block size is that of the rotation "
                                   "--rotate none turns off; drop one of the two.")
            if isinstance(b, bool) or not isinstance(b, int) or b < 2 or b & (b - 1):
                raise OptionsError(f"--rotate-block {b!r}: use a power of two >= 2 (e.g. 64, 128, 256), the size of "
                                   "the Hadamard blocks.")

    @property
    def damp(self) -> float:
        """GPTQ's damping: ``gptq_damp``, or GPTQ's usual 0.01."""
        return DAMP if self.gptq_damp is None else float(self.gptq_damp)

    @property
    def storage_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def compute_dtype(self) -> torch.dtype:
        """One decoder layer at a time runs in this dtype: fp32 on CPU, bf16 on CUDA."""
        return torch.float32 if self.device == "cpu" else torch.bfloat16

    def checkpoint_format(self) -> SmoothQuantFormat:
        """The checkpoint's schemes (alpha and calibration are filled in after quantization)."""
        return SmoothQuantFormat(weights=self.weights, activations=self.activations,
                                 activation_overrides=dict(self.activation_overrides), ignore=self.ignore,
                                 kv_cache=self.kv_cache, weight_rounding=self.weight_rounding)


def check_against_model(opts: QuantizeOptions, mapping: ArchMapping, num_layers: int,
                        local_linears: list[str]) -> list[SmoothGroup]:
    """The smoothing groups to apply; refuses overrides that match no linear or split a layer vLLM fuses.

    ``local_linears``: the linears' names inside one decoder layer, e.g. ``mlp.down_proj``.
    """
    fmt = opts.checkpoint_format()
    names = [f"{mapping.layers}.{i}.{n}" for i in range(num_layers) for n in local_linears]
    for key in fmt.activation_overrides:
        if not any(n == key or n.endswith("." + key) for n in names):
            raise OptionsError(f"--activation-override {key}=...: no decoder linear's name ends with {key!r}; "
                               f"a decoder layer's linears are {sorted(local_linears)}.")
    for fused in mapping.fused:  # linears vLLM packs into one layer (q/k/v, gate/up) need one scheme
        for i in range(num_layers):
            schemes = {n: fmt.activations_for(f"{mapping.layers}.{i}.{n}") for n in fused}
            if len(set(schemes.values())) > 1:
                words = {n: next(w for w, s in ACTIVATION_SCHEMES.items() if s == v) for n, v in schemes.items()}
                raise OptionsError(f"--activation-override gives layer {i}'s {words} different schemes, but vLLM runs "
                                   f"{', '.join(fused)} as one fused layer: override all of them or none.")
    if not opts.smooth:
        return []
    known: dict[str, list[SmoothGroup]] = {}  # a name may stand for a dense and an MoE layer's group ("down")
    for g in mapping.groups:
        known.setdefault(g.name, []).append(g)
    unknown = [n for n in opts.groups or () if n not in known]
    if unknown:
        raise OptionsError(f"--smooth-groups: unknown group(s) {unknown}; this architecture has {list(known)}.")
    return list(mapping.groups) if opts.groups is None else [g for n in opts.groups for g in known[n]]
