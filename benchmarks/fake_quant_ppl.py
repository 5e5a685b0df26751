"""fp32 fake-quant perplexity of SmoothQuant checkpoints on the held-out texts, beside the unquantized model.

    python benchmarks/fake_quant_ppl.py CKPT [CKPT ...] --out FILE.json [--windows 16] [--seq-len 512]

Each checkpoint runs as ``tests/reference.py``'s fake-quant model (int8 weights dequantized, every quantized
linear's input int8-rounded per token or with its static scale, a rotated input rotated first: the exact math of
vLLM's int8 kernels up to accumulation order), the unquantized model as SmolLM2-135M-Instruct in fp32, on the same
windows of every held-out text of ``offline/assets.py``. Not through vLLM: for CPUs whose vLLM int8 GEMM is inexact
(AVX2: saturating int16 pair sums). Writes {provenance, command, perplexity per model and text}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from error_budget import perplexity, reference  # noqa: E402  (one perplexity of a fake-quant model)


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_smoothquant.offline import assets
    from vllm_smoothquant.offline.calibration import token_windows
    from vllm_smoothquant.offline.harness import provenance

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    a = p.parse_args()
    base = assets.smollm2_dir()
    tok = AutoTokenizer.from_pretrained(base)
    texts = {k: token_windows(v, tok, a.windows, a.seq_len) for k, v in assets.heldout_texts().items()}
    result = {**provenance(), "command": shlex.join(["python", "benchmarks/fake_quant_ppl.py", *sys.argv[1:]]),
              "windows": a.windows, "seq_len": a.seq_len, "perplexity": {}}
    models = {"unquantized": lambda: AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()}
    models.update({c.name: (lambda c=c: reference.load_fake_quant_model(c)) for c in a.ckpts})
    for name, make in models.items():
        model = make()
        result["perplexity"][name] = {t: perplexity(model, w) for t, w in texts.items()}
        print(name, {t: round(v, 3) for t, v in result["perplexity"][name].items()}, flush=True)
        del model
    a.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
