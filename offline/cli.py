"""``vllm-smoothquant``: quantize | eval | convert | inspect | demo.

    vllm-smoothquant quantize MODEL_DIR OUTPUT_DIR --calib FILE [--num-samples N] [--seq-len L]
        [--alpha A] [--no-smooth] [--device cpu|cuda] [--dtype bfloat16|float16] ...
    vllm-smoothquant eval MODEL --text FILE [--quantization smoothquant] [--windows N] [--seq-len L] [--json]
    vllm-smoothquant demo        # the README's main job on the embedded SmolLM2-135M
"""

from __future__ import annotations

import argparse
import json
import sys


def _alpha(v: str) -> float | str:
    if v == "auto":
        return v
    try:
        a = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not a number") from None
    if not 0.0 <= a <= 1.0:
        raise argparse.ArgumentTypeError(f"{a} is outside [0, 1] (the paper uses 0.5 for OPT, ~0.8 for Llama)")
    return a


def _override(v: str) -> tuple[str, str]:
    from .pipeline import OptionsError

    key, sep, scheme = v.partition("=")
    if not sep:
        raise OptionsError(f"--activation-override {v!r}: use MODULE=token or MODULE=static, e.g. down_proj=token.")
    return key.strip(), scheme.strip()


def _positive(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} must be >= 1")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-smoothquant", description="SmoothQuant W8A8 checkpoints for vLLM.")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="calibrate, smooth and quantize a HF causal LM to a W8A8 checkpoint")
    q.add_argument("model_dir", help="Hugging Face model directory (or hub id)")
    q.add_argument("output_dir", help="where to write the checkpoint (must not exist unless --overwrite)")
    q.add_argument("--calib", required=True, help=".txt (plain text, cut into windows) or .jsonl (field 'text')")
    q.add_argument("--num-samples", type=_positive, default=128, help="calibration windows (default 128)")
    q.add_argument("--seq-len", type=_positive, default=512, help="tokens per window (default 512)")
    q.add_argument("--batch-size", type=_positive, default=1,
                   help="calibration windows of equal length per forward (default 1; more costs activation memory)")
    q.add_argument("--alpha", type=_alpha, default=None, help="migration strength in [0, 1], or 'auto' (searched per group); default: per family")
    q.add_argument("--no-smooth", action="store_true", help="naive W8A8 baseline: same quantization, no migration")
    q.add_argument(
        "--smooth-groups", default=None,
        help="comma list of smoothing groups (default: all of the family: qkv,gate_up,o,down for Llama; qkv,fc1,o,fc2 for OPT)",
    )
    q.add_argument("--weights", choices=["channel", "tensor"], default="channel", help="weight scale granularity")
    q.add_argument("--activations", choices=["token", "static"], default="token",
                   help="token: dynamic per-token (default); static: calibrated per-tensor input_scale")
    q.add_argument("--activation-override", action="append", default=[], metavar="MODULE=token|static",
                   help="another activation scheme for modules whose name ends with MODULE, e.g. down_proj=token "
                        "with --activations static (repeatable; fused q/k/v and gate/up must agree)")
    q.add_argument("--device", default="cpu", help="cpu or cuda")
    q.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16", help="dtype of unquantized parts")
    q.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")

    e = sub.add_parser("eval", help="perplexity of a model on a text, through vLLM")
    e.add_argument("model")
    e.add_argument("--text", required=True, help=".txt file to evaluate on")
    e.add_argument("--quantization", default=None, help="e.g. smoothquant (auto-detected from config.json)")
    e.add_argument("--windows", type=_positive, default=32, help="number of windows (default 32)")
    e.add_argument("--seq-len", type=_positive, default=512, help="tokens per window (default 512)")
    e.add_argument("--dtype", default=None, help="activation dtype (default: fp32 on CPU, the model's on CUDA)")
    e.add_argument("--enforce-eager", action="store_true", help="skip torch.compile/CUDA graphs (faster start; always on CPU)")
    e.add_argument("--json", action="store_true", help="print one JSON object")

    c = sub.add_parser("convert", help="rewrite a SmoothQuant checkpoint as compressed-tensors (stock vLLM loads it)")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--to", choices=["compressed-tensors"], default="compressed-tensors")
    c.add_argument("--overwrite", action="store_true")

    i = sub.add_parser("inspect", help="print a checkpoint's format, per-layer alpha and scales; plot smoothing")
    i.add_argument("ckpt")
    i.add_argument("--plot-layers", default="0", help="comma list of layer indices to plot (default 0)")
    i.add_argument("--plot-dir", default=None, help="where to write PNGs (default CKPT/smoothquant/plots)")

    sub.add_parser("demo", help="the main job on the embedded SmolLM2-135M: quantize, serve, compare perplexity")
    return p


