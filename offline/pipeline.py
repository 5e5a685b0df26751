"""The quantize pipeline: config check -> calibration data -> model -> absmax -> smooth -> int8 -> export."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from vllm_smoothquant.format import ActivationScheme, Calibration, SmoothQuantFormat, WeightScheme

from .calibration import collect_input_absmax, token_windows
from .export import check_output_dir, directory_size, write_checkpoint
from .mappings import DEFAULT_GROUPS, ArchMapping, SmoothGroup, mapping_for
from .quantization import quantize_weight, static_input_scale
from .alpha_search import search_alpha
from .smoothing import apply_smoothing, repeat_for_query_heads, share_across_query_heads, smoothing_scales, weight_absmax

AUTO_ALPHA_ROWS = 512  # input rows per group kept for --alpha auto

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class OptionsError(ValueError):
    pass


@dataclass(frozen=True)
class QuantizeOptions:
    """Validated once, here; the CLI maps its flags 1:1 onto these fields."""

    alpha: float | str | None = None  # None: the architecture's default; "auto": searched per group
    smooth: bool = True
    groups: tuple[str, ...] | None = None  # None: the norm -> linear groups (qkv, gate_up / fc1)
    weights: str = "channel"  # channel | tensor
    activations: str = "token"  # token (dynamic per token) | static (calibrated per tensor)
    num_samples: int = 128
    seq_len: int = 512
    device: str = "cpu"
    dtype: str = "bfloat16"
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        if self.alpha is not None and self.alpha != "auto" and not (
            isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0
        ):
            raise OptionsError(f"--alpha {self.alpha} is outside [0, 1]; the paper uses 0.5 (OPT) to 0.85 (Llama).")
        if self.weights not in ("channel", "tensor"):
            raise OptionsError(f"--weights {self.weights!r}: use 'channel' or 'tensor'.")
        if self.activations not in ("token", "static"):
            raise OptionsError(f"--activations {self.activations!r}: use 'token' or 'static'.")
        if self.num_samples < 1 or self.seq_len < 2:
            raise OptionsError("--num-samples must be >= 1 and --seq-len >= 2.")
        if self.dtype not in ("bfloat16", "float16"):
            raise OptionsError(f"--dtype {self.dtype!r}: use bfloat16 or float16.")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise OptionsError(f"--device {self.device!r}: use cpu or cuda.")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise OptionsError("--device cuda but torch sees no CUDA device; use --device cpu.")

    def activation_scheme(self) -> ActivationScheme:
        if self.activations == "static":
            return ActivationScheme(strategy="tensor", dynamic=False)
        return ActivationScheme(strategy="token", dynamic=True)


@dataclass
class GroupReport:
    layer: int
    group: str
    alpha: float
    act_max_before: float
    act_max_after: float


@dataclass
class QuantizeReport:
    output: str
    seconds: float
    output_bytes: int
    groups: list[GroupReport] = field(default_factory=list)


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def decoder_linears(model: nn.Module, mapping: ArchMapping) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside the decoder layers, by full module name."""
    layers = _get(model, mapping.layers)
    return {
        f"{mapping.layers}.{i}.{n}": m
        for i, layer in enumerate(layers)
        for n, m in layer.named_modules()
        if isinstance(m, nn.Linear)
    }


def select_groups(mapping: ArchMapping, names: tuple[str, ...] | None) -> list[SmoothGroup]:
    known = {g.name: g for g in mapping.groups}
    if names is None:
        return [g for g in mapping.groups if g.name in DEFAULT_GROUPS]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise OptionsError(f"unknown smoothing group(s) {unknown}; this architecture has {list(known)}.")
    return [known[n] for n in names]


def _group_scales(a, w, alpha: float, group: SmoothGroup, heads: int, kv_heads: int):
    """(s_prev, s_in): s for prev's output channels and for the linears' input channels."""
    if group.attention_heads:
        share = lambda t: share_across_query_heads(t, heads, kv_heads)  # noqa: E731
        s_prev = smoothing_scales(share(a), share(w), alpha)
        return s_prev, repeat_for_query_heads(s_prev, heads, kv_heads)
    s = smoothing_scales(a, w, alpha)
    return s, s


