"""Calibration: text -> token windows -> per-channel absmax of each Linear's input.

``--calib`` is a ``.txt`` file (the whole text is tokenized and cut into windows of
``seq_len`` tokens) or a ``.jsonl`` file (one JSON object per line with a ``text`` field;
each record is one sample, truncated to ``seq_len``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm


class CalibrationDataError(ValueError):
    pass


def _read_texts(path: Path) -> tuple[list[str], bool]:
    """(texts, is_jsonl)."""
    if not path.is_file():
        raise CalibrationDataError(f"calibration file {str(path)!r} does not exist.")
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8", errors="replace")], False
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationDataError(f"{path}:{n}: not valid JSON ({e.msg}).") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise CalibrationDataError(f"{path}:{n}: each line must be an object with a string field 'text'.")
            texts.append(rec["text"])
        return texts, True
    raise CalibrationDataError(f"calibration file {str(path)!r}: use a .txt (plain text) or .jsonl (field 'text') file.")


def token_windows(path: str | Path, tokenizer, num_samples: int, seq_len: int) -> list[list[int]]:
    """Up to ``num_samples`` token-id lists of at most ``seq_len`` tokens (``.txt``: exactly ``seq_len``).

    ``.txt`` windows are spread evenly over the whole text, so a small sample still sees all of it.
    """
    path = Path(path)
    texts, is_jsonl = _read_texts(path)
    if is_jsonl:
        windows = [ids[:seq_len] for t in texts if (ids := tokenizer(t, add_special_tokens=False)["input_ids"])]
        windows = [w for w in windows if len(w) >= 2]
        if not windows:
            raise CalibrationDataError(f"calibration file {str(path)!r} has no record with at least 2 tokens.")
        return windows[:num_samples]
    ids = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise CalibrationDataError(
            f"calibration file {str(path)!r} has {len(ids)} tokens, fewer than one window of --seq-len {seq_len}; "
            "use a longer text or a smaller --seq-len."
        )
    picks = torch.linspace(0, n - 1, steps=min(num_samples, n)).round().long().unique().tolist()
    return [ids[i * seq_len : (i + 1) * seq_len] for i in picks]


@torch.no_grad()
def collect_input_absmax(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    windows: list[list[int]],
    device: str | torch.device,
    sample_rows: int = 0,
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Run the windows through ``model``; return ``{name: max|X| per input channel [in] float32}``.

    Only the decoder runs (``model.base_model``): the LM head's logits are not needed. With
    ``sample_rows > 0`` also return ``{name: [<= sample_rows, in]}`` input rows drawn evenly from
    every window (for ``--alpha auto``).
    """
    stats: dict[str, torch.Tensor] = {}
    samples: dict[str, list[torch.Tensor]] = {}
    per_window = -(-sample_rows // len(windows)) if sample_rows else 0
    g = torch.Generator().manual_seed(0)

    def hook(name):
        def fn(_mod, inputs, _out):
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1])
            m = x.abs().amax(dim=0).float()
            stats[name] = torch.maximum(stats[name], m) if name in stats else m
            if per_window:
                idx = torch.randperm(x.shape[0], generator=g)[:per_window].to(x.device)
                samples.setdefault(name, []).append(x[idx].float().cpu())

        return fn

    handles = [lin.register_forward_hook(hook(name)) for name, lin in linears.items()]
    try:
        for w in tqdm(windows, desc="calibrating", unit="sample"):
            model.base_model(torch.tensor([w], device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    absmax = {k: v.cpu() for k, v in stats.items()}
    if not sample_rows:
        return absmax
    return absmax, {k: torch.cat(v)[:sample_rows] for k, v in samples.items()}
