"""The quantize recipe: check -> open the model -> calibration windows -> per decoder layer: load, record input
absmax, smooth, quantize, write, propagate, free -> metadata.

Layer i runs on the compute device/dtype (fp32 on CPU, bf16 on CUDA); its linears' input absmax is recorded on
the outputs of the already smoothed *and quantized* layers 0..i-1 (so static scales see what the int8 model will
see). Weights are read from the checkpoint one layer at a time and the finished layer's tensors go straight into the
output shards: host memory holds the embeddings (only for the calibration forward), about two layers, and the
calibration activations (on ``--device`` unless offloaded).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from vllm_smoothquant.format import ActivationScheme, Calibration, SmoothQuantFormat

from .alpha_search import BlockProbe
from .calibration import token_windows
from .disk_space import ACTIVATIONS, SLACK, check_free_space, metadata_bytes, tensor_bytes
from .experts import check_expert_schemes, kept_modules
from .export import ShardWriter, atomic_dir, check_output, directory_size, scratch_dir, write_metadata
from .gptq import gptq_quantize_linears, layer_hessians, output_error
from .guard import SmoothingGuard, guard_json
from .keep import full_names, groups_for_layer, kept_linears
from .kv_stats import kv_scale_tensors, record_kv
from .layer_smoothing import smooth_layer
from .loading import Checkpoint, open_checkpoint
from .mappings import ArchMapping, SmoothGroup, attention_heads, layer_linears
from .options import OptionsError, QuantizeOptions, check_against_model
from .quantization import quantize_weight, static_input_scale
from .rotation import fold_rotation, rotated, rotated_absmax, rotated_linears, rotation_scheme
from .report import (
    GroupReport,
    LinearRounding,
    MemoryMeter,
    QuantizeReport,
    gib,
    host_memory_available,
    return_freed_memory_to_os,
    rounding_json,
)
from .streaming import (
    Activations,
    LayerInputs,
    capture_layer_inputs,
    quantized_activations,
    record_inputs,
    run_layer,
    to_compute,
)

__all__ = ["GroupReport", "OptionsError", "QuantizeOptions", "QuantizeReport", "quantize"]

AUTO_ALPHA_ROWS = 512  # --alpha auto, expert groups: input rows per group kept for the group-local search
# --alpha auto, dense groups: the first calibration batches, up to this many tokens (at least one batch), on which
# the quantized layer's output is compared with full precision (len(GRID) layer forwards per group on them)
AUTO_ALPHA_TOKENS = 512


@dataclass(frozen=True)
class Recipe:
    """What happens to every layer, decided and checked before any weights are read."""

    opts: QuantizeOptions
    mapping: ArchMapping
    groups: list[SmoothGroup]
    alpha: float | str
    heads: tuple[int, int]
    fmt: SmoothQuantFormat
    num_layers: int
    tied_lm_head: bool
    rotation_note: str = ""  # what --rotate does to this model, for the report
    kept: dict[int, frozenset[str]] = dataclasses.field(default_factory=dict)  # --keep-16bit: layer -> linears
    moe_layers: frozenset[int] = frozenset()  # MoE models: the layers whose MLP is the MoE block (the rest dense)
    rounding: list[LinearRounding] = dataclasses.field(default_factory=list, compare=False)  # filled per layer (gptq)
    guarded: list[dict] = dataclasses.field(default_factory=list, compare=False)  # per layer: the guard's error, time

    @property
    def gptq(self) -> bool:
        return self.opts.weight_rounding == "gptq"

    @property
    def needs_stats(self) -> bool:
        """Smoothing, a static scale, KV-cache scales or GPTQ (Hessians) need the calibration forwards; naive W8A8
        per token with round to nearest needs none."""
        return bool(self.groups) or self.fmt.kv_cache is not None or self.gptq or any(
            not s.dynamic for s in (self.fmt.activations, *self.fmt.activation_overrides.values()))

    def name(self, i: int, local: str = "") -> str:
        return f"{self.mapping.layers}.{i}" + (f".{local}" if local else "")

    def quantized_linears(self, i: int, layer: nn.Module) -> dict[str, nn.Linear]:
        """Layer i's linears that become int8 (all but those ``--keep-16bit`` keeps)."""
        kept = self.kept.get(i, frozenset())
        return {n: m for n, m in layer_linears(layer).items() if n not in kept}

    def groups_for(self, i: int) -> list[SmoothGroup]:
        """Layer i's smoothing groups: those of its kind (an MoE model's dense or MoE layer), less those
        targeting a linear ``--keep-16bit`` keeps."""
        groups = self.mapping.layer_groups(self.groups, i in self.moe_layers)
        return groups_for_layer(groups, self.kept[i]) if i in self.kept else groups

    def schemes(self, i: int, linears) -> dict[str, ActivationScheme]:
        return {n: self.fmt.activations_for(self.name(i, n)) for n in linears}

    def propagates(self, i: int) -> bool:
        """Layer i's int8-simulated run is needed: its outputs are layer i + 1's inputs, and its K/V give the
        KV-cache scales (the last layer's too)."""
        return self.needs_stats and (i + 1 < self.num_layers or self.fmt.kv_cache is not None)

    def kv_scale_shape(self) -> tuple[int, ...]:
        return (self.heads[1],) if self.fmt.kv_cache.strategy == "head" else (1,)