@torch.no_grad()
def smooth_model(
    model: nn.Module,
    mapping: ArchMapping,
    groups: list[SmoothGroup],
    act_absmax: dict[str, torch.Tensor],
    alpha: float | str,
    samples: dict[str, torch.Tensor] | None = None,
    opts: "QuantizeOptions | None" = None,
) -> tuple[dict[str, torch.Tensor], list[GroupReport]]:
    """Apply smoothing to ``model`` in place; return the input absmax after smoothing and a report.

    After smoothing a group's input is X / s, so its new absmax is ``act_absmax / s`` exactly.
    ``alpha="auto"`` searches alpha per group on ``samples`` (see ``alpha_search``) for the
    activation and weight schemes of ``opts``.
    """
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    after = dict(act_absmax)
    reports = []
    layers = _get(model, mapping.layers)
    todo = [(i, layer, g) for i, layer in enumerate(layers) for g in groups]
    for i, layer, g in tqdm(todo, desc="smoothing", unit="group", disable=alpha != "auto"):
        key = f"{mapping.layers}.{i}.{g.linears[0]}"
        linears = [_get(layer, n) for n in g.linears]
        w = weight_absmax(linears)
        a = act_absmax[key].to(w.device)
        group_alpha = alpha
        if alpha == "auto":
            x = samples[key].to(w.device)
            group_alpha, _ = search_alpha(
                lambda al: _group_scales(a, w, al, g, heads, kv_heads)[1], x, [lin.weight for lin in linears], a,
                opts.activations, opts.weights,
            )
        s_prev, s_in = _group_scales(a, w, group_alpha, g, heads, kv_heads)
        apply_smoothing(_get(layer, g.prev), linears, s_prev, s_in)
        for n in g.linears:
            after[f"{mapping.layers}.{i}.{n}"] = act_absmax[f"{mapping.layers}.{i}.{n}"] / s_in.cpu()
        reports.append(GroupReport(i, g.name, group_alpha, float(a.max()), float(after[key].max())))
    return after, reports


def quantize_state_dict(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    act_absmax: dict[str, torch.Tensor],
    opts: QuantizeOptions,
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: int8 weights + fp32 scales for ``linears``, the rest in ``opts.dtype``."""
    dtype = DTYPES[opts.dtype]
    quantized = {f"{n}.weight" for n in linears}
    sd: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name not in quantized:
            sd[name] = (t.to(dtype) if t.is_floating_point() else t).cpu()
    for name, lin in tqdm(linears.items(), desc="quantizing", unit="linear"):
        q, scale = quantize_weight(lin.weight, opts.weights)
        sd[f"{name}.weight"], sd[f"{name}.weight_scale"] = q.cpu(), scale.cpu()
        if opts.activations == "static":
            sd[f"{name}.input_scale"] = static_input_scale(act_absmax[name])
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # tied to the embedding; loaders re-tie it
    return sd


def load_model(model_dir: str, device: str):
    """fp32 on CPU (fast, exact statistics); bf16 on CUDA (memory). Returns (model, gen_config)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        gen = None
    return model, gen


def quantize(
    model_dir: str, output_dir: str | Path, calib: str | Path, opts: QuantizeOptions, overwrite: bool = False
) -> QuantizeReport:
    from transformers import AutoConfig, AutoTokenizer

    start = time.perf_counter()
    out = Path(output_dir)
    check_output_dir(out, overwrite)
    mapping = mapping_for(AutoConfig.from_pretrained(model_dir))
    groups = select_groups(mapping, opts.groups) if opts.smooth else []
    alpha = mapping.default_alpha if opts.alpha is None else opts.alpha

    tok = AutoTokenizer.from_pretrained(model_dir)
    windows = token_windows(calib, tok, opts.num_samples, opts.seq_len)  # bad data fails before the weights load
    model, gen = load_model(model_dir, opts.device)
    linears = decoder_linears(model, mapping)
    # Naive W8A8 with dynamic activations uses no statistics: skip the forward passes.
    needs_stats = bool(groups) or opts.activations == "static"
    samples = None
    if alpha == "auto" and groups:
        absmax, samples = collect_input_absmax(model, linears, windows, opts.device, sample_rows=AUTO_ALPHA_ROWS)
    else:
        absmax = collect_input_absmax(model, linears, windows, opts.device) if needs_stats else {}
    after, reports = smooth_model(model, mapping, groups, absmax, alpha, samples, opts)
    sd = quantize_state_dict(model, linears, after, opts)

    fmt = SmoothQuantFormat(
        weights=WeightScheme(strategy=opts.weights),
        activations=opts.activation_scheme(),
        alpha=alpha if groups else None,
        alphas={f"{r.layer}.{r.group}": r.alpha for r in reports} if alpha == "auto" else {},
        smoothed=bool(groups),
        ignore=opts.ignore,
        calibration=Calibration(source=Path(calib).name, num_samples=len(windows), seq_len=opts.seq_len),
    )
    model.config.dtype = DTYPES[opts.dtype]
    stats = {f"{k}.before": v for k, v in absmax.items()} | {f"{k}.after": v for k, v in after.items()}
    report = {"groups": [vars(r) for r in reports], "smooth_groups": [g.name for g in groups]}
    path = write_checkpoint(
        out, state_dict=sd, config=model.config, fmt=fmt, tokenizer=tok, generation_config=gen,
        stats=stats, report=report, overwrite=overwrite,
    )
    return QuantizeReport(str(path), time.perf_counter() - start, directory_size(path), reports)
