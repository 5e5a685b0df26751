"""``vllm-smoothquant``: quantize | eval | convert | inspect | demo.

    vllm-smoothquant quantize MODEL_DIR OUTPUT_DIR --calib FILE [--num-samples N] [--seq-len L]
        [--alpha A] [--no-smooth] [--device auto|cpu|cuda] [--dtype bfloat16|float16] ...
    vllm-smoothquant eval MODEL --text FILE [--quantization smoothquant] [--windows N] [--seq-len L] [--json]
    vllm-smoothquant convert SRC DST [--overwrite]
    vllm-smoothquant inspect CKPT [--plot-dir DIR [--plot-layers 0,5]]
    vllm-smoothquant demo        # the README's main job on the embedded SmolLM2-135M
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def _alpha(v: str) -> float | str:
    from .options import parse_alpha  # the one alpha check lives there

    return parse_alpha(v)


def _positive(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} must be >= 1")
    return n


def _layer_list(v: str) -> list[int]:
    try:
        layers = [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        layers = []
    if not layers or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"{v!r} is not a comma list of layer indices >= 0, e.g. 0,5")
    return layers


def _checkpoint_dir(v: str) -> Path:
    p = Path(v)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{v!r} does not exist; pass a checkpoint directory")
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{v!r} is not a directory; pass a checkpoint directory")
    if not (p / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{v!r} has no config.json: not a model checkpoint directory")
    return p


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _model_ref(v: str) -> str:
    """A local model directory (with config.json), or what can only be a Hugging Face hub id."""
    p = Path(v).expanduser()
    if p.exists():
        return str(_checkpoint_dir(str(p)))
    if not _HUB_ID.fullmatch(v):
        raise argparse.ArgumentTypeError(f"model directory {v!r} does not exist")
    return v


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
    q.add_argument("--alpha", type=_alpha, default=None, help="migration strength in [0, 1], or 'auto' (searched per group); default: auto with per-token "
                        "activations, the family's alpha (0.5 OPT/BLOOM/Falcon, 0.8 others) with static ones")
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
    q.add_argument("--device", default="auto",
                   help="auto (default: cuda when torch sees a CUDA device, else cpu), cpu, cuda or cuda:N")
    q.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16", help="dtype of unquantized parts")
    q.add_argument("--kv-cache", choices=["none", "fp8"], default="none",
                   help="fp8: also calibrate K/V and write fp8 (e4m3) KV-cache scales; vLLM then runs an fp8 KV "
                        "cache by itself (default none: 16-bit KV cache)")
    q.add_argument("--kv-cache-scales", choices=["tensor", "head"], default="tensor",
                   help="one KV-cache scale per layer (default) or one per KV head (used by FlashAttention 3; "
                        "other backends take their max)")
    q.add_argument("--offload-activations", choices=["cpu", "disk"], default=None,
                   help="keep the calibration activations in host memory (cpu) or in files beside OUTPUT_DIR (disk) "
                        "instead of on --device, when they do not fit there")
    q.add_argument("--weight-rounding", choices=["nearest", "gptq"], default="nearest",
                   help="how the int8 weight values are chosen for the same scales: nearest (default) or gptq "
                        "(GPTQ error compensation on the calibration inputs of each smoothed layer; slower)")
    q.add_argument("--gptq-damp", type=float, default=None, metavar="D",
                   help="with --weight-rounding gptq: damping, a fraction in (0, 1) of mean(diag H) (default 0.01)")
    q.add_argument("--gptq-act-order", action="store_true",
                   help="with --weight-rounding gptq: quantize columns in order of descending diag(H)")
    q.add_argument("--rotate", choices=["down_proj", "none"], default=None,
                   help="down_proj: rotate the MLP output projection's input (down_proj; OPT fc2, BLOOM/Falcon "
                        "dense_4h_to_h) by a block-diagonal Hadamard matrix, folded into its weight offline and "
                        "applied to its input at run time (default: down_proj for dense models with smoothing on; "
                        "none for MoE models and --no-smooth)")
    q.add_argument("--rotate-block", type=_positive, default=None, metavar="B",
                   help="Hadamard block size, a power of two dividing the MLP's intermediate size and each tensor-"
                        "parallel shard of it (default 256, or the largest power of two <= 256 dividing it)")
    q.add_argument("--keep-16bit", action="append", default=[], metavar="PATTERN",
                   help="leave the decoder linears whose full module name matches this shell-style glob in --dtype "
                        "(e.g. '*.mlp.down_proj', 'model.layers.0.*'; repeatable): written unquantized, listed in "
                        "the checkpoint's ignore, served by vLLM unquantized; fused q/k/v and gate/up: all or none")
    q.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")

    e = sub.add_parser("eval", help="perplexity of a model on a text, through vLLM")
    e.add_argument("model", type=_model_ref, help="model directory (or hub id)")
    e.add_argument("--text", required=True, help=".txt file to evaluate on")
    e.add_argument("--quantization", default=None, help="e.g. smoothquant (auto-detected from config.json)")
    e.add_argument("--windows", type=_positive, default=32, help="number of windows (default 32)")
    e.add_argument("--seq-len", type=_positive, default=512, help="tokens per window (default 512)")
    e.add_argument("--dtype", default=None, help="activation dtype (default: fp32 on CPU, the model's on CUDA)")
    e.add_argument("--enforce-eager", action="store_true", help="skip torch.compile/CUDA graphs (faster start; always on CPU)")
    e.add_argument("--kv-cache-dtype", default=None,
                   help="vLLM's KV-cache dtype, e.g. fp8 or bfloat16 (default auto: fp8 for a checkpoint with "
                        "calibrated KV-cache scales, else the model's dtype)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--verbose", action="store_true", help="show vLLM's log here (default: written to a file)")

    c = sub.add_parser("convert", help="rewrite a SmoothQuant checkpoint as compressed-tensors (stock vLLM loads it)")
    c.add_argument("src", type=_checkpoint_dir, help="SmoothQuant checkpoint directory")
    c.add_argument("dst", help="where to write the compressed-tensors checkpoint")
    c.add_argument("--overwrite", action="store_true", help="replace DST if it exists")

    i = sub.add_parser("inspect", help="print a checkpoint's format, per-layer alpha and scales; plot smoothing")
    i.add_argument("ckpt", type=_checkpoint_dir, help="SmoothQuant checkpoint directory (only read)")
    i.add_argument("--plot-dir", type=Path, default=None, metavar="DIR",
                   help="write a PNG per layer of per-channel max |X| before/after smoothing here (default: no plots)")
    i.add_argument("--plot-layers", type=_layer_list, default=None, metavar="N[,N...]",
                   help="comma list of layer indices to plot into --plot-dir (default 0)")

    d = sub.add_parser("demo", help="the main job on the embedded SmolLM2-135M: quantize, serve, compare perplexity")
    d.add_argument("--verbose", action="store_true", help="show vLLM's log here (default: written to a file)")
    return p


def _quantize(args) -> int:
    from .api import quantize  # the Python API: one definition of the options, by these flags' names
    from .report import gib

    options = {k: v for k, v in vars(args).items() if k not in ("command", "model_dir", "output_dir", "calib",
                                                                 "overwrite")}
    r = quantize(args.model_dir, args.output_dir, args.calib, overwrite=args.overwrite, **options)
    per_expert = [g for g in r.groups if isinstance(getattr(g, "tokens", None), int)]  # MoE: one expert's up->down
    if r.groups:
        print(f"{'layer':>5} {'group':>8} {'alpha':>5} {'max|X| before':>14} {'after':>10}")
        for g in r.groups:
            if g not in per_expert:
                print(f"{g.layer:>5} {g.group:>8} {g.alpha:>5.2f} {g.act_max_before:>14.2f} {g.act_max_after:>10.2f}")
    _print_experts(per_expert)
    print(f"{'layer':>5} {'seconds':>8} {'peak RSS GiB':>13} {'peak CUDA GiB':>14}")
    for x in r.layers:
        print(f"{x.layer:>5} {x.seconds:>8.2f} {gib(x.peak_rss_bytes):>13} {gib(x.peak_cuda_bytes):>14}")
    _print_rounding(Path(r.output))
    print(f"weights: {r.loading}\ncalibration activations: {r.activations}\n{r.rotation}")
    peak = f"peak memory {gib(r.peak_rss_bytes)} GiB RSS"
    if r.peak_cuda_bytes is not None:
        peak += f", {gib(r.peak_cuda_bytes)} GiB CUDA"
    print(f"wrote {r.output} ({r.output_bytes / 2**20:.1f} MiB) in {r.seconds:.1f} s on {r.device}; {peak}")
    return 0


def _print_experts(groups) -> None:
    """Per MoE layer, one line for its experts' up -> down groups: calibration tokens per expert, fallbacks."""
    by_layer: dict[int, list] = {}
    for g in groups:
        by_layer.setdefault(g.layer, []).append(g)
    for layer, gs in by_layer.items():
        tokens = sorted(g.tokens for g in gs)
        fallbacks = [g.group for g in gs if g.fallback]
        print(f"{layer:>5} experts: up->down smoothed in {len(gs) - len(fallbacks)} of {len(gs)}; calibration tokens "
              f"per expert min {tokens[0]}, median {tokens[len(tokens) // 2]}, max {tokens[-1]}"
              + (f"; left unsmoothed (too few tokens): {', '.join(fallbacks)}" if fallbacks else ""))