def default_alpha(opts: QuantizeOptions, mapping: ArchMapping) -> float | str:
    """``--alpha`` when not given: ``auto`` (searched per group) for dynamic per-token activations, where it
    measured best on every held-out text (docs/ACCURACY.md); the family's fixed alpha for static activations,
    where the fixed alpha measured better."""
    return "auto" if opts.activations.dynamic else mapping.default_alpha


def plan(ckpt: Checkpoint, opts: QuantizeOptions) -> Recipe:
    n = len(ckpt.layers)
    first = layer_linears(ckpt.layers[0])
    local = list(dict.fromkeys(name for layer in ckpt.layers for name in layer_linears(layer)))  # dense + MoE layers
    moe_layers = ckpt.mapping.moe.moe_layers(ckpt.config, n) if ckpt.mapping.moe else frozenset()
    groups = check_against_model(opts, ckpt.mapping, n, local)
    out_proj = first.get(ckpt.mapping.mlp_out) if ckpt.mapping.mlp_out else None
    rotation, note = rotation_scheme(opts.rotate, opts.rotate_block, opts.smooth, ckpt.mapping,
                                     ckpt.config.architectures[0], None if out_proj is None else out_proj.in_features)
    kept = kept_linears(opts.keep_16bit, ckpt.mapping, n, local)
    fmt = dataclasses.replace(opts.checkpoint_format(), rotation=rotation)
    fmt = dataclasses.replace(fmt, ignore=fmt.ignore + full_names(kept, ckpt.mapping))
    check_expert_schemes(fmt, ckpt.mapping, n, local)  # MoE experts: dynamic activations only
    fmt = dataclasses.replace(fmt, ignore=fmt.ignore + kept_modules(ckpt.mapping, moe_layers))  # routers unquantized
    return Recipe(opts, ckpt.mapping, groups, default_alpha(opts, ckpt.mapping) if opts.alpha is None else opts.alpha,
                  attention_heads(ckpt.config), fmt, n,
                  bool(getattr(ckpt.config, "tie_word_embeddings", False)), note, kept, moe_layers=moe_layers)


def _storage(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (t.to(dtype) if t.is_floating_point() else t).cpu()


def _storage_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    return dtype if t.is_floating_point() else t.dtype


def output_specs(ckpt: Checkpoint, r: Recipe) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every output tensor's (shape, dtype), in checkpoint order: the non-layer tensors (no lm_head when tied to
    the embeddings), then per layer each linear's int8 weight, scale (and input_scale), then its other tensors."""
    dtype, prefix = r.opts.storage_dtype, r.mapping.layers + "."
    specs = {k: (tuple(v.shape), _storage_dtype(v, dtype)) for k, v in ckpt.model.state_dict().items()
             if not k.startswith(prefix) and not (r.tied_lm_head and k == "lm_head.weight")}
    for i, layer in enumerate(ckpt.layers):
        linears = r.quantized_linears(i, layer)
        for n, scheme in r.schemes(i, linears).items():
            out = linears[n].weight.shape[0]
            specs[f"{r.name(i, n)}.weight"] = (tuple(linears[n].weight.shape), torch.int8)
            specs[f"{r.name(i, n)}.weight_scale"] = ((out, 1) if r.opts.weights.strategy == "channel" else (1,),
                                                     torch.float32)
            if not scheme.dynamic:
                specs[f"{r.name(i, n)}.input_scale"] = ((1,), torch.float32)
        quantized = {f"{n}.weight" for n in linears}
        specs.update({f"{r.name(i, k)}": (tuple(v.shape), _storage_dtype(v, dtype))
                      for k, v in layer.state_dict().items() if k not in quantized})
        if r.fmt.kv_cache is not None:
            specs.update({f"{r.name(i, r.mapping.attention)}.{w}_scale": (r.kv_scale_shape(), torch.float32)
                          for w in ("k", "v")})
    return specs


