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
def test_checkpoint_follows_format_v1(tiny, tmp_path, activations):
    model, calib = tiny
    out = tmp_path / "ckpt"
    assert _quantize(model, out, calib, "--activations", activations) == 0
    cfg = json.loads((out / "config.json").read_text())
    fmt = SmoothQuantFormat.from_dict(cfg["quantization_config"])
    assert fmt.smoothed and fmt.alpha == 0.8 and fmt.calibration.num_samples == 4
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


def test_inspect_prints_groups_and_writes_plots(tiny, tmp_path, capsys):
    model, calib = tiny
    assert _quantize(model, tmp_path / "ck", calib) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "ck"), "--plot-layers", "0,1", "--plot-dir", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "SmoothQuant format v1" in out and "gate_up" in out and "14 quantized linears" in out
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["layer0-act-absmax.png", "layer1-act-absmax.png"]


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
