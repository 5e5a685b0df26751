"""QuantizeOptions validation, the architecture checks, and every bad quantize input through the CLI: exit code 2,
a message naming the problem, and nothing written."""

import os
import subprocess
import sys

import pytest
from tiny_models import calib_text, save_tiny

from vllm_smoothquant.format import ActivationScheme, WeightScheme
from vllm_smoothquant.offline.cli import main
from vllm_smoothquant.offline.mappings import MAPPINGS
from vllm_smoothquant.offline.options import (
    STATIC,
    TOKEN,
    OptionsError,
    QuantizeOptions,
    check_against_model,
    parse_override,
)

BAD = {
    "alpha-above-1": (dict(alpha=1.5), "--alpha 1.5 is outside [0, 1]"),
    "alpha-word": (dict(alpha="best"), "outside [0, 1]"),
    "alpha-without-smoothing": (dict(alpha=0.5, smooth=False), "--alpha 0.5 with --no-smooth"),
    "auto-without-smoothing": (dict(alpha="auto", smooth=False), "--alpha auto with --no-smooth"),
    "groups-without-smoothing": (dict(groups=("qkv",), smooth=False), "--smooth-groups with --no-smooth"),
    "weights": (dict(weights=WeightScheme(strategy="group")), "--weights 'group'"),
    "dynamic-per-tensor": (dict(activations=ActivationScheme(strategy="tensor", dynamic=True)), "--activations"),
    "override-scheme": (dict(activation_overrides={"down_proj": "token"}), "--activation-override down_proj"),
    "num-samples": (dict(num_samples=0), "--num-samples must be >= 1"),
    "seq-len": (dict(seq_len=1), "--seq-len >= 2"),
    "batch-size": (dict(batch_size=0), "--batch-size 0"),
    "dtype": (dict(dtype="float32"), "--dtype 'float32'"),
    "device": (dict(device="tpu"), "--device 'tpu'"),
    "offload": (dict(offload_activations="nvme"), "--offload-activations 'nvme'"),
    "offload-cpu-on-cpu": (dict(offload_activations="cpu"), "already"),
}


@pytest.mark.parametrize("kwargs,message", BAD.values(), ids=BAD.keys())
def test_invalid_options_name_the_flag(kwargs, message):
    with pytest.raises(OptionsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        QuantizeOptions(**kwargs)


@pytest.mark.parametrize("alpha", [None, 0.0, 0.5, 1, "auto"], ids=str)
def test_valid_alphas(alpha):
    assert QuantizeOptions(alpha=alpha).alpha == alpha


def test_schemes_are_the_format_objects():
    opts = QuantizeOptions(activations=STATIC, activation_overrides={"down_proj": TOKEN})
    fmt = opts.checkpoint_format()
    assert fmt.activations == ActivationScheme(strategy="tensor", dynamic=False)
    assert fmt.activations_for("model.layers.0.mlp.down_proj") == ActivationScheme()
    assert parse_override(" down_proj = static ") == ("down_proj", STATIC)


FALCON_LINEARS = ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]
LLAMA_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj"]


def test_falcon_override_of_one_linear_of_a_smoothing_group_is_legitimate():
    """Falcon's one smoothing group feeds query_key_value and dense_h_to_4h, which vLLM runs as two layers:
    each may have its own scheme (the fused-layer check is about vLLM's fused layers, not smoothing groups)."""
    opts = QuantizeOptions(activations=STATIC, activation_overrides={"dense_h_to_4h": TOKEN})
    groups = check_against_model(opts, MAPPINGS["FalconForCausalLM"], 2, FALCON_LINEARS)
    assert [g.name for g in groups] == ["qkv_fc1", "o"]


@pytest.mark.parametrize("override", ["q_proj", "up_proj"])
def test_overriding_part_of_a_vllm_fused_layer_is_refused(override):
    opts = QuantizeOptions(activations=STATIC, activation_overrides={override: TOKEN})
    with pytest.raises(OptionsError, match="one fused layer"):
        check_against_model(opts, MAPPINGS["LlamaForCausalLM"], 2, LLAMA_LINEARS)


def test_unknown_smoothing_group_lists_the_known_ones():
    with pytest.raises(OptionsError, match=r"unknown group\(s\) \['qkvv'\].*'gate_up'"):
        check_against_model(QuantizeOptions(groups=("qkvv",)), MAPPINGS["LlamaForCausalLM"], 2, LLAMA_LINEARS)


# ---------------------------------------------------------------- bad inputs through the CLI
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    return save_tiny("LlamaForCausalLM", root / "llama", layers=1), calib_text(root / "calib.txt")


