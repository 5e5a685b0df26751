"""The main job on the embedded default model (``vllm-smoothquant demo``).

SmolLM2-135M-Instruct -> SmoothQuant W8A8 and naive W8A8 checkpoints (calibrated on convention
speeches) -> served by vLLM with ``quantization="smoothquant"`` -> a short generation and the
perplexity on held-out movie reviews of the unquantized model, naive W8A8 and SmoothQuant W8A8.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from dataclasses import asdict

from . import assets
from .calibration import token_windows
from .evaluate import perplexity
from .export import write_text_atomic
from .harness import greedy, make_llm, provenance, quiet_vllm
from .pipeline import GroupReport, QuantizeOptions, quantize

CALIB_SAMPLES, CALIB_LEN = 32, 512
EVAL_WINDOWS, EVAL_LEN = 16, 512
PROMPT = "What is the capital of France? Answer in one sentence."


def _generate(llm, tokenizer) -> str:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    return greedy(llm, [text], 32)[0].text.strip()


def alpha_summary(groups: list[GroupReport], requested: float | str | None, used: float | str | None = None) -> str:
    """One line on the migration strength a quantize run used: the α, or min/median/max of the searched ones.
    ``requested``: what ``--alpha`` said (None: the default); ``used``: the checkpoint's ``alpha`` (a number or
    "auto"; None: as requested)."""
    if not groups:
        return "no smoothing"
    alphas = [g.alpha for g in groups]
    used = requested if used is None else used
    which = "default" if requested is None else "given"
    if used == "auto":
        return (f"α searched per group ({which}; {len(alphas)} groups): min {min(alphas):.2f}, "
                f"median {statistics.median(alphas):.2f}, max {max(alphas):.2f}")
    return f"α = {alphas[0]:g} ({'family default' if requested is None else 'given'}) in all {len(alphas)} " \
           "smoothing groups"


def run_demo(verbose: bool = False) -> int:
    from transformers import AutoTokenizer

    base = assets.smollm2_dir()
    calib, heldout = assets.calibration_text(), assets.heldout_text()
    work = assets.cache_dir() / "demo"
    log = None if verbose else quiet_vllm("demo")  # before vLLM is imported
    variants = {"naive W8A8": (False, work / "smollm2-naive-w8a8"), "SmoothQuant W8A8": (True, work / "smollm2-sq")}
    quantized = []
    for name, (smooth, path) in variants.items():
        print(f"== quantize: {name} -> {path}")
        opts = QuantizeOptions(smooth=smooth, num_samples=CALIB_SAMPLES, seq_len=CALIB_LEN)
        r = quantize(str(base), path, calib, opts, overwrite=True)
        used = json.loads((path / "config.json").read_text())["quantization_config"].get("alpha")
        quantized.append({"model": name, "seconds": round(r.seconds, 1),
                          "alpha": alpha_summary(r.groups, opts.alpha, used)})
        print(f"   {name}: quantized in {r.seconds:.1f} s; {quantized[-1]['alpha']}")

    tok = AutoTokenizer.from_pretrained(base)
    windows = token_windows(heldout, tok, EVAL_WINDOWS, EVAL_LEN)
    rows = []
    runs = [("unquantized", str(base), None)] + [(n, str(p), "smoothquant") for n, (_, p) in variants.items()]
    if log is not None:
        print(f"vLLM's log: {log} (--verbose shows it here)")
    for name, model, quant in runs:
        print(f"== vLLM: {name} ({model}, quantization={quant})")
        t = time.perf_counter()
        llm = make_llm(model, quant, log=log)
        answer = _generate(llm, tok) if quant and name.startswith("SmoothQuant") else None
        if answer is not None:
            print(f"\nGeneration ({name}, greedy):\n  Q: {PROMPT}\n  A: {answer}\n")
        r = perplexity(llm, windows)
        dtype = str(llm.llm_engine.vllm_config.model_config.dtype).removeprefix("torch.")
        rows.append({"model": name, "quantization": quant, "activation_dtype": dtype, **asdict(r),
                     "seconds": round(time.perf_counter() - t, 1),
                     **({"greedy": {"prompt": PROMPT, "answer": answer}} if answer is not None else {})})
        del llm
        gc.collect()

    print(f"\nPerplexity on held-out text ({heldout.name}, {EVAL_WINDOWS} x {EVAL_LEN} tokens), through vLLM:")
    print(f"| {'model':<20} | {'activations':<11} | {'perplexity':>10} |")
    print(f"|{'-' * 22}|{'-' * 13}|{'-' * 12}|")
    for r in rows:
        print(f"| {r['model']:<20} | {r['activation_dtype']:<11} | {r['ppl']:>10.3f} |")
    print(f"\nQuantized on {calib.name} ({CALIB_SAMPLES} x {CALIB_LEN} tokens):")
    for q in quantized:
        print(f"  {q['model']:<20} {q['seconds']:>6.1f} s   {q['alpha']}")
    result = {
        **provenance(), "calibration": f"{calib.name} {CALIB_SAMPLES}x{CALIB_LEN}",
        "heldout": f"{heldout.name} {EVAL_WINDOWS}x{EVAL_LEN}", "quantize": quantized, "rows": rows,
    }
    write_text_atomic(work / "results.json", json.dumps(result, indent=2))
    print(f"\nresults: {work / 'results.json'}")
    return 0
