"""What the smoothing guard (offline/guard.py) costs: its seconds beside the whole quantize run, on random models.

    python benchmarks/guard_cost.py --out FILE.json [--arch LlamaForCausalLM] [--hidden 1024] [--layers 8] \
        [--num-samples 32] [--seq-len 256] [--alpha A]

Builds a random model of ``--arch`` (tests/tiny_models.py's config with outliers, bf16 on disk), quantizes it with the
defaults (α auto, down_proj rotation, per-token activations; ``--alpha A``: a fixed α, no search, the
cheapest run and so the guard's largest share) on the project's calibration text, and reads
``report.json``'s ``smoothing_guard.seconds`` (the guard's copies and forwards, timed inside the run) against the
run's ``calibrate_smooth_quantize_seconds``. Writes {provenance, command, model bytes, seconds, guard seconds, share}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_models import calib_text, save_tiny  # noqa: E402


def main() -> int:
    from vllm_smoothquant.offline import harness
    from vllm_smoothquant.offline.options import QuantizeOptions
    from vllm_smoothquant.offline.pipeline import quantize

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--arch", default="LlamaForCausalLM")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--alpha", type=float, default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = save_tiny(args.arch, root / "model", hidden=args.hidden, layers=args.layers, heads=args.heads,
                          kv_heads=args.heads // 2)
        size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        calib = calib_text(root / "calib.txt", words=args.num_samples * args.seq_len * 2)
        quantize(str(model), root / "sq", calib, QuantizeOptions(num_samples=args.num_samples, seq_len=args.seq_len,
                                                                 alpha=args.alpha))
        report = json.loads((root / "sq" / "smoothquant" / "report.json").read_text())
    total, guard = report["calibrate_smooth_quantize_seconds"], report["smoothing_guard"]["seconds"]
    result = {"provenance": harness.provenance(), "command": "python " + shlex.join(sys.argv),
              "arch": args.arch, "alpha": args.alpha or "auto", "model_bytes_bf16": size, "quantize_seconds": total, "guard_seconds": guard,
              "guard_share": round(guard / total, 4),
              "guard_errors": [x["error"] for x in report["smoothing_guard"]["layers"]]}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "provenance"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
