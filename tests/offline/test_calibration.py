import json

import pytest
from tiny_models import calib_text, tiny_tokenizer

from vllm_smoothquant.offline.calibration import CalibrationDataError, token_windows


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_txt_windows_have_seq_len_tokens_and_spread_over_text(tmp_path, tok):
    path = calib_text(tmp_path / "c.txt", words=1000)
    w = token_windows(path, tok, num_samples=4, seq_len=100)
    assert len(w) == 4 and all(len(x) == 100 for x in w)
    ids = tok(path.read_text(), add_special_tokens=False)["input_ids"]
    assert w[0] == ids[:100] and w[-1] == ids[900:1000]  # first and last window of the text


def test_jsonl_records_are_samples_truncated_to_seq_len(tmp_path, tok):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["the of and to in a", "it", "he was " * 50]))
    w = token_windows(path, tok, num_samples=10, seq_len=8)
    assert [len(x) for x in w] == [6, 8]  # the one-token record is skipped


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("empty.txt", "", "fewer than one window"),
        ("short.txt", "the of and", "fewer than one window"),
        ("bad.jsonl", "{not json", "not valid JSON"),
        ("nofield.jsonl", '{"content": "x"}', "field 'text'"),
        ("empty.jsonl", "", "no record"),
        ("data.csv", "a,b", "use a .txt"),
    ],
    ids=lambda v: v if isinstance(v, str) and "." in v else "",
)
def test_bad_calibration_files_are_clear_errors(tmp_path, tok, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(CalibrationDataError, match=match):
        token_windows(tmp_path / name, tok, num_samples=4, seq_len=16)


def test_missing_file(tmp_path, tok):
    with pytest.raises(CalibrationDataError, match="does not exist"):
        token_windows(tmp_path / "nope.txt", tok, 4, 16)
