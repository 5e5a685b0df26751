"""The main job on the embedded default model (``vllm-smoothquant demo``).

SmolLM2-135M-Instruct -> SmoothQuant W8A8 and naive W8A8 checkpoints (calibrated on convention
speeches) -> served by vLLM with ``quantization="smoothquant"`` -> a short generation and the
perplexity on held-out movie reviews of the unquantized model, naive W8A8 and SmoothQuant W8A8.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict

from . import assets
from .calibration import token_windows
from .evaluate import device_name, make_llm, perplexity
from .pipeline import QuantizeOptions, quantize

CALIB_SAMPLES, CALIB_LEN = 32, 512
EVAL_WINDOWS, EVAL_LEN = 16, 512
PROMPT = "What is the capital of France? Answer in one sentence."


def _generate(llm, tokenizer) -> str:
    from vllm import SamplingParams

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    out = llm.generate([text], SamplingParams(max_tokens=32, temperature=0.0), use_tqdm=False)
    return out[0].outputs[0].text.strip()


def run_demo() -> int:
    import torch
    import vllm
    from transformers import AutoTokenizer

    base = assets.smollm2_dir()
    calib, heldout = assets.calibration_text(), assets.heldout_text()
    work = assets.cache_dir() / "demo"
    variants = {"naive W8A8": (False, work / "smollm2-naive-w8a8"), "SmoothQuant W8A8": (True, work / "smollm2-sq")}
    for name, (smooth, path) in variants.items():
        print(f"== quantize: {name} -> {path}")
        quantize(str(base), path, calib, QuantizeOptions(smooth=smooth, num_samples=CALIB_SAMPLES,
                                                         seq_len=CALIB_LEN), overwrite=True)

    tok = AutoTokenizer.from_pretrained(base)
    windows = token_windows(heldout, tok, EVAL_WINDOWS, EVAL_LEN)
    rows = []
    runs = [("unquantized", str(base), None)] + [(n, str(p), "smoothquant") for n, (_, p) in variants.items()]
    for name, model, quant in runs:
        print(f"== vLLM: {name} ({model}, quantization={quant})")
        t = time.perf_counter()
        llm = make_llm(model, quant)
        if quant and name.startswith("SmoothQuant"):
            print(f"\nGeneration ({name}, greedy):\n  Q: {PROMPT}\n  A: {_generate(llm, tok)}\n")
        r = perplexity(llm, windows)
        dtype = str(llm.llm_engine.vllm_config.model_config.dtype).removeprefix("torch.")
        rows.append({"model": name, "quantization": quant, "activation_dtype": dtype, **asdict(r),
                     "seconds": round(time.perf_counter() - t, 1)})
        del llm
        gc.collect()

    print(f"\nPerplexity on held-out text ({heldout.name}, {EVAL_WINDOWS} x {EVAL_LEN} tokens), through vLLM:")
    print(f"| {'model':<20} | {'activations':<11} | {'perplexity':>10} |")
    print(f"|{'-' * 22}|{'-' * 13}|{'-' * 12}|")
    for r in rows:
        print(f"| {r['model']:<20} | {r['activation_dtype']:<11} | {r['ppl']:>10.3f} |")
    result = {
        "date": time.strftime("%Y-%m-%d"), "device": device_name(),
        "vllm": vllm.__version__, "torch": torch.__version__, "calibration": f"{calib.name} {CALIB_SAMPLES}x{CALIB_LEN}",
        "heldout": f"{heldout.name} {EVAL_WINDOWS}x{EVAL_LEN}", "rows": rows,
    }
    (work / "results.json").write_text(json.dumps(result, indent=2))
    print(f"\nresults: {work / 'results.json'}")
    return 0
