import pytest
import torch
from tiny_models import save_tiny

from vllm_smoothquant.offline.loading import open_checkpoint


@pytest.mark.parametrize("arch", ["GemmaForCausalLM", "Gemma3ForCausalLM", "FalconForCausalLM"],
                         ids=lambda a: a.removesuffix("ForCausalLM"))
def test_skeleton_buffers_are_computed_as_from_pretrained_computes_them(arch, tmp_path):
    """Parameters on meta, buffers made in __init__ real: rotary inv_freq and Gemma's embed_scale (sqrt(48) is not
    a bf16 number, so its dtype shows) equal from_pretrained's, value and dtype; a loaded layer has no meta tensor
    and equals from_pretrained's; a released one holds nothing."""
    from transformers import AutoModelForCausalLM

    model = save_tiny(arch, tmp_path / "m", hidden=48, layers=1)
    ckpt = open_checkpoint(str(model), "lazy")
    ref = AutoModelForCausalLM.from_pretrained(model, dtype="auto")
    try:
        assert all(p.is_meta for p in ckpt.model.parameters())
        want, got = dict(ref.named_buffers()), dict(ckpt.model.named_buffers())
        assert want.keys() == got.keys() and want
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
        layer = ckpt.load_layer(0)
        ref_sd = ref.state_dict()
        for k, v in layer.state_dict().items():
            assert not v.is_meta and v.dtype == torch.bfloat16
            assert torch.equal(v, ref_sd[f"{ckpt.mapping.layers}.0.{k}"]), k
        ckpt.release_layer(0)
        assert all(p.is_meta for p in layer.parameters())
    finally:
        ckpt.close()
