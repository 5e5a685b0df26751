"""The quantize pipeline: config check -> calibration data -> model -> per layer: absmax, smooth, int8 -> export."""

from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from vllm_smoothquant.format import ActivationScheme, Calibration, SmoothQuantFormat, WeightScheme

from .alpha_search import search_alpha
from .calibration import token_windows
from .export import check_output_dir, directory_size, write_checkpoint
from .mappings import ArchMapping, SmoothGroup, mapping_for
from .quantization import quantize_weight, static_input_scale
from .streaming import capture_layer_inputs, quantized_activations, record_inputs, run_layer, to_compute
from .smoothing import (
    apply_smoothing,
    repeat_for_query_heads,
    share_across_query_heads,
    smoothing_scales,
    storable_norm_scales,
    weight_absmax,
)

AUTO_ALPHA_ROWS = 512  # input rows per group kept for --alpha auto

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class OptionsError(ValueError):
    pass


@dataclass(frozen=True)
class QuantizeOptions:
    """Validated once, here; the CLI maps its flags 1:1 onto these fields."""

    alpha: float | str | None = None  # None: the architecture's default; "auto": searched per group
    smooth: bool = True
    groups: tuple[str, ...] | None = None  # None: every group of the architecture (mappings.py)
    weights: str = "channel"  # channel | tensor
    activations: str = "token"  # token (dynamic per token) | static (calibrated per tensor)
    num_samples: int = 128
    seq_len: int = 512
    batch_size: int = 1  # calibration windows per forward (memory: batch_size x seq_len activations per layer)
    device: str = "cpu"
    dtype: str = "bfloat16"
    ignore: tuple[str, ...] = ("lm_head",)
    # module-name suffix -> "token" | "static", e.g. {"down_proj": "token"} with activations="static"
    activation_overrides: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.alpha is not None and self.alpha != "auto" and not (
            isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0
        ):
            raise OptionsError(f"--alpha {self.alpha} is outside [0, 1]; the paper uses 0.5 (OPT) to 0.85 (Llama).")
        if self.weights not in ("channel", "tensor"):
            raise OptionsError(f"--weights {self.weights!r}: use 'channel' or 'tensor'.")
        if self.activations not in ("token", "static"):
            raise OptionsError(f"--activations {self.activations!r}: use 'token' or 'static'.")
        for key, scheme in self.activation_overrides.items():
            if not key or scheme not in ("token", "static"):
                raise OptionsError(f"--activation-override {key}={scheme}: use MODULE=token or MODULE=static, "
                                   "e.g. down_proj=token.")
        if self.num_samples < 1 or self.seq_len < 2:
            raise OptionsError("--num-samples must be >= 1 and --seq-len >= 2.")
        if self.batch_size < 1:
            raise OptionsError(f"--batch-size {self.batch_size}: use 1 or more windows per forward.")
        if self.dtype not in ("bfloat16", "float16"):
            raise OptionsError(f"--dtype {self.dtype!r}: use bfloat16 or float16.")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise OptionsError(f"--device {self.device!r}: use cpu or cuda.")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise OptionsError("--device cuda but torch sees no CUDA device; use --device cpu.")

    def checkpoint_format(self) -> SmoothQuantFormat:
        """The checkpoint's schemes (alpha and calibration are filled in after quantization)."""
        return SmoothQuantFormat(
            weights=WeightScheme(strategy=self.weights), activations=_scheme(self.activations),
            activation_overrides={k: _scheme(v) for k, v in self.activation_overrides.items()}, ignore=self.ignore,
        )


def _scheme(name: str) -> ActivationScheme:
    return ActivationScheme(strategy="tensor", dynamic=False) if name == "static" else ActivationScheme()


def scheme_name(a: ActivationScheme) -> str:
    return "token" if a.dynamic else "static"


def check_fused_schemes(mapping: ArchMapping, fmt: SmoothQuantFormat, num_layers: int) -> None:
    """Linears that vLLM fuses (those sharing one input: q/k/v, gate/up) need one activation scheme."""
    for g in mapping.groups:
        for i in range(num_layers):
            names = [f"{mapping.layers}.{i}.{n}" for n in g.linears]
            schemes = {n: scheme_name(fmt.activations_for(n)) for n in names}
            if len(set(schemes.values())) > 1:
                raise OptionsError(
                    f"--activation-override gives {schemes} different schemes, but vLLM runs "
                    f"{', '.join(g.linears)} as one fused layer: override all of them or none."
                )


