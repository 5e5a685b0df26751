"""A failed write while quantizing: one message naming the file and the cause, exit 1, nothing left behind."""

import errno
import os

import pytest
from tiny_models import calib_text, save_tiny

from vllm_smoothquant.offline import convert, export, streaming
from vllm_smoothquant.offline.cli import main
from vllm_smoothquant.offline.export import write_text_atomic
from vllm_smoothquant.offline.write_errors import OutputWriteError, writing


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("write")
    return save_tiny("LlamaForCausalLM", root / "llama"), calib_text(root / "calib.txt")


def _quantize(model, out, calib, *extra):
    return main(["quantize", str(model), str(out), "--calib", str(calib), "--num-samples", "4", "--seq-len", "64",
                 *extra])


def _full(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if "error" in x]
    assert len(lines) == 1, err
    return lines[0]


def test_a_full_disk_while_writing_the_shards_is_one_message_exit_1_and_nothing_left(tiny, tmp_path, monkeypatch,
                                                                                      capsys):
    model, calib = tiny
    monkeypatch.setattr(export.os, "pwrite", _full)
    assert _quantize(model, tmp_path / "new" / "o", calib) == 1
    line = _one_error_line(capsys)
    assert line.startswith("vllm-smoothquant quantize: error: cannot write ") and "model.safetensors" in line
    assert "No space left on device" in line and "MiB free there now" in line and "free some space" in line
    assert list(tmp_path.iterdir()) == []  # no .partial, no parent directory it made


def test_a_full_disk_while_offloading_activations_names_the_scratch_file(tiny, tmp_path, monkeypatch, capsys):
    model, calib = tiny
    monkeypatch.setattr(streaming, "save_file", _full)
    assert _quantize(model, tmp_path / "o", calib, "--offload-activations", "disk") == 1
    line = _one_error_line(capsys)
    assert "cannot write " in line and ".activations/batch-1.safetensors" in line and "No space left" in line
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_survives_a_failed_overwrite(tiny, tmp_path, monkeypatch, capsys):
    model, calib = tiny
    assert _quantize(model, tmp_path / "o", calib) == 0
    before = (tmp_path / "o" / "model.safetensors").read_bytes()
    monkeypatch.setattr(export.os, "pwrite", _full)
    assert _quantize(model, tmp_path / "o", calib, "--overwrite") == 1
    assert (tmp_path / "o" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_a_full_disk_while_converting_is_one_message_and_leaves_nothing(tiny, tmp_path, monkeypatch, capsys):
    model, calib = tiny
    assert _quantize(model, tmp_path / "sq", calib) == 0
    monkeypatch.setattr(convert, "_link_or_copy", lambda src, dst: _full(dst))
    assert main(["convert", str(tmp_path / "sq"), str(tmp_path / "ct")]) == 1
    line = _one_error_line(capsys)
    assert line.startswith("vllm-smoothquant convert: error: cannot write ") and "No space left on device" in line
    assert [p.name for p in tmp_path.iterdir()] == ["sq"]


def test_writing_names_the_file_of_the_error_and_its_cause(tmp_path):
    with pytest.raises(OutputWriteError, match=r"cannot write /x/tokenizer.json: Permission denied$"):
        with writing(tmp_path):
            raise PermissionError(errno.EACCES, "Permission denied", "/x/tokenizer.json")
    with pytest.raises(OutputWriteError, match=rf"cannot write {tmp_path}/a: Disk quota exceeded \(.* MiB free"):
        with writing(tmp_path / "a"):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    with pytest.raises(ValueError):  # only OSErrors are write failures
        with writing(tmp_path):
            raise ValueError("x")


def test_write_text_atomic_keeps_the_old_text_when_the_write_fails(tmp_path, monkeypatch):
    f = tmp_path / "results.json"
    write_text_atomic(f, "old")
    monkeypatch.setattr(type(f), "replace", _full)
    with pytest.raises(OutputWriteError, match="results.json"):
        write_text_atomic(f, "new")
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
