"""Calibration (and evaluation) text -> token windows (the statistics are recorded in ``streaming``).

A ``.txt`` file is tokenized whole and cut into windows of ``seq_len`` tokens; a ``.jsonl`` file
holds one JSON object per line with a ``text`` field, each record one sample truncated to ``seq_len``.

Both must be text: UTF-8 (a byte-order mark is allowed), no NUL byte, and at most
``MAX_CONTROL_SHARE`` of the characters (of the file, or of a jsonl record) control characters other
than tab, newline, carriage return, vertical tab and form feed. Real text in any language passes; a
binary file fails the first two tests at once, and the third catches byte soup that happens to decode.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

MAX_CONTROL_SHARE = 0.1
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")  # C0/C1 controls but \t \n \v \f \r


class CalibrationDataError(ValueError):
    pass


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _decode(path: Path, data: bytes, what: str) -> str:
    """The file's text, or an error naming where it stops being UTF-8 text."""
    where = f"{what} {str(path)!r}"
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise CalibrationDataError(f"{where} is UTF-16 text; save it as UTF-8 (e.g. `iconv -f UTF-16 -t UTF-8`).")
    if (nul := data.find(b"\0")) >= 0:
        raise CalibrationDataError(
            f"{where} contains a NUL byte (line {_line_of(data, nul)}, byte {nul}): it is a binary file, not text. "
            "Pass a plain-text .txt file or a .jsonl file with a string field 'text'."
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CalibrationDataError(
            f"{where} is not UTF-8 text: byte 0x{data[e.start]:02x} at line {_line_of(data, e.start)} "
            f"(byte {e.start}) cannot be decoded. If it is text in another encoding, convert it "
            "(e.g. `iconv -f LATIN1 -t UTF-8`); if it is binary, pass a plain-text file."
        ) from None


def _check_text(text: str, where: str) -> None:
    controls = len(_CONTROL.findall(text))
    if controls > MAX_CONTROL_SHARE * len(text):
        raise CalibrationDataError(
            f"{where}: {controls} of {len(text)} characters are control characters (more than "
            f"{MAX_CONTROL_SHARE:.0%}): this is binary data, not text. Pass plain text."
        )


def _read_texts(path: Path, what: str) -> tuple[list[str], bool]:
    """(texts, is_jsonl)."""
    if path.is_dir():
        raise CalibrationDataError(f"{what} {str(path)!r} is a directory; pass a .txt or .jsonl file.")
    if not path.is_file():
        raise CalibrationDataError(f"{what} {str(path)!r} does not exist.")
    if path.suffix not in (".txt", ".jsonl"):
        raise CalibrationDataError(f"{what} {str(path)!r}: use a .txt (plain text) or .jsonl (field 'text') file.")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CalibrationDataError(f"{what} {str(path)!r} cannot be read ({e.strerror}).") from None
    text = _decode(path, data, what)
    if path.suffix == ".txt":
        _check_text(text, f"{what} {str(path)!r}")
        return [text], False
    texts = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 etc. may sit inside a JSON string
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationDataError(f"{path}:{n}: not valid JSON ({e.msg}).") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise CalibrationDataError(f"{path}:{n}: each line must be an object with a string field 'text'.")
        _check_text(rec["text"], f"{path}:{n}: field 'text'")
        texts.append(rec["text"])
    return texts, True


def token_windows(
    path: str | Path, tokenizer, num_samples: int, seq_len: int, *, what: str = "calibration file"
) -> list[list[int]]:
    """Up to ``num_samples`` token-id lists of at most ``seq_len`` tokens (``.txt``: exactly ``seq_len``).

    ``.txt`` windows are spread evenly over the whole text, so a small sample still sees all of it.
    ``what`` names the file's role in error messages (e.g. "evaluation text").
    """
    path = Path(path)
    texts, is_jsonl = _read_texts(path, what)
    if is_jsonl:
        windows = [ids[:seq_len] for t in texts if (ids := tokenizer(t, add_special_tokens=False)["input_ids"])]
        windows = [w for w in windows if len(w) >= 2]
        if not windows:
            raise CalibrationDataError(f"{what} {str(path)!r} has no record with at least 2 tokens.")
        return windows[:num_samples]
    ids = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise CalibrationDataError(
            f"{what} {str(path)!r} has {len(ids)} tokens, fewer than one window of --seq-len {seq_len}; "
            "use a longer text or a smaller --seq-len."
        )
    picks = torch.linspace(0, n - 1, steps=min(num_samples, n)).round().long().unique().tolist()
    return [ids[i * seq_len : (i + 1) * seq_len] for i in picks]
