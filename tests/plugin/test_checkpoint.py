"""The header check (``vllm_smoothquant.checkpoint``) on a CLI-made tiny checkpoint, broken one way per test.

The checkpoint is static per tensor with ``down_proj`` overridden to per-token, so one checkpoint has layers
that need ``input_scale`` and layers that must not have one. Problems are found from the headers alone.
"""

import json
import shutil
from dataclasses import replace

import pytest
from safetensors.torch import load_file, save_file
from tiny_models import calib_text, save_tiny

from vllm_smoothquant.checkpoint import (
    CheckpointFileError,
    CheckpointTensorError,
    TensorInfo,
    check_checkpoint,
    find_problems,
    read_headers,
    weight_files,
)
from vllm_smoothquant.format import SmoothQuantFormat
from vllm_smoothquant.offline.cli import main

K = "model.layers.1.self_attn.k_proj"
GATE = "model.layers.1.mlp.gate_proj"
DOWN = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    model = save_tiny("LlamaForCausalLM", root / "llama")
    out = root / "sq"
    assert main(["quantize", str(model), str(out), "--calib", str(calib_text(root / "c.txt")), "--num-samples", "4",
                 "--seq-len", "64", "--activations", "static", "--activation-override", "down_proj=token"]) == 0
    return out


@pytest.fixture(scope="module")
def fmt(ckpt):
    return SmoothQuantFormat.from_dict(json.loads((ckpt / "config.json").read_text())["quantization_config"])


@pytest.fixture(scope="module")
def headers(ckpt):
    tensors, problems = read_headers(weight_files(ckpt))
    assert problems == []
    return tensors


def _problems(fmt, headers, drop=(), **changes):
    tensors = {k: v for k, v in headers.items() if k not in drop}
    for name, change in changes.items():
        name = name.replace("__", ".")
        tensors[name] = replace(tensors[name], **change) if name in tensors else TensorInfo(**change, file="x")
    return find_problems(fmt, tensors)


def test_the_cli_checkpoint_passes(fmt, headers):
    assert f"{K}.input_scale" in headers and f"{DOWN}.input_scale" not in headers  # static, down_proj per token
    assert find_problems(fmt, headers) == []


@pytest.mark.parametrize(
    "drop, expected",
    [
        ([f"{K}.weight"], f"{K}.weight: missing from the checkpoint"),  # one shard of vLLM's fused qkv_proj
        ([f"{GATE}.weight_scale"], f"{GATE}.weight_scale: missing from the checkpoint"),
        ([f"{K}.input_scale"], f"{K}.input_scale: missing from the checkpoint"),  # static layer
    ],
    ids=["weight", "weight_scale", "input_scale"],
)
def test_every_declared_tensor_must_be_present(fmt, headers, drop, expected):
    (problem,) = _problems(fmt, headers, drop)
    assert problem.startswith(expected)


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({f"{DOWN}__input_scale": dict(dtype="F32", shape=(1,))},
         f"{DOWN}.input_scale: unexpected: quantization_config declares dynamic per-token activations"),
        ({"lm_head__weight_scale": dict(dtype="F32", shape=(1,))},
         "lm_head.weight_scale: unexpected: quantization_config.ignore keeps lm_head unquantized"),
        ({"lm_head__weight": dict(dtype="I8")}, "lm_head.weight: unexpected: quantization_config.ignore"),
        ({"model__norm__weight_scale": dict(dtype="F32", shape=(1,))},
         "model.norm.weight: dtype BF16, but model.norm has weight_scale"),
        ({f"{K}__weight_zero_point": dict(dtype="I8", shape=(32, 1))},
         f"{K}.weight_zero_point: not a tensor of the SmoothQuant format"),
    ],
    ids=["input_scale-of-dynamic-layer", "scale-of-ignored-module", "int8-ignored-module", "scale-of-a-norm",
         "zero-point"],
)
def test_unexpected_tensors_are_errors(fmt, headers, changes, expected):
    (problem,) = _problems(fmt, headers, **changes)
    assert problem.startswith(expected)


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({f"{K}__weight": dict(dtype="BF16")}, f"{K}.weight: dtype BF16, but {K} has weight_scale and input_scale"),
        ({f"{K}__weight_scale": dict(dtype="BF16")}, f"{K}.weight_scale: dtype BF16, the format declares float32"),
        ({f"{K}__weight_scale": dict(shape=(24, 1))}, f"{K}.weight_scale: shape [24, 1], the format declares [32, 1]"),
        ({f"{K}__input_scale": dict(shape=(2,))}, f"{K}.input_scale: shape [2], the format declares [1]"),
        ({f"{K}__weight": dict(shape=(32, 64, 1))}, f"{K}.weight: shape [32, 64, 1], the format declares [out, in]"),
    ],
    ids=["bf16-weight", "bf16-scale", "scale-rows", "input_scale-shape", "weight-rank"],
)
def test_dtype_and_shape_are_checked(fmt, headers, changes, expected):
    problems = _problems(fmt, headers, **changes)
    assert any(p.startswith(expected) for p in problems), problems


