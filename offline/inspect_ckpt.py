"""``vllm-smoothquant inspect CKPT``: what a SmoothQuant checkpoint holds, and plots of its smoothing.

Prints the format, the smoothing groups with their alpha and max |X| before/after, and weight-scale
statistics; on request (``--plot-dir``), writes a PNG per chosen layer of the per-channel activation
absmax before/after smoothing of every smoothed group (from ``smoothquant/stats.safetensors``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from safetensors import safe_open

from vllm_smoothquant.format import FormatError, SmoothQuantFormat

from .export import STATS_DIR
from .mappings import SmoothGroup


class InspectError(ValueError):
    """The checkpoint cannot give what was asked, or the plots cannot be written."""


class MissingStatsError(InspectError):
    """The checkpoint has no smoothing statistics for what was asked to plot."""


def _format(ckpt: Path) -> tuple[dict, SmoothQuantFormat]:
    path = ckpt / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}).") from None
    if "quantization_config" not in cfg:
        raise FormatError(f"{path} has no quantization_config: not a SmoothQuant checkpoint.")
    return cfg, SmoothQuantFormat.from_dict(cfg["quantization_config"])


def describe(ckpt: Path) -> str:
    ckpt = Path(ckpt)
    cfg, fmt = _format(ckpt)
    lines = [
        f"{ckpt}: {cfg.get('architectures', ['?'])[0]}, SmoothQuant format v{fmt.format_version}",
        f"  weights: int8 per {fmt.weights.strategy}, rounded {fmt.weight_rounding}; activations: int8 "
        + ("dynamic per token" if fmt.activations.dynamic else "static per tensor (input_scale)")
        + "".join(f"; {k}: {'dynamic per token' if v.dynamic else 'static per tensor'}"
                  for k, v in fmt.activation_overrides.items()),
        f"  smoothed: {fmt.smoothed}, alpha: {fmt.alpha}, ignore: {list(fmt.ignore)}",
        f"  calibration: {fmt.calibration.source} ({fmt.calibration.num_samples} x {fmt.calibration.seq_len} tokens)",
    ]
    if fmt.rotation is not None:
        lines.append(f"  rotation: input of {', '.join(fmt.rotation.targets)} by blockdiag({fmt.rotation.type} "
                     f"{fmt.rotation.matrix}, {fmt.rotation.block_size}), folded into the weight")
    if fmt.kv_cache is not None:
        lines.append(f"  KV cache: {fmt.kv_cache.dtype}, one scale per "
                     + ("KV head" if fmt.kv_cache.strategy == "head" else "attention layer"))
    report = ckpt / STATS_DIR / "report.json"
    if report.is_file():
        groups = json.loads(report.read_text())["groups"]
        if groups:
            lines.append(f"  {'layer':>5} {'group':>8} {'alpha':>6} {'max|X| before':>14} {'after':>9}")
            lines += [f"  {g['layer']:>5} {g['group']:>8} {g['alpha']:>6.2f} {g['act_max_before']:>14.2f} "
                      f"{g['act_max_after']:>9.2f}" for g in groups]
    scales = []
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            scales += [(k, st.get_tensor(k)) for k in st.keys() if k.endswith(".weight_scale")]
    if scales:
        lo = min(s.min().item() for _, s in scales)
        hi = max(s.max().item() for _, s in scales)
        lines.append(f"  {len(scales)} quantized linears; weight_scale range [{lo:.3g}, {hi:.3g}]")
    return "\n".join(lines)


def group_title(group: SmoothGroup) -> str:
    """What a group's linears share: their input, e.g. ``input of self_attn.q_proj/k_proj/v_proj (qkv)``."""
    parents = {n.rpartition(".")[0] for n in group.linears}
    if len(group.linears) > 1 and len(parents) == 1 and "" not in parents:
        names = f"{parents.pop()}." + "/".join(n.rpartition(".")[2] for n in group.linears)
    else:
        names = "/".join(group.linears)
    return f"input of {names} ({group.name})"


def _panels(stats: dict, prefix: str, groups: tuple[SmoothGroup, ...], layer: int) -> list[tuple[str, str]]:
    """(title, stats key prefix) of every smoothed group of ``layer`` (its linears share one input: plot it once)."""
    panels = []
    for g in groups:
        key = f"{prefix}.{layer}.{g.linears[0]}"
        if f"{key}.before" in stats and not stats[f"{key}.before"].equal(stats[f"{key}.after"]):
            panels.append((group_title(g), key))
    return panels


def _writable_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise InspectError(f"--plot-dir {str(out_dir)!r} cannot be written ({e.strerror or e}); "
                           "pass a writable directory.") from None


def plot_layers(ckpt: Path, layers: list[int], out_dir: Path) -> list[Path]:
    """One PNG per layer: per-channel input absmax of each smoothed group, before and after.

    Everything is checked (smoothed checkpoint, statistics, layer indices, a writable ``out_dir``)
    before the first file is written.
    """
    from transformers import AutoConfig

    from .mappings import mapping_for

    ckpt, out_dir = Path(ckpt), Path(out_dir)
    _, fmt = _format(ckpt)
    if not fmt.smoothed:
        raise InspectError(f"{ckpt} was quantized without smoothing (--no-smooth): there is nothing to plot; "
                           "drop --plot-dir.")
    stats_file = ckpt / STATS_DIR / "stats.safetensors"
    if not stats_file.is_file():
        raise MissingStatsError(f"{stats_file} is missing: the checkpoint was written without statistics; "
                                "re-create it with `vllm-smoothquant quantize` to plot smoothing.")
    hf_config = AutoConfig.from_pretrained(ckpt)
    mapping, num_layers = mapping_for(hf_config), hf_config.num_hidden_layers
    if bad := [x for x in layers if not 0 <= x < num_layers]:
        raise InspectError(f"--plot-layers {','.join(map(str, bad))}: out of range; {ckpt} has layers "
                           f"0..{num_layers - 1}.")
    with safe_open(stats_file, "pt") as st:
        stats = {k: st.get_tensor(k) for k in st.keys()}
    panels = {layer: _panels(stats, mapping.layers, mapping.groups, layer) for layer in layers}
    if empty := [layer for layer, p in panels.items() if not p]:
        raise MissingStatsError(f"layer {empty[0]}: no smoothed group in {stats_file}; pick another --plot-layers.")
    _writable_dir(out_dir)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for layer, rows in panels.items():
        fig, axes = plt.subplots(len(rows), 1, figsize=(9, 2.4 * len(rows)), squeeze=False)
        for ax, (title, key) in zip(axes[:, 0], rows):
            ax.plot(stats[f"{key}.before"].numpy(), lw=0.7, label="before smoothing", color="#c44e52")
            ax.plot(stats[f"{key}.after"].numpy(), lw=0.7, label="after", color="#4c72b0")
            ax.set_title(f"layer {layer}: {title}", fontsize=9)
            ax.set_ylabel("max |X|")
            ax.set_yscale("log")
        axes[0, 0].legend(fontsize=8)
        axes[-1, 0].set_xlabel("input channel")
        fig.tight_layout()
        path = out_dir / f"layer{layer}-act-absmax.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
