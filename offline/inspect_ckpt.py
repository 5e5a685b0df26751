"""``vllm-smoothquant inspect CKPT``: what a SmoothQuant checkpoint holds, and plots of its smoothing.

Prints the format, the smoothing groups with their alpha and max |X| before/after, and weight-scale
statistics; writes a PNG per chosen layer of per-channel activation absmax before/after smoothing
(from ``smoothquant/stats.safetensors``).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from vllm_smoothquant.format import FormatError, SmoothQuantFormat

from .export import STATS_DIR


class MissingStatsError(ValueError):
    """The checkpoint has no smoothing statistics for what was asked to plot."""


def describe(ckpt: Path) -> str:
    ckpt = Path(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    if "quantization_config" not in cfg:
        raise FormatError(f"{ckpt / 'config.json'} has no quantization_config: not a SmoothQuant checkpoint.")
    fmt = SmoothQuantFormat.from_dict(cfg["quantization_config"])
    lines = [
        f"{ckpt}: {cfg.get('architectures', ['?'])[0]}, SmoothQuant format v{fmt.format_version}",
        f"  weights: int8 per {fmt.weights.strategy}; activations: int8 "
        + ("dynamic per token" if fmt.activations.dynamic else "static per tensor (input_scale)")
        + "".join(f"; {k}: {'dynamic per token' if v.dynamic else 'static per tensor'}"
                  for k, v in fmt.activation_overrides.items()),
        f"  smoothed: {fmt.smoothed}, alpha: {fmt.alpha}, ignore: {list(fmt.ignore)}",
        f"  calibration: {fmt.calibration.source} ({fmt.calibration.num_samples} x {fmt.calibration.seq_len} tokens)",
    ]
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


def plot_layers(ckpt: Path, layers: list[int], out_dir: Path) -> list[Path]:
    """One PNG per layer: per-channel input absmax of each smoothed group, before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats_file = Path(ckpt) / STATS_DIR / "stats.safetensors"
    if not stats_file.is_file():
        raise MissingStatsError(f"{stats_file} is missing: the checkpoint was written without statistics; "
                                "re-create it with `vllm-smoothquant quantize` to plot smoothing.")
    with safe_open(stats_file, "pt") as st:
        stats = {k: st.get_tensor(k) for k in st.keys()}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for layer in layers:
        names = sorted({k.rsplit(".", 1)[0] for k in stats if f".{layer}." in k and k.endswith(".before")})
        smoothed = []
        for n in names:  # q/k/v (gate/up) share one input: plot it once
            b = stats[f"{n}.before"]
            if not b.equal(stats[f"{n}.after"]) and not any(b.equal(stats[f"{m}.before"]) for m in smoothed):
                smoothed.append(n)
        if not smoothed:
            raise MissingStatsError(f"layer {layer}: no smoothed linear in {stats_file}; pick another --plot-layers.")
        fig, axes = plt.subplots(len(smoothed), 1, figsize=(9, 2.4 * len(smoothed)), squeeze=False)
        for ax, n in zip(axes[:, 0], smoothed):
            ax.plot(stats[f"{n}.before"].numpy(), lw=0.7, label="before smoothing", color="#c44e52")
            ax.plot(stats[f"{n}.after"].numpy(), lw=0.7, label="after", color="#4c72b0")
            ax.set_title(f"input of {n}", fontsize=9)
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