def _quantize(model, out, calib, *extra):
    return main(["quantize", str(model), str(out), "--calib", str(calib), "--num-samples", "2", "--seq-len", "16",
                 *extra])


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_missing_model_directory(tmp_path, capsys, tiny):
    _, calib = tiny
    assert _quantize(tmp_path / "no-such-model", tmp_path / "o", calib) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "no-such-model" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() and not _leftovers(tmp_path)


def test_hub_id_that_cannot_be_downloaded(tmp_path, capsys, tiny, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _, calib = tiny
    assert _quantize("no-such-org-x9/no-such-model", tmp_path / "o", calib) == 2
    err = capsys.readouterr().err
    assert "neither a local directory nor a model downloadable from the Hugging Face Hub" in err
    assert not (tmp_path / "o").exists()


def test_directory_without_config(tmp_path, capsys, tiny):
    _, calib = tiny
    (tmp_path / "empty").mkdir()
    assert _quantize(tmp_path / "empty", tmp_path / "o", calib) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_output_is_the_model_directory(tiny, capsys):
    model, calib = tiny
    before = sorted(p.name for p in model.iterdir())
    assert _quantize(model, model, calib, "--overwrite") == 2
    assert "is the model directory itself" in capsys.readouterr().err
    assert sorted(p.name for p in model.iterdir()) == before and not _leftovers(model.parent)


def test_output_containing_the_model_directory(tiny, capsys):
    model, calib = tiny
    assert _quantize(model, model.parent, calib, "--overwrite") == 2
    assert "contains the model directory" in capsys.readouterr().err
    assert (model / "config.json").is_file()


def test_unwritable_output_is_found_before_loading(tiny, tmp_path, capsys):
    """The output's parent cannot be made (a file is in the way): refused at once, before any weight is read."""
    model, calib = tiny
    (tmp_path / "file").write_text("x")
    assert _quantize(model, tmp_path / "file" / "sub" / "o", calib) == 2
    err = capsys.readouterr().err
    assert "cannot create OUTPUT_DIR" in err and "is a file" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_parent(tiny, tmp_path, capsys):
    model, calib = tiny
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    assert _quantize(model, ro / "o", calib) == 2
    assert "not writable" in capsys.readouterr().err


def test_alpha_with_no_smooth_is_refused(tiny, tmp_path, capsys):
    model, calib = tiny
    assert _quantize(model, tmp_path / "o", calib, "--alpha", "auto", "--no-smooth") == 2
    assert "--alpha auto with --no-smooth" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_stale_partials_of_a_killed_run_are_removed_and_said(tiny, tmp_path, capsys):
    """A run killed while writing leaves .NAME.PID.*.partial; the next run for that output removes it (its PID is
    gone) and says so, and mentions leftovers it cannot attribute."""
    model, calib = tiny
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".o.{int(dead.stdout)}.abc123.partial"
    (stale / "sub").mkdir(parents=True)
    unknown = tmp_path / ".o.zz9_x.partial"  # an earlier version's name: no PID
    unknown.mkdir()
    alive = tmp_path / f".o.{os.getppid()}.def456.partial"
    alive.mkdir()
    assert _quantize(model, tmp_path / "o", calib) == 0
    err = capsys.readouterr().err
    assert f"removed {stale}" in err and not stale.exists()
    assert str(unknown) in err and unknown.exists() and str(alive) in err and alive.exists()


def test_checkpoint_files_respect_the_umask(tiny, tmp_path):
    model, calib = tiny
    old = os.umask(0o022)
    try:
        assert _quantize(model, tmp_path / "o", calib) == 0
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path / "o").as_posix(): p.stat().st_mode & 0o777 for p in (tmp_path / "o").rglob("*")}
    assert modes["model.safetensors"] == 0o644 and modes["smoothquant/stats.safetensors"] == 0o644
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o755
    assert all(m == (0o755 if (tmp_path / "o" / n).is_dir() else 0o644) for n, m in modes.items()), modes


def test_activations_that_do_not_fit_stop_before_the_forwards(tiny, tmp_path, capsys, monkeypatch):
    """Where the calibration activations would go has less free memory than they need: a clear error naming the
    size and --offload-activations, and nothing written."""
    from vllm_smoothquant.offline import pipeline

    monkeypatch.setattr(pipeline, "host_memory_available", lambda: 1000)
    model, calib = tiny
    assert _quantize(model, tmp_path / "o", calib) == 2
    err = capsys.readouterr().err
    assert "calibration activations need" in err and "--offload-activations disk" in err
    assert not (tmp_path / "o").exists() and not _leftovers(tmp_path)
