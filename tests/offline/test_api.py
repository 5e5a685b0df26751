"""The Python API (``from vllm_smoothquant import quantize``): the CLI's options by the same names and words, the
same checkpoint, the same errors; ``--device auto``."""

import json
import typing

import pytest
import torch
from tiny_models import calib_text, save_tiny

from vllm_smoothquant.offline import api
from vllm_smoothquant.offline.cli import build_parser, main
from vllm_smoothquant.offline.options import OptionsError

POSITIONAL = ("model_dir", "output_dir", "calib", "overwrite")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    return save_tiny("LlamaForCausalLM", root / "llama"), calib_text(root / "calib.txt")


def _quantize_actions():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {a.dest: a for a in sub.choices["quantize"]._actions if a.dest not in ("help", *POSITIONAL)}


def _literal_words(annotation) -> set:
    if typing.get_origin(annotation) is typing.Literal:
        return set(typing.get_args(annotation))
    return set().union(*(_literal_words(a) for a in typing.get_args(annotation))) if typing.get_args(annotation) else set()


def test_the_cli_flags_are_the_api_keywords_with_the_same_defaults_and_words():
    actions = _quantize_actions()
    assert set(actions) == set(api.OPTION_NAMES)
    assert api.build_options(**{n: a.default for n, a in actions.items()}) == api.build_options()
    hints = typing.get_type_hints(api.quantize)
    for name, action in actions.items():
        assert action.option_strings == [api.flag(name)]
        if action.choices:
            assert set(action.choices) == _literal_words(hints[name]) - {None}, name


def test_python_api_and_cli_write_identical_checkpoints(tiny, tmp_path, capsys):
    model, calib = tiny
    argv = ["--num-samples", "4", "--seq-len", "64", "--alpha", "0.6", "--smooth-groups", "qkv,o,down",
            "--activations", "static", "--activation-override", "down_proj=token", "--kv-cache", "fp8",
            "--rotate-block", "32", "--keep-16bit", "model.layers.1.self_attn.o_proj"]
    assert main(["quantize", str(model), str(tmp_path / "cli"), "--calib", str(calib), *argv]) == 0
    cli_out, cli_err = capsys.readouterr()

    from vllm_smoothquant import quantize

    report = quantize(model, tmp_path / "api", calib, num_samples=4, seq_len=64, alpha=0.6,
                      smooth_groups=["qkv", "o", "down"], activations="static",
                      activation_override={"down_proj": "token"}, kv_cache="fp8", rotate_block=32,
                      keep_16bit=["model.layers.1.self_attn.o_proj"])
    api_err = capsys.readouterr().err
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert report.output == str(tmp_path / "api") and report.device == device and report.layers
    files = sorted(p.relative_to(tmp_path / "cli") for p in (tmp_path / "cli").rglob("*")
                   if p.suffix in (".safetensors", ".json") and p.name != "report.json")
    assert files == sorted(p.relative_to(tmp_path / "api") for p in (tmp_path / "api").rglob("*")
                           if p.suffix in (".safetensors", ".json") and p.name != "report.json")
    assert any(p.name == "model.safetensors" for p in files)
    for rel in files:
        assert (tmp_path / "cli" / rel).read_bytes() == (tmp_path / "api" / rel).read_bytes(), rel
    said = f"device: {device} (--device auto: torch sees {'a' if device == 'cuda' else 'no'} CUDA device)"
    assert said in cli_err and said in api_err and f"s on {device};" in cli_out
    assert json.loads((tmp_path / "api" / "smoothquant" / "report.json").read_text())["device"] == device


ERRORS = {  # the Python keywords, and the same thing as the CLI's flags: one OptionsError, one message
    "offload-cpu-on-cpu": (dict(offload_activations="cpu", device="cpu"),
                           ["--offload-activations", "cpu", "--device", "cpu"]),
    "gptq-damp-without-gptq": (dict(gptq_damp=0.5), ["--gptq-damp", "0.5"]),
    "alpha-with-no-smooth": (dict(alpha=0.5, no_smooth=True), ["--alpha", "0.5", "--no-smooth"]),
    "override-word": (dict(activation_override=["down_proj=fast"]), ["--activation-override", "down_proj=fast"]),
    "gptq-damp-range": (dict(weight_rounding="gptq", gptq_damp=2.0),
                        ["--weight-rounding", "gptq", "--gptq-damp", "2"]),
    "device": (dict(device="tpu"), ["--device", "tpu"]),
}


@pytest.mark.parametrize("kwargs,argv", ERRORS.values(), ids=ERRORS.keys())
def test_a_bad_keyword_raises_the_error_the_cli_prints(tiny, tmp_path, capsys, kwargs, argv):
    from vllm_smoothquant import quantize

    model, calib = tiny
    with pytest.raises(OptionsError) as e:
        quantize(model, tmp_path / "api", calib, **kwargs)
    assert main(["quantize", str(model), str(tmp_path / "cli"), "--calib", str(calib), *argv]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"vllm-smoothquant quantize: error: {e.value}"
    assert not (tmp_path / "api").exists() and not (tmp_path / "cli").exists()


@pytest.mark.parametrize("kwargs,message", [
    (dict(weights="row"), "--weights 'row'"),
    (dict(activations="dynamic"), "--activations 'dynamic': use token"),
    (dict(num_samples="4"), "--num-samples '4': use a whole number"),
    (dict(alpha="best"), "--alpha 'best' is not a number"),
    (dict(alpha="1.5"), r"--alpha 1.5 is outside \[0, 1\]"),
    (dict(kv_cache="int8"), "--kv-cache 'int8'"),
    (dict(kv_cache="fp8", kv_cache_scales="layer"), "--kv-cache-scales 'layer'"),
    (dict(smooth_groups=[1]), "--smooth-groups"),
    (dict(no_such_option=True), "unknown quantize option"),
], ids=str)
def test_bad_words_name_the_option(kwargs, message):
    with pytest.raises(OptionsError, match=message):
        api.build_options(**kwargs)


def test_words_become_the_same_options():
    a = api.build_options(smooth_groups="qkv, down", activation_override=["down_proj=token"], alpha="0.5")
    b = api.build_options(smooth_groups=("qkv", "down"), activation_override={"down_proj": "token"}, alpha=0.5)
    assert a == b and a.groups == ("qkv", "down") and a.alpha == 0.5


def test_device_auto_picks_cuda_only_where_torch_sees_it(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert api.build_options().device == "cpu" and api.resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # nothing below runs on CUDA
    assert api.build_options().device == "cuda" and api.build_options(device="cpu").device == "cpu"
    from vllm_smoothquant.offline import pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "quantize", lambda model, out, calib, opts, overwrite: seen.setdefault("o", opts))
    api.quantize("m", "o", "c.txt")
    assert seen["o"].device == "cuda" and seen["o"].compute_dtype == torch.bfloat16
    assert "device: cuda (--device auto: torch sees a CUDA device)" in capsys.readouterr().err
    api.quantize("m", "o", "c.txt", device="cpu")
    assert "device:" not in capsys.readouterr().err  # said only when picked


def test_import_of_the_package_stays_free_and_quantize_is_lazy():
    import subprocess
    import sys

    code = ("import sys, vllm_smoothquant as v; a = 'torch' in sys.modules; q = v.quantize; "
            "print(a, 'torch' in sys.modules, 'vllm' in sys.modules, q.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "False", "vllm_smoothquant.offline.api"]