def check_overrides_match(fmt: SmoothQuantFormat, layers: str, num_layers: int, local: list[str]) -> None:
    """Every ``--activation-override`` key must name some decoder linear (a typo would silently do nothing).
    ``local``: the linears' names inside one decoder layer, e.g. ``mlp.down_proj``."""
    names = [f"{layers}.{i}.{n}" for i in range(num_layers) for n in local]
    for key in fmt.activation_overrides:
        if not any(n == key or n.endswith("." + key) for n in names):
            raise OptionsError(f"--activation-override {key}=...: no decoder linear's name ends with {key!r}; "
                               f"a decoder layer's linears are {sorted(local)}.")


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
    peak_rss_bytes: int = 0  # this process's peak resident memory
    peak_cuda_bytes: int | None = None  # peak CUDA allocation (--device cuda)


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of one decoder layer, by name inside the layer (e.g. ``self_attn.q_proj``)."""
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


def select_groups(mapping: ArchMapping, names: tuple[str, ...] | None) -> list[SmoothGroup]:
    """``None``: every group of the architecture (norm -> linear pairs and the v->o, up->down / fc1->fc2 pairs)."""
    known = {g.name: g for g in mapping.groups}
    if names is None:
        return list(mapping.groups)
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


def prev_rows(group: SmoothGroup, prev: nn.Module, heads: int, kv_heads: int) -> slice | torch.Tensor | None:
    """The output rows of a fused ``prev`` linear that feed the group (``SmoothGroup.prev_rows``), in the
    order of the group's input channels."""
    out = prev.weight.shape[0]
    if group.prev_rows is None:
        return None
    if group.prev_rows == "qkv:v":  # [q (heads) | k (kv_heads) | v (kv_heads)] x head_dim
        d = out // (heads + 2 * kv_heads)
        return slice((heads + kv_heads) * d, out)
    if group.prev_rows == "qkv:v-per-head":  # per head h: [q_h | k_h | v_h], head_dim rows each
        d = out // (3 * heads)
        return (torch.arange(heads).view(-1, 1) * 3 * d + 2 * d + torch.arange(d)).reshape(-1)
    if group.prev_rows == "gate_up:up":
        return slice(out // 2, out)
    raise ValueError(f"SmoothGroup {group.name!r}: unknown prev_rows {group.prev_rows!r} "
                     "(use 'qkv:v', 'qkv:v-per-head' or 'gate_up:up')")


def attention_heads(config) -> tuple[int, int]:
    """(query heads, kv heads); Falcon-7B's multi_query means one kv head."""
    heads = config.num_attention_heads
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        return heads, 1
    return heads, getattr(config, "num_key_value_heads", None) or heads


@torch.no_grad()
def smooth_layer(
    layer: nn.Module,
    index: int,
    groups: list[SmoothGroup],
    act_absmax: dict[str, torch.Tensor],
    alpha: float | str,
    heads: tuple[int, int],
    samples: dict[str, torch.Tensor] | None = None,
    schemes: dict[str, str] | None = None,
    weights: str = "channel",
    storage: torch.dtype | None = None,
) -> tuple[dict[str, torch.Tensor], list[GroupReport]]:
    """Apply smoothing to one decoder layer in place; return its linears' input absmax after smoothing.

    ``act_absmax`` and ``samples`` are keyed by the linear's name inside the layer. After smoothing a
    group's input is X / s, so its new absmax is ``act_absmax / s`` exactly. ``alpha="auto"``
    searches alpha per group on ``samples`` (see ``alpha_search``) for the layer's activation
    ``schemes`` (local name -> "token" | "static") and the ``weights`` strategy.
    """
    after = dict(act_absmax)
    reports = []
    for g in groups:
        linears = [layer.get_submodule(n) for n in g.linears]
        w = weight_absmax(linears)
        a = act_absmax[g.linears[0]].to(w.device)
        group_alpha = alpha
        if alpha == "auto":
            group_alpha, _ = search_alpha(
                lambda al: _group_scales(a, w, al, g, *heads)[1], samples[g.linears[0]].to(w.device),
                [lin.weight for lin in linears], a, schemes[g.linears[0]], weights,
            )
        s_prev, s_in = _group_scales(a, w, group_alpha, g, *heads)
        prev = layer.get_submodule(g.prev)
        if storage is not None and not isinstance(prev, nn.Linear):
            s_prev = s_in = storable_norm_scales(prev.weight, s_prev.to(prev.weight.device), g.norm_offset, storage)
        apply_smoothing(prev, linears, s_prev, s_in, g.norm_offset, prev_rows(g, prev, *heads))
        for n in g.linears:
            after[n] = act_absmax[n] / s_in.to(act_absmax[n].device)
        reports.append(GroupReport(index, g.name, group_alpha, float(a.max()), float(after[g.linears[0]].max())))
    return after, reports


def load_model(model_dir: str):
    """The model in its storage dtype on CPU (layers move to the compute device one at a time)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()
    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        gen = None
    return model, gen


def _peak_memory(device: str) -> dict[str, int]:
    """Peak resident memory of this process, and peak CUDA allocation when on a GPU (bytes)."""
    peak = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.startswith("cuda"):
        peak["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return peak


def quantize(
    model_dir: str, output_dir: str | Path, calib: str | Path, opts: QuantizeOptions, overwrite: bool = False
) -> QuantizeReport:
    """Calibrate, smooth and quantize decoder layer by decoder layer, then write the checkpoint.

    Layer i is moved to the compute device/dtype (fp32 on CPU, bf16 on CUDA), its linears' input
    absmax recorded on the outputs of the already smoothed *and quantized* layers 0..i-1, smoothed,
    quantized, run once more with int8-simulated weights and activations to make layer i+1's
    inputs, then freed: peak memory is the model in its storage dtype plus one layer.
    """
    from transformers import AutoConfig, AutoTokenizer

    start = time.perf_counter()
    out = Path(output_dir)
    check_output_dir(out, overwrite)
    hf_config = AutoConfig.from_pretrained(model_dir)
    mapping = mapping_for(hf_config)
    base_fmt = opts.checkpoint_format()
    check_fused_schemes(mapping, base_fmt, hf_config.num_hidden_layers)
    groups = select_groups(mapping, opts.groups) if opts.smooth else []
    alpha = mapping.default_alpha if opts.alpha is None else opts.alpha

    tok = AutoTokenizer.from_pretrained(model_dir)
    windows = token_windows(calib, tok, opts.num_samples, opts.seq_len)  # bad data fails before the weights load
    model, gen = load_model(model_dir)
    heads = attention_heads(model.config)
    dtype, compute = DTYPES[opts.dtype], torch.float32 if opts.device == "cpu" else torch.bfloat16
    layers = model.get_submodule(mapping.layers)
    check_overrides_match(base_fmt, mapping.layers, len(layers), list(layer_linears(layers[0])))
    # Naive W8A8 with dynamic activations uses no statistics: skip the forward passes.
    any_static = opts.activations == "static" or "static" in opts.activation_overrides.values()
    needs_stats = bool(groups) or any_static
    inputs = capture_layer_inputs(model, layers, windows, opts.device, compute, mapping.layer_returns_tuple,
                                  opts.batch_size) if needs_stats else None
    rows = AUTO_ALPHA_ROWS if alpha == "auto" and groups else 0

    prefix = f"{mapping.layers}."
    sd = {k: _storage(v, dtype) for k, v in model.state_dict().items() if not k.startswith(prefix)}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # tied to the embedding; loaders re-tie it
    stats: dict[str, torch.Tensor] = {}
    reports: list[GroupReport] = []
    for i, layer in enumerate(tqdm(layers, desc="layers", unit="layer")):
        to_compute(layer, opts.device, compute)
        linears = layer_linears(layer)
        schemes = {n: scheme_name(base_fmt.activations_for(f"{prefix}{i}.{n}")) for n in linears}
        absmax: dict[str, torch.Tensor] = {}
        samples = None
        if needs_stats:
            with record_inputs(linears, rows, len(inputs.hidden)) as (absmax, samples):
                run_layer(layer, inputs.hidden, inputs.kwargs[i])
        after, layer_reports = smooth_layer(layer, i, groups, absmax, alpha, heads, samples, schemes, opts.weights,
                                            dtype)
        reports += layer_reports
        for name, lin in linears.items():
            q, scale = quantize_weight(lin.weight, opts.weights)
            key = f"{prefix}{i}.{name}"
            sd[f"{key}.weight"], sd[f"{key}.weight_scale"] = q.cpu(), scale.cpu()
            if schemes[name] == "static":
                sd[f"{key}.input_scale"] = static_input_scale(after[name]).cpu()
            if needs_stats:
                stats[f"{key}.before"], stats[f"{key}.after"] = absmax[name].cpu(), after[name].cpu()
            lin.weight.data = q.to(lin.weight.dtype) * scale.to(lin.weight.dtype)  # what the int8 GEMM computes with
        quantized = {f"{name}.weight" for name in linears}
        sd.update({f"{prefix}{i}.{k}": _storage(v, dtype) for k, v in layer.state_dict().items() if k not in quantized})
        if needs_stats and i + 1 < len(layers):
            with quantized_activations(linears, schemes, after):
                inputs.hidden = run_layer(layer, inputs.hidden, inputs.kwargs[i])
        layer.to_empty(device="meta")  # free this layer's weights

    fmt = dataclasses.replace(
        base_fmt,
        alpha=alpha if groups else None,
        alphas={f"{r.layer}.{r.group}": r.alpha for r in reports} if alpha == "auto" else {},
        smoothed=bool(groups),
        calibration=Calibration(source=Path(calib).name, num_samples=len(windows), seq_len=opts.seq_len),
    )
    model.config.dtype = dtype
    calib_seconds = time.perf_counter() - start
    peak = _peak_memory(opts.device)
    report = {"groups": [vars(r) for r in reports], "smooth_groups": [g.name for g in groups],
              "calibrate_smooth_quantize_seconds": round(calib_seconds, 1), **peak}
    path = write_checkpoint(
        out, state_dict=sd, config=model.config, fmt=fmt, tokenizer=tok, generation_config=gen,
        stats=stats, report=report, overwrite=overwrite,
    )
    return QuantizeReport(str(path), time.perf_counter() - start, directory_size(path), reports, **peak)


def _storage(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (t.to(dtype) if t.is_floating_point() else t).cpu()
