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


def test_a_directory_is_not_a_file(tmp_path, tok):
    (tmp_path / "d.txt").mkdir()
    with pytest.raises(CalibrationDataError, match="is a directory"):
        token_windows(tmp_path / "d.txt", tok, 4, 16)


TEXT = ("the of and to in a is that for it " * 40).encode()


@pytest.mark.parametrize(
    "name, data, match",
    [
        ("nul.txt", TEXT + b"\n\x00\x01\x02" + TEXT, r"'.*nul\.txt' contains a NUL byte \(line 2, byte 1361\)"),
        ("latin1.txt", TEXT + b"\ncaf\xe9 " + TEXT, r"'.*latin1\.txt' is not UTF-8 text: byte 0xe9 at line 2"),
        ("utf16.txt", "the of and".encode("utf-16"), "is UTF-16 text; save it as UTF-8"),
        ("soup.txt", bytes(range(1, 128)) * 20, r"'.*soup\.txt': \d+ of 2540 characters are control characters"),
        ("latin1.jsonl", b'{"text": "the of"}\n{"text": "caf\xe9"}\n', r"latin1\.jsonl' is not UTF-8 text: .* line 2"),
        ("nul.jsonl", b'{"text": "the of"}\n\x00\n', r"nul\.jsonl' contains a NUL byte \(line 2"),
        ("soup.jsonl", b'{"text": "the of"}\n{"text": "\\u0001\\u0002\\u0003 of"}\n', r"soup\.jsonl:2: field 'text': 3 of 6"),
    ],
    ids=lambda v: v if isinstance(v, str) and v.endswith((".txt", ".jsonl")) else "",
)
def test_binary_and_non_utf8_files_are_clear_errors(tmp_path, tok, name, data, match):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(CalibrationDataError, match=match):
        token_windows(tmp_path / name, tok, num_samples=4, seq_len=16)


def test_text_with_a_few_odd_characters_is_accepted(tmp_path, tok):
    odd = "\ufeff" + "the of and\f to in a\x1b[0m is that\u2028 for it ☃ é\x85 " * 40  # BOM, form feed, ESC, ...
    (tmp_path / "odd.txt").write_text(odd, encoding="utf-8")
    assert len(token_windows(tmp_path / "odd.txt", tok, num_samples=4, seq_len=16)) == 4
    records = [{"text": "the of and\u2028to in a"}, {"text": "is that\x1b for it"}]  # U+2028 inside a string
    (tmp_path / "odd.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8")
    assert [len(w) for w in token_windows(tmp_path / "odd.jsonl", tok, num_samples=4, seq_len=16)] == [6, 5]


def test_messages_name_the_files_role(tmp_path, tok):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CalibrationDataError, match=r"^evaluation text '.*empty\.txt' has 0 tokens"):
        token_windows(tmp_path / "empty.txt", tok, 4, 16, what="evaluation text")