def test_tensor_strategy_scale_is_one_value(fmt, headers):
    per_tensor = replace(fmt, weights=replace(fmt.weights, strategy="tensor"))
    problems = find_problems(per_tensor, headers)
    assert problems and all("the format declares [1] (weights.strategy 'tensor')" in p for p in problems)


def test_check_checkpoint_lists_every_problem_with_the_fix(ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    sd = load_file(bad / "model.safetensors")
    del sd[f"{K}.weight"], sd[f"{GATE}.weight_scale"]
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    fmt = SmoothQuantFormat.from_dict(json.loads((bad / "config.json").read_text())["quantization_config"])
    with pytest.raises(CheckpointTensorError) as e:
        check_checkpoint(str(bad), fmt)
    msg = str(e.value)
    assert str(bad) in msg and "before loading any weight" in msg and "vllm-smoothquant quantize" in msg
    assert f"{K}.weight: missing" in msg and f"{GATE}.weight_scale: missing" in msg


def test_truncated_file_names_the_file_and_the_fix(ckpt, tmp_path):
    bad = tmp_path / "truncated"
    shutil.copytree(ckpt, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointFileError, match=r"model\.safetensors: cannot be read as safetensors .*"
                                                   r"truncated or corrupt.*Copy or download it again"):
        check_checkpoint(str(bad), SmoothQuantFormat())
    assert str(f) in str(pytest.raises(CheckpointFileError, read_headers, [f]).value)


def test_sharded_checkpoint_files_come_from_the_index(ckpt, tmp_path):
    d = tmp_path / "sharded"
    d.mkdir()
    sd = load_file(ckpt / "model.safetensors")
    names = sorted(sd)
    half = {n: "model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors"
            for i, n in enumerate(names)}
    for file in set(half.values()):
        save_file({n: sd[n] for n in names if half[n] == file}, d / file, metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": half}))
    save_file({"stray": sd[names[0]]}, d / "not-in-index.safetensors")  # vLLM skips it too
    tensors, problems = read_headers(weight_files(d))
    assert set(tensors) == set(names) and problems == []

    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointFileError, match="model-00002-of-00002.safetensors listed in "
                                                  "model.safetensors.index.json but not in the directory"):
        weight_files(d)


def test_tensor_stored_twice_is_reported(ckpt, tmp_path):
    sd = load_file(ckpt / "model.safetensors")
    save_file({f"{K}.weight": sd[f"{K}.weight"]}, tmp_path / "extra.safetensors")
    _, problems = read_headers([ckpt / "model.safetensors", tmp_path / "extra.safetensors"])
    assert problems == [f"{K}.weight: stored twice, in model.safetensors and extra.safetensors"]


@pytest.mark.parametrize("model", ["HuggingFaceTB/SmolLM2-135M-Instruct", "does/not-exist"])
def test_hub_ids_and_weightless_dirs_are_skipped_without_error(model, tmp_path):
    check_checkpoint(model, SmoothQuantFormat())  # files are fetched later, by vLLM's loader
    (tmp_path / "config.json").write_text("{}")
    check_checkpoint(str(tmp_path), SmoothQuantFormat())  # e.g. --load-format dummy on a config-only dir


def test_vllm_config_hook_runs_the_check(ckpt, tmp_path):
    from vllm_smoothquant.config import SmoothQuantConfig

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    (bad / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # header says 8 bytes: too few
    cfg = SmoothQuantConfig.from_config(json.loads((bad / "config.json").read_text())["quantization_config"])
    with pytest.raises(CheckpointFileError, match=str(bad / "model.safetensors")):
        cfg.maybe_update_config(str(bad), hf_config=None)
