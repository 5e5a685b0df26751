"""Checkpoints written by llm-compressor itself, served with ``--quantization smoothquant`` (issue 24 item 1).

Two steps, two environments (llm-compressor pins other transformers / compressed-tensors versions than vLLM):

    LLMC_PYTHON benchmarks/llmc_serve_check.py make ARCH OUT      # tiny random ARCH, llm-compressor's W8A8 preset
    .venv/bin/python benchmarks/llmc_serve_check.py serve OUT/ct  # three engines, prompt logprobs compared

``make`` quantizes the tests' tiny random model (``tests/tiny_models.py``, hidden 128) with
``QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head", <MoE routers by re:>])`` (data-free:
the preset's activations are dynamic per token) and saves it compressed to ``OUT/ct``; it prints the
``quantization_config`` it wrote (kept in ``tests/data/`` for the unit tests). ``serve`` starts three fp32 CPU
engines on 4 prompts of 48 tokens: the plugin on the compressed-tensors checkpoint, the plugin on a native copy of
the same tensors (scales widened to float32, ``quant_method: smoothquant``), and stock vLLM on the checkpoint
(no ``--quantization``), and prints each engine's quant methods and whether its prompt logprobs equal the first's.

An LLMC_PYTHON that works beside the shared venv (measured 2026-12-03, a few minutes): a venv of the same Python
with a ``.pth`` naming the project venv's site-packages (torch, transformers), then
``pip install --no-deps llmcompressor==0.14.0.1 compressed-tensors==0.19.0`` and ``pip install datasets``.
Recorded results: docs/TESTING.md.
"""

from __future__ import annotations

import gc
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = dict(max_model_len=256, enforce_eager=True, gpu_memory_utilization=0.1, enable_prefix_caching=False, seed=0,
              dtype="float32")


def make(arch: str, out: Path) -> None:
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import save_tiny

    shutil.rmtree(out, ignore_errors=True)
    src = save_tiny(arch, out / "model", hidden=128)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    routers = ["re:.*block_sparse_moe.gate$", "re:.*mlp.gate$"] if "Mixtral" in arch or "Moe" in arch else []
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head", *routers]))
    model.save_pretrained(out / "ct", save_compressed=True)
    for f in src.glob("*token*"):
        shutil.copy(f, out / "ct" / f.name)
    print(json.dumps(json.loads((out / "ct" / "config.json").read_text())["quantization_config"], indent=2))
    with safe_open(str(next((out / "ct").glob("*.safetensors"))), "pt") as f:
        for k in sorted(f.keys())[:8]:
            print(k, f.get_slice(k).get_dtype(), f.get_slice(k).get_shape())


def native_copy(ct: Path, dst: Path) -> Path:
    """The same int8 tensors, scales widened to float32 (exact), under the SmoothQuant format's config."""
    from safetensors.torch import load_file, save_file

    from vllm_smoothquant.format import SmoothQuantFormat

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(ct, dst)
    for f in dst.glob("*.safetensors"):
        save_file({k: v.float() if k.endswith("_scale") else v for k, v in load_file(f).items()}, f,
                  metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    ignore = tuple(cfg["quantization_config"]["ignore"])
    cfg["quantization_config"] = SmoothQuantFormat(alpha=None, smoothed=False, ignore=ignore).to_dict()
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def serve(ct: Path) -> None:
    import os

    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # LLM.apply_model
    import torch

    from vllm_smoothquant.linear_method import quant_methods
    from vllm_smoothquant.moe_method import moe_quant_methods
    from vllm_smoothquant.offline import harness

    prompts = torch.randint(3, 512, (4, 48), generator=torch.Generator().manual_seed(0)).tolist()
    runs = [("plugin, compressed-tensors", ct, "smoothquant"),
            ("plugin, native copy", native_copy(ct, ct.parent / "native"), "smoothquant"),
            ("stock vLLM, compressed-tensors", ct, None)]
    first = None
    for name, path, quant in runs:
        try:
            llm = harness.make_llm(str(path), quant, **ENGINE)
        except Exception as e:  # noqa: BLE001 - reported, the next engine still runs
            print(f"{name}: failed to start: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        methods = sorted({*llm.apply_model(quant_methods)[0].values(), *llm.apply_model(moe_quant_methods)[0].values()})
        got = harness.prompt_logprobs(llm, prompts)
        del llm
        gc.collect()
        first = first if first is not None else got
        diff = torch.cat([torch.tensor(a) - torch.tensor(b) for a, b in zip(got, first)]).abs()
        same = "bit-equal to the first" if got == first else f"max |d logprob| {diff.max():.3g} vs the first"
        print(f"{name}: {methods}; {same}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["make"]:
        make(sys.argv[2], Path(sys.argv[3]))
    elif sys.argv[1:2] == ["serve"]:
        sys.path.insert(0, str(ROOT))
        import vllm_smoothquant

        vllm_smoothquant.register()
        serve(Path(sys.argv[2]))
    else:
        sys.exit(__doc__)