def _quantize(args) -> int:
    from .pipeline import QuantizeOptions, quantize

    opts = QuantizeOptions(
        alpha=args.alpha,
        smooth=not args.no_smooth,
        groups=tuple(g.strip() for g in args.smooth_groups.split(",") if g.strip()) if args.smooth_groups else None,
        weights=args.weights,
        activations=args.activations,
        activation_overrides=dict(_override(v) for v in args.activation_override),
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
    )
    r = quantize(args.model_dir, args.output_dir, args.calib, opts, overwrite=args.overwrite)
    if r.groups:
        print(f"{'layer':>5} {'group':>8} {'alpha':>5} {'max|X| before':>14} {'after':>10}")
        for g in r.groups:
            print(f"{g.layer:>5} {g.group:>8} {g.alpha:>5.2f} {g.act_max_before:>14.2f} {g.act_max_after:>10.2f}")
    peak = f"peak memory {r.peak_rss_bytes / 2**30:.2f} GiB RSS"
    if r.peak_cuda_bytes is not None:
        peak += f", {r.peak_cuda_bytes / 2**30:.2f} GiB CUDA"
    print(f"wrote {r.output} ({r.output_bytes / 2**20:.1f} MiB) in {r.seconds:.1f} s; {peak}")
    return 0


def _eval(args) -> int:
    import os

    if args.json:  # stdout carries only the JSON object; vLLM's logs go to stderr
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    from transformers import AutoTokenizer

    from .calibration import token_windows
    from .evaluate import make_llm, perplexity

    tok = AutoTokenizer.from_pretrained(args.model)
    windows = token_windows(args.text, tok, args.windows, args.seq_len)
    extra = ({"dtype": args.dtype} if args.dtype else {}) | ({"enforce_eager": True} if args.enforce_eager else {})
    llm = make_llm(args.model, args.quantization, max_model_len=max(2048, args.seq_len + 1), **extra)
    r = perplexity(llm, windows)
    quantization = llm.llm_engine.vllm_config.model_config.quantization  # also when auto-detected
    if args.json:
        print(json.dumps({"model": args.model, "quantization": quantization, "text": args.text,
                          "windows": len(windows), "seq_len": args.seq_len, **vars(r)}))
    else:
        print(f"perplexity {r.ppl:.3f} over {r.tokens} tokens ({len(windows)} windows x {args.seq_len})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vllm_smoothquant.format import FormatError

    from .calibration import CalibrationDataError
    from .export import OutputExistsError
    from .inspect_ckpt import MissingStatsError
    from .mappings import UnsupportedArchitectureError
    from .pipeline import OptionsError

    try:
        if args.command == "quantize":
            return _quantize(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "inspect":
            from pathlib import Path

            from .inspect_ckpt import describe, plot_layers

            print(describe(Path(args.ckpt)))
            if json.loads((Path(args.ckpt) / "config.json").read_text())["quantization_config"].get("smoothed"):
                plot_dir = Path(args.plot_dir) if args.plot_dir else Path(args.ckpt) / "smoothquant" / "plots"
                for path in plot_layers(Path(args.ckpt), [int(x) for x in args.plot_layers.split(",")], plot_dir):
                    print(f"wrote {path}")
            return 0
        if args.command == "convert":
            from .convert import to_compressed_tensors

            print(f"wrote {to_compressed_tensors(args.src, args.dst, overwrite=args.overwrite)}")
            return 0
        from .demo import run_demo

        return run_demo()
    except (FormatError, CalibrationDataError, OutputExistsError, UnsupportedArchitectureError, OptionsError,
            MissingStatsError) as e:
        print(f"vllm-smoothquant {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
