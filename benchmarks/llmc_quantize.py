"""llm-compressor's W8A8 recipe on given token windows -> a compressed-tensors checkpoint (the peer rows of
``benchmarks/accuracy.py``).

Runs in llm-compressor's own virtual environment (``accuracy.py`` creates it and calls this file there as a
subprocess): llm-compressor pins other transformers/compressed-tensors versions than vLLM, so it is a benchmark
dependency, never imported by the project.

    LLMC_PYTHON benchmarks/llmc_quantize.py MODEL OUT --windows windows.json --rounding gptq|rtn [--alpha 0.8]

``windows.json``: a list of token-id lists, the calibration windows ``vllm-smoothquant quantize`` uses
(``offline/calibration.py token_windows``), given to ``oneshot`` as an already tokenized dataset in that order
(no shuffling), so both quantizers see exactly the same tokens. The recipe is the one llm-compressor recommends
for int8 W8A8 (its ``examples/quantization_w8a8_int8``): ``SmoothQuantModifier(smoothing_strength=alpha)`` then
``GPTQModifier(scheme="W8A8", targets="Linear", ignore=["lm_head"])``; ``--rounding rtn`` uses
``QuantizationModifier`` with the same arguments instead (round-to-nearest weights).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--windows", required=True, help="JSON list of token-id lists")
    p.add_argument("--rounding", choices=["gptq", "rtn"], required=True)
    p.add_argument("--alpha", type=float, default=0.8, help="SmoothQuant smoothing_strength (default 0.8)")
    a = p.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    try:
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
    except ImportError:  # older layout
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    windows = json.loads(open(a.windows).read())
    ds = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype="auto")
    tok = AutoTokenizer.from_pretrained(a.model)
    quantizer = GPTQModifier if a.rounding == "gptq" else QuantizationModifier
    recipe = [SmoothQuantModifier(smoothing_strength=a.alpha),
              quantizer(scheme="W8A8", targets="Linear", ignore=["lm_head"])]
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=max(len(w) for w in windows),
            num_calibration_samples=len(windows), shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    model.save_pretrained(a.out, save_compressed=True)
    tok.save_pretrained(a.out)
    print(json.dumps({"llmcompressor": llmcompressor.__version__, "torch": torch.__version__,
                      "transformers": __import__("transformers").__version__,
                      "compressed_tensors": __import__("compressed_tensors").__version__,
                      "recipe": [repr(m) for m in recipe], "windows": len(windows),
                      "seq_len": max(len(w) for w in windows), "oneshot_s": round(seconds, 1),
                      "dtype": str(model.dtype)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