def expected_writes(ckpt: Checkpoint, r: Recipe, windows: list[list[int]]) -> dict[str, int]:
    """Bytes the run writes beside OUTPUT_DIR, by what (all there at once near the end), known before any weight
    is read: the checkpoint's tensors, its tokenizer/config/statistics, and the activations with --offload-activations
    disk (every batch, plus one being rewritten)."""
    linears = [lin for layer in ckpt.layers for lin in layer_linears(layer).values()]
    stats = sum(2 * lin.weight.shape[1] * 4 for lin in linears)  # float32 absmax before/after per input channel
    need = {"checkpoint tensors": tensor_bytes(output_specs(ckpt, r)),
            "tokenizer, config and statistics": metadata_bytes(ckpt.path) + stats + SLACK}
    if r.needs_stats and r.opts.offload_activations == "disk":
        tokens = sum(len(w) for w in windows) + max(map(len, windows)) * min(r.opts.batch_size, len(windows))
        need[ACTIVATIONS] = tokens * ckpt.config.hidden_size * r.opts.compute_dtype.itemsize + SLACK
    return need


def copy_non_layer_tensors(ckpt: Checkpoint, writer: ShardWriter, r: Recipe) -> None:
    """Embeddings, final norm, lm_head: straight from the checkpoint into the output, in ``--dtype``."""
    prefix = r.mapping.layers + "."
    names = [n for n in writer.where if not n.startswith(prefix)]
    for name, t in ckpt.tensors(names):
        writer.write(name, _storage(t, r.opts.storage_dtype))


@contextmanager
def calibration_inputs(ckpt: Checkpoint, windows: list[list[int]], r: Recipe, out: Path):
    """Layer 0's inputs for every calibration batch (and every layer's call arguments), kept where they fit
    (``--device``, or ``--offload-activations``); None when no statistics are needed."""
    if not r.needs_stats:
        yield None
        return
    opts, compute = r.opts, r.opts.compute_dtype
    tokens = sum(len(w) for w in windows)
    need = tokens * ckpt.config.hidden_size * compute.itemsize
    what = (f"{gib(need)} GiB ({len(windows)} windows, {tokens} tokens x hidden {ckpt.config.hidden_size} x "
            f"{str(compute).removeprefix('torch.')})")
    where = opts.offload_activations or opts.device
    free = (torch.cuda.mem_get_info(torch.device(where))[0] if where.startswith("cuda") else
            host_memory_available() if where == "cpu" else None)
    if free is not None and need > free:
        raise OptionsError(f"the calibration activations need {what} on {where}, where {gib(free)} GiB is free: "
                           "pass --offload-activations " + ("disk" if where == "cpu" else "cpu (host memory) or disk")
                           + ", or fewer --num-samples / a shorter --seq-len.")
    store = Activations(opts.device, opts.offload_activations,
                        scratch_dir(out, "activations") if opts.offload_activations == "disk" else None)
    store.description = f"{what} " + {None: f"on {opts.device}", "cpu": "offloaded to host memory (cpu)",
                                      "disk": f"offloaded to disk ({store.directory})"}[opts.offload_activations]
    print(f"calibration activations: {store.description}", file=sys.stderr)
    try:
        ckpt.load_base()
        try:
            inputs = capture_layer_inputs(ckpt.model, ckpt.layers, windows, opts.device, compute,
                                          r.mapping.layer_returns_tuple, opts.batch_size, store)
        finally:
            ckpt.release_base()
        yield inputs
    finally:
        store.close()


def calibrate(layer: nn.Module, linears: dict[str, nn.Linear], inputs: LayerInputs | None, i: int, r: Recipe):
    """Per linear of the layer: input absmax over all calibration windows; for --alpha auto also input rows (for
    expert groups) and the block probe (the first batches with the layer's full-precision outputs on them); and the
    smoothing guard (the first batch and the layer's full-precision output on it, guard.py), None with nothing to
    smooth."""
    if inputs is None:
        return {}, None, None, None
    auto = r.alpha == "auto" and bool(r.groups)
    rows = AUTO_ALPHA_ROWS if auto and r.mapping.moe is not None else 0
    with record_inputs(linears, rows, len(inputs.hidden)) as (absmax, samples):
        outs = run_layer(layer, inputs.hidden, inputs.kwargs[i])
    probe = BlockProbe.first_batches(inputs.hidden, inputs.kwargs[i], outs, AUTO_ALPHA_TOKENS) if auto else None
    groups = r.groups_for(i)
    guard = SmoothingGuard.before_smoothing(layer, i, r.name(i), groups, inputs.hidden[0], inputs.kwargs[i][0],
                                            outs[0]) if groups else None
    return absmax, samples, probe, guard


