"""The lazy path (safetensors read layer by layer, output written as it goes) makes the same checkpoint, bit for bit,
as the in-memory path (``from_pretrained``), for every family; and what the run reports."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import ARCHS, calib_text, save_tiny

from vllm_smoothquant.offline import export
from vllm_smoothquant.offline.options import STATIC, QuantizeOptions
from vllm_smoothquant.offline.pipeline import quantize

OPTS = QuantizeOptions(activations=STATIC, num_samples=3, seq_len=16)


def _tensors(ckpt):
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_checkpoint(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert list(ta) and ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    sa, sb = (load_file(d / "smoothquant" / "stats.safetensors") for d in (a, b))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    files = lambda d: sorted(p.name for p in d.iterdir())  # noqa: E731
    assert files(a) == files(b)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return calib_text(tmp_path_factory.mktemp("calib") / "calib.txt")


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.removesuffix("ForCausalLM"))
def test_lazy_and_in_memory_paths_write_the_same_checkpoint(arch, calib, tmp_path, monkeypatch):
    """Sharded input (index.json) read tensor by tensor, sharded output written as layers finish: every tensor,
    name, dtype, config.json and statistic equal to the whole-model path's."""
    from transformers import AutoModelForCausalLM

    model = save_tiny(arch, tmp_path / "model")
    AutoModelForCausalLM.from_pretrained(model, dtype="auto").save_pretrained(tmp_path / "model", max_shard_size="60KB")
    (tmp_path / "model" / "model.safetensors").unlink(missing_ok=True)
    assert (model / "model.safetensors.index.json").is_file()
    monkeypatch.setattr(export, "MAX_SHARD_SIZE", "60KB")
    lazy = quantize(str(model), tmp_path / "lazy", calib, OPTS, load="lazy")
    whole = quantize(str(model), tmp_path / "memory", calib, OPTS, load="memory")
    assert lazy.loading.startswith("lazy") and whole.loading.startswith("in memory")
    assert (tmp_path / "lazy" / "model.safetensors.index.json").is_file()
    assert_same_checkpoint(tmp_path / "lazy", tmp_path / "memory")


def test_pytorch_bin_falls_back_to_memory_and_says_so(calib, tmp_path):
    model = save_tiny("LlamaForCausalLM", tmp_path / "st", layers=1)
    (tmp_path / "bin").mkdir()
    for f in model.iterdir():
        (tmp_path / "bin" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(load_file(model / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    r = quantize(str(tmp_path / "bin"), tmp_path / "o-bin", calib, OPTS)
    assert r.loading.startswith("in memory: no model.safetensors")
    assert json.loads((tmp_path / "o-bin" / "smoothquant" / "report.json").read_text())["loading"] == r.loading
    quantize(str(model), tmp_path / "o-st", calib, OPTS)
    assert_same_checkpoint(tmp_path / "o-bin", tmp_path / "o-st")


def test_checkpoint_names_without_the_base_model_prefix(calib, tmp_path):
    """OPT checkpoints on the hub name tensors decoder.* (saved from OPTModel): mapped to model.decoder.* as
    transformers does."""
    model = save_tiny("OPTForCausalLM", tmp_path / "opt", layers=1)
    sd = load_file(model / "model.safetensors")
    bare = {k.removeprefix("model."): v for k, v in sd.items() if k != "lm_head.weight"}
    assert any(k.startswith("decoder.layers.0.") for k in bare)
    (model / "model.safetensors").unlink()
    export.save_safetensors(bare, model)
    lazy = quantize(str(model), tmp_path / "lazy", calib, OPTS)
    assert lazy.loading.startswith("lazy")
    quantize(str(model), tmp_path / "memory", calib, OPTS, load="memory")
    assert_same_checkpoint(tmp_path / "lazy", tmp_path / "memory")


def test_activations_on_disk_give_the_same_checkpoint_and_a_report(calib, tmp_path):
    model = save_tiny("Qwen2ForCausalLM", tmp_path / "m", layers=2)
    on_device = quantize(str(model), tmp_path / "dev", calib, OPTS)
    disk = quantize(str(model), tmp_path / "disk", calib, QuantizeOptions(activations=STATIC, num_samples=3, seq_len=16,
                                                                          offload_activations="disk"))
    assert_same_checkpoint(tmp_path / "dev", tmp_path / "disk")
    assert on_device.activations.endswith("on cpu") and "offloaded to disk" in disk.activations
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the activation files are gone
    report = json.loads((tmp_path / "disk" / "smoothquant" / "report.json").read_text())
    assert [x["layer"] for x in report["layers"]] == [0, 1] and report["peak_rss_bytes"] > 0
    assert all(x["seconds"] > 0 and x["peak_rss_bytes"] > 0 for x in report["layers"])
    assert report["activations"] == disk.activations and report["loading"].startswith("lazy")
