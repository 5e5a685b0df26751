"""The Python API: ``from vllm_smoothquant import quantize``.

:func:`quantize`'s keyword options are the CLI's ``quantize`` flags, by the same names (``--num-samples`` ->
``num_samples``) with the same words (``activations="static"``, ``kv_cache="fp8"``) and the same defaults: its
signature is the one definition of the options. The CLI parses its flags and calls this function; both build
:class:`~vllm_smoothquant.offline.options.QuantizeOptions` through :func:`build_options`, so a bad value is the
same :class:`OptionsError`, with the same message, from either.

    from vllm_smoothquant import quantize
    report = quantize("./Llama-3-8B", "./llama3-8b-sq", "calib.txt", alpha="auto", kv_cache="fp8")
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from .options import ACTIVATION_SCHEMES, OptionsError, QuantizeOptions, kv_cache_scheme, parse_override
from .report import QuantizeReport


def quantize(
    model_dir: str | Path,
    output_dir: str | Path,
    calib: str | Path,
    *,
    overwrite: bool = False,
    num_samples: int = 128,
    seq_len: int = 512,
    batch_size: int = 1,
    alpha: float | Literal["auto"] | None = None,
    no_smooth: bool = False,
    smooth_groups: str | Sequence[str] | None = None,
    weights: Literal["channel", "tensor"] = "channel",
    activations: Literal["token", "static"] = "token",
    activation_override: Mapping[str, str] | Sequence[str] = (),
    device: str = "auto",
    dtype: Literal["bfloat16", "float16"] = "bfloat16",
    kv_cache: Literal["none", "fp8"] = "none",
    kv_cache_scales: Literal["tensor", "head"] = "tensor",
    offload_activations: Literal["cpu", "disk"] | None = None,
    weight_rounding: Literal["nearest", "gptq"] = "nearest",
    gptq_damp: float | None = None,
    gptq_act_order: bool = False,
    rotate: Literal["down_proj", "none"] | None = None,
    rotate_block: int | None = None,
    keep_16bit: Sequence[str] = (),
) -> QuantizeReport:
    """Calibrate, smooth and quantize ``model_dir`` (a Hugging Face directory or hub id) into a W8A8 checkpoint.

    ``calib``: a ``.txt`` or ``.jsonl`` calibration file. ``output_dir`` must not exist unless ``overwrite``.
    Every other keyword is the CLI flag of the same name (``docs/CLI.md``): ``alpha`` a number in [0, 1] or
    ``"auto"`` (None: ``"auto"`` with per-token activations, the family's alpha with static ones); ``rotate``
    ``"down_proj"`` or ``"none"`` (None: down_proj for dense families with smoothing on); ``smooth_groups`` a comma string or a list (None: all of the family);
    ``activation_override`` ``{"down_proj": "token"}`` or ``["down_proj=token"]``; ``device`` ``"auto"`` (CUDA
    when torch sees one, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. Returns the run's report (also in
    ``OUTPUT_DIR/smoothquant/report.json``); a bad option raises :class:`OptionsError` before anything is read.
    """
    options = {name: value for name, value in locals().items() if name in OPTION_NAMES}
    opts = build_options(**options)
    if device == "auto":
        print(f"device: {opts.device} (--device auto: {_why(opts.device)})", file=sys.stderr)
    from .pipeline import quantize as run  # torch, transformers: imported only when a run starts

    return run(model_dir, output_dir, calib, opts, overwrite=overwrite)


OPTION_NAMES = tuple(p.name for p in inspect.signature(quantize).parameters.values()
                     if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "overwrite")
DEFAULTS = {name: inspect.signature(quantize).parameters[name].default for name in OPTION_NAMES}


def flag(name: str) -> str:
    """``num_samples`` -> ``--num-samples``: the option's CLI flag."""
    return "--" + name.replace("_", "-")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a CUDA device, else ``cpu``; any other word is kept (checked later)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _why(device: str) -> str:
    return "torch sees a CUDA device" if device.startswith("cuda") else "torch sees no CUDA device"


def build_options(**words: Any) -> QuantizeOptions:
    """The options by their CLI names and words (missing ones take :data:`DEFAULTS`) -> QuantizeOptions."""
    unknown = sorted(set(words) - set(OPTION_NAMES))
    if unknown:
        raise OptionsError(f"unknown quantize option(s) {unknown}; the options are {list(OPTION_NAMES)}.")
    w = {**DEFAULTS, **words}
    for name in ("num_samples", "seq_len", "batch_size"):
        if isinstance(w[name], bool) or not isinstance(w[name], int):
            raise OptionsError(f"{flag(name)} {w[name]!r}: use a whole number >= 1.")
    if w["activations"] not in ACTIVATION_SCHEMES:
        raise OptionsError(f"--activations {w['activations']!r}: use token (dynamic per token) or static "
                           "(calibrated per tensor).")
    from vllm_smoothquant.format import WeightScheme

    return QuantizeOptions(
        alpha=_alpha(w["alpha"]),
        smooth=not w["no_smooth"],
        groups=_groups(w["smooth_groups"]),
        weights=WeightScheme(strategy=w["weights"]),
        activations=ACTIVATION_SCHEMES[w["activations"]],
        activation_overrides=_overrides(w["activation_override"]),
        num_samples=w["num_samples"],
        seq_len=w["seq_len"],
        batch_size=w["batch_size"],
        device=resolve_device(w["device"]),
        dtype=w["dtype"],
        offload_activations=w["offload_activations"],
        kv_cache=kv_cache_scheme(w["kv_cache"], w["kv_cache_scales"]),
        weight_rounding=w["weight_rounding"],
        gptq_damp=w["gptq_damp"],
        gptq_act_order=w["gptq_act_order"],
        rotate=w["rotate"],
        rotate_block=w["rotate_block"],
        keep_16bit=(w["keep_16bit"],) if isinstance(w["keep_16bit"], str) else tuple(w["keep_16bit"]),
    )


def _alpha(alpha):
    """A number, ``"auto"`` or None; a numeric string is read as the CLI reads it (range checked by QuantizeOptions)."""
    if isinstance(alpha, str) and alpha != "auto":
        try:
            return float(alpha)
        except ValueError:
            raise OptionsError(f"--alpha {alpha!r} is not a number in [0, 1] or 'auto'.") from None
    return alpha


def _groups(groups) -> tuple[str, ...] | None:
    if groups is None:
        return None
    names = groups.split(",") if isinstance(groups, str) else list(groups)
    if not all(isinstance(g, str) for g in names):
        raise OptionsError(f"--smooth-groups {groups!r}: use a comma list of group names, e.g. qkv,gate_up.")
    return tuple(g.strip() for g in names if g.strip()) or None


def _overrides(overrides) -> dict:
    """``{"down_proj": "token"}`` or ``["down_proj=token"]`` (the CLI's repeated flag) -> suffix -> scheme."""
    items = [f"{k}={v}" for k, v in overrides.items()] if isinstance(overrides, Mapping) else overrides
    if isinstance(items, str):
        items = [items]
    return dict(parse_override(str(x)) for x in items)