def _print_rounding(out: Path) -> None:
    """The weight rounding's mean output error per linear, from the run's report.json (written with gptq)."""
    from .export import STATS_DIR

    rounding = json.loads((out / STATS_DIR / "report.json").read_text()).get("weight_rounding", {})
    if rounding.get("method") != "gptq":
        return
    means = rounding["mean_output_error"]
    print(f"weight rounding: gptq (damp {rounding['damp']:g}, act-order {'on' if rounding['act_order'] else 'off'}); "
          "relative output error ||XW' - XQ'||^2 / ||XW'||^2 on the calibration inputs, mean over layers:")
    print(f"{'linear':>18} {'nearest':>10} {'gptq':>10} {'gptq/nearest':>13}")
    for name, m in means.items():
        ratio = f"{m['gptq'] / m['nearest']:.3f}" if m["nearest"] > 0 else "-"
        print(f"{name:>18} {m['nearest']:>10.3e} {m['gptq']:>10.3e} {ratio:>13}")


def _eval(args) -> int:
    import os

    from transformers import AutoTokenizer

    from .calibration import token_windows
    from .harness import make_llm, quiet_vllm

    tok = AutoTokenizer.from_pretrained(args.model)
    windows = token_windows(args.text, tok, args.windows, args.seq_len, what="evaluation text")
    log = None
    if not args.verbose:  # before vLLM is imported: its engine processes inherit the setting
        log = quiet_vllm("eval")
        print(f"vLLM's log: {log} (--verbose shows it here)", file=sys.stderr)
    elif args.json:  # stdout carries only the JSON object; vLLM's log goes to stderr
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    from .evaluate import perplexity

    extra = ({"dtype": args.dtype} if args.dtype else {}) | ({"enforce_eager": True} if args.enforce_eager else {}) \
        | ({"kv_cache_dtype": args.kv_cache_dtype} if args.kv_cache_dtype else {})
    llm = make_llm(args.model, args.quantization, log=log, max_model_len=max(2048, args.seq_len + 1), **extra)
    r = perplexity(llm, windows)
    quantization = llm.llm_engine.vllm_config.model_config.quantization  # also when auto-detected
    if args.json:
        cache = llm.llm_engine.vllm_config.cache_config.cache_dtype  # "auto" resolves in the attention layers
        print(json.dumps({"model": args.model, "quantization": quantization, "kv_cache_dtype_arg": str(cache),
                          "text": args.text,
                          "windows": len(windows), "seq_len": args.seq_len, **vars(r)}))
    else:
        print(f"perplexity {r.ppl:.3f} over {r.tokens} tokens ({len(windows)} windows x {args.seq_len})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .signals import Terminated, exit_status, signal_name, terminate_on

    with terminate_on():  # SIGTERM / SIGHUP: the clean-up of Ctrl-C
        try:
            return _run(args)
        except (KeyboardInterrupt, Terminated) as e:
            _stop_engines()
            try:  # after SIGHUP the terminal may be gone
                print(f"vllm-smoothquant {args.command}: stopped by {signal_name(e)}; nothing half-written is left "
                      "behind", file=sys.stderr)
            except OSError:
                pass
            return exit_status(e)


def _stop_engines() -> None:
    """The vLLM engines this command started (eval, demo), shut down now rather than at exit."""
    from .harness import stop_engines  # imports neither vLLM nor torch

    stop_engines()


def _run(args) -> int:
    from vllm_smoothquant.checkpoint import CheckpointError
    from vllm_smoothquant.format import FormatError

    from .assets import MissingAssetError
    from .calibration import CalibrationDataError
    from .export import OutputExistsError
    from .inspect_ckpt import InspectError
    from .mappings import UnsupportedArchitectureError
    from .pipeline import OptionsError
    from .write_errors import OutputWriteError

    try:
        if args.command == "quantize":
            return _quantize(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "inspect":
            from .inspect_ckpt import describe, plot_layers

            if args.plot_layers is not None and args.plot_dir is None:
                raise InspectError("--plot-layers needs --plot-dir DIR: plots are written only where asked.")
            print(describe(args.ckpt))
            if args.plot_dir is not None:
                for path in plot_layers(args.ckpt, args.plot_layers or [0], args.plot_dir):
                    print(f"wrote {path}")
            return 0
        if args.command == "convert":
            from .convert import to_compressed_tensors

            print(f"wrote {to_compressed_tensors(args.src, args.dst, overwrite=args.overwrite)}")
            return 0
        from .demo import run_demo

        return run_demo(verbose=args.verbose)
    except (FormatError, CalibrationDataError, OutputExistsError, UnsupportedArchitectureError, OptionsError,
            InspectError, MissingAssetError, CheckpointError) as e:
        print(f"vllm-smoothquant {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OutputWriteError as e:  # a full disk mid-run: the partial output is already removed
        print(f"vllm-smoothquant {args.command}: error: {e}. Nothing half-written is left behind.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
