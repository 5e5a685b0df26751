"""Where a SmoothQuant checkpoint's perplexity loss comes from: the int8 weights vs each linear's int8 activations.

    python benchmarks/error_budget.py CKPT --base MODEL --text FILE [--windows 8] [--seq-len 512] [--out FILE.json]

The checkpoint runs as an fp32 fake-quant model (``tests/reference.py``: its int8 weights dequantized, every
linear's input int8 quantize-dequantized per token or with its static scale) beside the unquantized ``--base``
model, on the same windows of ``--text``. Rows: everything quantized; the same with the activations of one kind of
linear left unquantized (q/k/v, o, gate/up, down); and with no activation quantized (the int8 weights alone).
A row's gain over "everything" is that part's share of the loss (shares need not add up: the errors interact).
fp32 on the CPU: the same math as vLLM's kernels up to accumulation order, not a run through vLLM.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import reference  # noqa: E402

KINDS = {
    "q/k/v": ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value"),
    "o": ("o_proj", "out_proj", "self_attention.dense", "self_attn.dense"),
    "gate/up": ("gate_proj", "up_proj", "gate_up_proj", "fc1", "dense_h_to_4h"),
    "down": ("down_proj", "fc2", "dense_4h_to_h"),
}


@torch.no_grad()
def perplexity(model, windows: list[list[int]]) -> float:
    return math.exp(-torch.cat([reference.prompt_logprobs(model, w) for w in windows]).mean().item())


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_smoothquant.offline.calibration import token_windows
    from vllm_smoothquant.offline.harness import provenance

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", type=Path)
    p.add_argument("--base", required=True, help="the unquantized model the checkpoint was made from")
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--out", type=Path)
    a = p.parse_args()

    windows = token_windows(a.text, AutoTokenizer.from_pretrained(a.base), a.windows, a.seq_len)
    fp = perplexity(AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32).eval(), windows)
    model = reference.load_fake_quant_model(a.ckpt)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, reference.FakeQuantLinear)}

    def row(unquantized: str, keep) -> dict:
        for n, m in linears.items():
            m.quantize_input = not keep(n)
        ppl = perplexity(model, windows)
        r = {"activations_unquantized": unquantized, "perplexity": ppl, "vs_unquantized_pct": (ppl / fp - 1) * 100}
        print(f"{unquantized:28s} {ppl:9.4f}  {r['vs_unquantized_pct']:+.3f} %", flush=True)
        return r

    print(f"{'unquantized model':28s} {fp:9.4f}", flush=True)
    rows = [row("none (everything int8)", lambda n: False)]
    rows += [row(kind, lambda n, s=suffixes: n.endswith(s)) for kind, suffixes in KINDS.items()]
    rows.append(row("all (int8 weights only)", lambda n: True))
    if a.out:
        a.out.write_text(json.dumps({**provenance(), "command": " ".join(sys.argv), "checkpoint": str(a.ckpt),
                                     "base": a.base, "text": str(a.text), "windows": a.windows,
                                     "seq_len": a.seq_len, "unquantized_perplexity": fp, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