def quantize_layer(layer: nn.Module, i: int, linears: dict[str, nn.Linear], schemes: dict[str, ActivationScheme],
                   after: dict[str, torch.Tensor], r: Recipe,
                   hessians: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The layer's output tensors: int8 weights, scales, input scales (static), and its other tensors in ``--dtype``.
    Each linear's weight becomes its dequantized int8 value in place (what the int8 GEMM computes with).
    A linear in ``hessians`` (``--weight-rounding gptq``) gets GPTQ's integers for the same scale, and its output
    error with round to nearest and with GPTQ goes to ``r.rounding``."""
    out = {}
    gptq = gptq_quantize_linears({n: lin.weight for n, lin in linears.items() if n in hessians}, hessians,
                                 r.opts.weights.strategy, r.opts.damp, r.opts.gptq_act_order,
                                 r.name(i) + ".") if hessians else {}
    for name, lin in linears.items():
        q, scale = quantize_weight(lin.weight, r.opts.weights.strategy)
        if name in gptq:
            h, nearest = hessians[name], q
            q, scale = gptq[name]
            r.rounding.append(LinearRounding(i, name, output_error(lin.weight, nearest * scale, h),
                                             output_error(lin.weight, q * scale, h)))
        out[f"{r.name(i, name)}.weight"], out[f"{r.name(i, name)}.weight_scale"] = q.cpu(), scale.cpu()
        if not schemes[name].dynamic:
            out[f"{r.name(i, name)}.input_scale"] = static_input_scale(after[name]).cpu()
        lin.weight.data = q.to(lin.weight.dtype) * scale.to(lin.weight.dtype)
    quantized = {f"{name}.weight" for name in linears}
    out.update({r.name(i, k): _storage(v, r.opts.storage_dtype) for k, v in layer.state_dict().items()
                if k not in quantized})
    return out


def propagate(layer: nn.Module, linears: dict[str, nn.Linear], inputs: LayerInputs, i: int,
              schemes: dict[str, ActivationScheme], input_absmax: dict[str, torch.Tensor],
              r: Recipe) -> dict[str, torch.Tensor]:
    """Run the smoothed layer with int8-simulated weights and activations over every calibration batch; its
    outputs replace ``inputs.hidden`` (the next layer's inputs). With ``--kv-cache fp8``, K and V are recorded
    as they enter the cache in this run (V after v->o smoothing, K after RoPE and int8 q/k/v): returns the
    layer's KV-cache scale tensors (else {})."""
    attention = layer.get_submodule(r.mapping.attention) if r.fmt.kv_cache is not None else None
    with quantized_activations(linears, schemes, input_absmax), \
            (record_kv(attention) if attention is not None else nullcontext()) as kv:
        run_layer(layer, inputs.hidden, inputs.kwargs[i], update=True)
    return {} if kv is None else kv_scale_tensors(r.name(i, r.mapping.attention), kv, r.fmt.kv_cache)


def check_smoothing(guard: SmoothingGuard | None, layer: nn.Module, i: int, reports: list[GroupReport],
                    absmax: dict[str, torch.Tensor], r: Recipe) -> None:
    """The smoothing guard (guard.py): the smoothed layer's full-precision output is the unsmoothed one's, or a
    ``SmoothingGuardError`` naming the layer and the group stops the run before anything of the layer is written."""
    if guard is None:
        return
    error = guard.check(layer, r.groups_for(i), reports, absmax, r.heads, r.opts.storage_dtype)
    r.guarded.append({"layer": i, "error": error, "seconds": guard.seconds})


def process_layer(ckpt: Checkpoint, i: int, r: Recipe, inputs: LayerInputs | None, writer: ShardWriter):
    """Decoder layer i from start to end: load, calibrate, smooth, check, rotate, quantize, write, propagate, free.
    Returns its group reports and statistics."""
    layer = to_compute(ckpt.load_layer(i), r.opts.device, r.opts.compute_dtype)
    linears = r.quantized_linears(i, layer)
    schemes = r.schemes(i, linears)
    blocks = rotated_linears(linears, r.fmt.rotation)
    absmax, samples, probe, guard = calibrate(layer, linears, inputs, i, r)
    after, reports = smooth_layer(layer, i, r.groups_for(i), absmax, r.alpha, r.heads, samples, schemes, r.opts.weights,
                                  r.opts.storage_dtype, probe, blocks)
    del probe
    check_smoothing(guard, layer, i, reports, absmax, r)
    del guard
    for name, block in blocks.items():
        fold_rotation(linears[name], block)
    with rotated(linears, blocks):  # from here on the rotated linears run as vLLM will run them
        if inputs is not None and any(not schemes[n].dynamic for n in blocks):
            after.update(rotated_absmax(layer, {n: linears[n] for n in blocks}, inputs, i))
        hessians = layer_hessians(layer, linears, inputs.hidden, inputs.kwargs[i]) if r.gptq else None  # smoothed
        writer.write_all(quantize_layer(layer, i, linears, schemes, after, r, hessians))
        del hessians
        if r.propagates(i):
            writer.write_all(propagate(layer, linears, inputs, i, schemes, after, r))
    ckpt.release_layer(i)
    stats = {f"{r.name(i, n)}.{k}": v[n].cpu() for n in linears if n in absmax
             for k, v in (("before", absmax), ("after", after))}
    return reports, stats


def quantize(model_dir: str, output_dir: str | Path, calib: str | Path, opts: QuantizeOptions,
             overwrite: bool = False, load: str = "auto") -> QuantizeReport:
    """Calibrate, smooth and quantize decoder layer by decoder layer, writing the checkpoint as it goes.

    ``load``: "auto" reads safetensors layer by layer and falls back to the whole model in memory (no
    safetensors); "lazy" / "memory" force one (tests compare them).
    """
    start = time.perf_counter()
    return_freed_memory_to_os()
    local = Path(model_dir).expanduser()
    out = check_output(output_dir, overwrite, local if local.is_dir() else None)  # before anything loads
    with closing(open_checkpoint(str(model_dir), load)) as ckpt:
        r = plan(ckpt, opts)
        tokenizer, generation = _tokenizer(ckpt.path), _generation_config(ckpt.path)
        windows = token_windows(calib, tokenizer, opts.num_samples, opts.seq_len)  # bad data fails before weights
        check_free_space(out, expected_writes(ckpt, r, windows))  # a full disk too
        meter, groups, stats = MemoryMeter(opts.device), [], {}
        with atomic_dir(out, overwrite) as tmp:
            with ShardWriter(tmp, output_specs(ckpt, r)) as writer:
                copy_non_layer_tensors(ckpt, writer, r)
                with calibration_inputs(ckpt, windows, r, out) as inputs:
                    for i in tqdm(range(r.num_layers), desc="layers", unit="layer"):
                        with meter.layer(i):
                            reports, layer_stats = process_layer(ckpt, i, r, inputs, writer)
                        groups += reports
                        stats.update(layer_stats)
                    activations = inputs.hidden.description if inputs else "none needed (naive W8A8 per token)"
            report = QuantizeReport(str(out), time.perf_counter() - start, 0, groups, meter.layers, loading=ckpt.how,
                                    activations=activations, rotation=r.rotation_note, device=opts.device,
                                    **meter.peaks())
            ckpt.config.dtype = opts.storage_dtype
            write_metadata(tmp, config=ckpt.config, fmt=_final_format(r, groups, calib, len(windows)),
                           tokenizer=tokenizer, generation_config=generation, stats=stats,
                           report=_report_json(report, r))
    return dataclasses.replace(report, seconds=time.perf_counter() - start, output_bytes=directory_size(out))


def _report_json(report: QuantizeReport, r: Recipe) -> dict:
    return {"groups": [vars(g) for g in report.groups], "smooth_groups": [g.name for g in r.groups],
            "device": report.device,
            "calibrate_smooth_quantize_seconds": round(report.seconds, 1), "loading": report.loading,
            "activations": report.activations, "rotation": report.rotation, "peak_rss_bytes": report.peak_rss_bytes,
            "peak_cuda_bytes": report.peak_cuda_bytes, "layers": [vars(x) for x in report.layers],
            "weight_rounding": rounding_json(r.opts.weight_rounding, r.opts.damp, r.opts.gptq_act_order, r.rounding),
            "smoothing_guard": guard_json(r.guarded, r.opts.compute_dtype)}


def _final_format(r: Recipe, groups: list[GroupReport], calib, num_windows: int) -> SmoothQuantFormat:
    return dataclasses.replace(
        r.fmt,
        alpha=r.alpha if r.groups else None,
        alphas={f"{g.layer}.{g.group}": g.alpha for g in groups} if r.alpha == "auto" else {},
        smoothed=bool(r.groups),
        calibration=Calibration(source=Path(calib).name, num_samples=num_windows, seq_len=r.opts.seq_len),
    )


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _generation_config(path: Path):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None
