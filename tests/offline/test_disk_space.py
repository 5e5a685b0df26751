"""The free-space check before any weight is read, and a real full disk (a 3 MiB tmpfs, where mounting works)."""

import json
import os
import shutil
import subprocess
from collections import namedtuple

import pytest
from tiny_models import calib_text, save_tiny

from vllm_smoothquant.offline import disk_space
from vllm_smoothquant.offline.cli import main
from vllm_smoothquant.offline.loading import Checkpoint, open_checkpoint
from vllm_smoothquant.offline.options import QuantizeOptions
from vllm_smoothquant.offline.pipeline import expected_writes, plan

Usage = namedtuple("Usage", "total used free")
MiB = 2**20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("space")
    return save_tiny("LlamaForCausalLM", root / "llama"), calib_text(root / "calib.txt")


def _quantize(model, out, calib, *extra):
    return main(["quantize", str(model), str(out), "--calib", str(calib), "--num-samples", "4", "--seq-len", "64",
                 *extra])


def _free(monkeypatch, free: int):
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda path: Usage(10 * free + 1, 0, free))


def _no_weights_read(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a weight was read before the free-space check")

    for name in ("load_layer", "load_base", "tensors"):
        monkeypatch.setattr(Checkpoint, name, refuse)
        for cls in Checkpoint.__subclasses__():
            monkeypatch.setattr(cls, name, refuse, raising=False)


def _need(model, **opts) -> dict[str, int]:
    ckpt = open_checkpoint(str(model))
    o = QuantizeOptions(num_samples=4, seq_len=64, **opts)
    return expected_writes(ckpt, plan(ckpt, o), [[5] * 64] * 4)


def test_not_enough_space_is_refused_before_any_weight_is_read(tiny, tmp_path, monkeypatch, capsys):
    model, calib = tiny
    _free(monkeypatch, MiB)
    _no_weights_read(monkeypatch)
    assert _quantize(model, tmp_path / "deep" / "o", calib) == 2
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("device: ")]
    err = "\n".join(lines)  # (the --device auto pick is said first)
    assert "Traceback" not in err and len(lines) == 1, err
    assert "not enough free space for OUTPUT_DIR" in err and str(tmp_path / "deep" / "o") in err
    assert f"in '{tmp_path}', where 1.0 MiB is free" in err  # the nearest existing parent: where it would go
    assert "checkpoint tensors" in err and "free some space there" in err
    assert list(tmp_path.iterdir()) == []


def test_the_estimate_is_the_checkpoint_that_is_written(tiny, tmp_path):
    """The tensors' bytes are exactly those of model.safetensors (less its header); the whole estimate covers the
    directory that was written."""
    model, calib = tiny
    need = _need(model)
    assert _quantize(model, tmp_path / "o", calib) == 0
    f = tmp_path / "o" / "model.safetensors"
    header = int.from_bytes(f.read_bytes()[:8], "little")
    assert need["checkpoint tensors"] == f.stat().st_size - 8 - header
    written = sum(p.stat().st_size for p in (tmp_path / "o").rglob("*") if p.is_file())
    assert written <= sum(need.values())
    assert disk_space.ACTIVATIONS not in need


def test_disk_offload_counts_the_activations_beside_the_output(tiny, tmp_path, monkeypatch, capsys):
    model, calib = tiny
    need = _need(model, offload_activations="disk")
    hidden = json.loads((model / "config.json").read_text())["hidden_size"]
    assert need[disk_space.ACTIVATIONS] == (4 * 64 + 64) * hidden * 4 + disk_space.SLACK  # + one batch rewritten
    _free(monkeypatch, need["checkpoint tensors"] + need["tokenizer, config and statistics"] + MiB // 2)
    assert _quantize(model, tmp_path / "o", calib, "--offload-activations", "disk") == 2
    err = capsys.readouterr().err
    assert "calibration activations on disk" in err and "no --offload-activations disk" in err
    assert list(tmp_path.iterdir()) == []
    assert _quantize(model, tmp_path / "o", calib) == 0  # activations in memory: the same space suffices


# ---------------------------------------------------------------- a real small file system
@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs at tmp_path/small; skipped where mounting is not allowed."""
    d = tmp_path / "small"
    d.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A model whose int8 checkpoint (3.5 MiB of tensors) does not fit in 3 MiB."""
    return save_tiny("LlamaForCausalLM", tmp_path_factory.mktemp("big") / "llama", hidden=256, layers=4)


def test_a_small_disk_refuses_what_does_not_fit_and_takes_what_does(tiny, big, small_disk, capsys):
    model, calib = tiny
    assert _quantize(big, small_disk / "o", calib) == 2
    err = capsys.readouterr().err
    assert "not enough free space" in err and f"in '{small_disk}', where 3.0 MiB is free" in err
    assert os.listdir(small_disk) == []
    assert _quantize(model, small_disk / "o", calib) == 0


def test_a_disk_that_fills_up_mid_run_is_one_message_and_leaves_nothing(tiny, big, small_disk, monkeypatch, capsys):
    """The check passed (another writer filled the disk meanwhile, simulated by a lying disk_usage): the real
    ENOSPC is one line naming the file, exit 1, and the partial output is gone."""
    _, calib = tiny
    _free(monkeypatch, 2**40)
    assert _quantize(big, small_disk / "o", calib) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vllm-smoothquant quantize: error: cannot write ") and "model.safetensors" in err
    assert "No space left on device" in err and "Nothing half-written is left behind" in err
    assert os.listdir(small_disk) == []
