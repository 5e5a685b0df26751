"""Calibration data: a text file -> token windows (the statistics are recorded in ``streaming``).

``--calib`` is a ``.txt`` file (the whole text is tokenized and cut into windows of
``seq_len`` tokens) or a ``.jsonl`` file (one JSON object per line with a ``text`` field;
each record is one sample, truncated to ``seq_len``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


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
