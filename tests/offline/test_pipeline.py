import pytest

from vllm_smoothquant.offline.pipeline import OptionsError, QuantizeOptions

BAD = {
    "alpha-above-1": (dict(alpha=1.5), "--alpha 1.5 is outside [0, 1]"),
    "alpha-word": (dict(alpha="best"), "outside [0, 1]"),
    "weights": (dict(weights="group"), "--weights 'group'"),
    "activations": (dict(activations="dynamic"), "--activations 'dynamic'"),
    "override-scheme": (dict(activation_overrides={"down_proj": "tensor"}), "down_proj=tensor"),
    "num-samples": (dict(num_samples=0), "--num-samples must be >= 1"),
    "seq-len": (dict(seq_len=1), "--seq-len >= 2"),
    "batch-size": (dict(batch_size=0), "--batch-size 0"),
    "dtype": (dict(dtype="float32"), "--dtype 'float32'"),
    "device": (dict(device="tpu"), "--device 'tpu'"),
}


@pytest.mark.parametrize("kwargs,message", BAD.values(), ids=BAD.keys())
def test_invalid_options_name_the_flag(kwargs, message):
    with pytest.raises(OptionsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        QuantizeOptions(**kwargs)


@pytest.mark.parametrize("alpha", [None, 0.0, 0.5, 1, "auto"], ids=str)
def test_valid_alphas(alpha):
    assert QuantizeOptions(alpha=alpha).alpha == alpha
