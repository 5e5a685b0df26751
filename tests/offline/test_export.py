import json

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file, save_file

from vllm_smoothquant.offline.export import INDEX_NAME, ShardWriter, atomic_dir, check_output


def _state_dict():
    g = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randint(-127, 128, (16, 8), generator=g, dtype=torch.int8),
        "a.weight_scale": torch.rand(16, 1, generator=g),
        "norm.weight": torch.randn(8, generator=g).to(torch.bfloat16),
        "emb.weight": torch.randn(32, 8, generator=g).to(torch.float16),
        "step": torch.tensor(3, dtype=torch.int64),  # 0-dim
        "mask": torch.rand(5, generator=g) > 0.5,
        "c.input_scale": torch.rand(1, generator=g),
    }


def test_streamed_shard_has_the_bytes_of_safetensors_save_file(tmp_path):
    """Tensors written one by one, in any order, at offsets planned from their names, dtypes and shapes: the file
    is byte for byte what safetensors.save_file writes for the whole dict."""
    sd = _state_dict()
    (tmp_path / "ref").mkdir()
    save_file(sd, tmp_path / "ref" / "model.safetensors", metadata={"format": "pt"})
    with ShardWriter(tmp_path, {n: (tuple(t.shape), t.dtype) for n, t in sd.items()}) as w:
        for name in reversed(list(sd)):
            w.write(name, sd[name])
    assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()
    assert not (tmp_path / INDEX_NAME).exists()


def test_shards_and_index_follow_huggingface_hub(tmp_path):
    sd = {f"layers.{i}.weight": torch.full((64, 64), float(i)) for i in range(6)}
    with ShardWriter(tmp_path, {n: (tuple(t.shape), t.dtype) for n, t in sd.items()}, max_shard_size="40KB") as w:
        w.write_all(sd)
    split = split_torch_state_dict_into_shards(sd, filename_pattern="model{suffix}.safetensors", max_shard_size="40KB")
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index == {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted(split.filename_to_tensors)
    for f, names in split.filename_to_tensors.items():
        got = load_file(tmp_path / f)
        assert sorted(got) == sorted(names) and all(torch.equal(got[n], sd[n]) for n in names)


def test_a_missing_or_misshapen_tensor_is_an_error(tmp_path):
    specs = {"a": ((2, 2), torch.float32), "b": ((3,), torch.int8)}
    with pytest.raises(ValueError, match="tensor a: got torch.float32 \\(3, 2\\), planned"):
        with ShardWriter(tmp_path, specs) as w:
            w.write("a", torch.zeros(3, 2))
    with pytest.raises(RuntimeError, match="1 tensors never written"):
        with ShardWriter(tmp_path, specs) as w:
            w.write("a", torch.zeros(2, 2))


def test_failed_write_leaves_nothing_not_even_the_parents_it_made(tmp_path):
    out = tmp_path / "new" / "deeper" / "ckpt"
    with pytest.raises(KeyError):
        with atomic_dir(out) as tmp:
            (tmp / "x").write_text("half")
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []


def test_check_output_resolves_and_refuses_the_model_itself(tmp_path):
    (tmp_path / "m").mkdir()
    from vllm_smoothquant.offline.export import OutputPathError

    with pytest.raises(OutputPathError, match="is the model directory itself"):
        check_output(tmp_path / "x" / ".." / "m", True, tmp_path / "m")
    assert check_output(tmp_path / "m" / "sq", False, tmp_path / "m") == (tmp_path / "m" / "sq").resolve()
    assert not [p for p in tmp_path.rglob(".*")]  # the writability probe is removed
