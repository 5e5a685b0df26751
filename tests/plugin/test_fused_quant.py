"""The native-torch activation quant that Inductor fuses into the norm / activation before a linear: the layer
roles, and int8 values and scales equal to vLLM's CUDA kernel's math (``tests/reference.py``), eager and compiled.
The option is tested in ``test_engine_options.py``. The fused path's equality with vLLM's own kernel on CUDA is in ``tests/gpu/test_cuda_fused_quant.py``."""

from __future__ import annotations

import shutil

import pytest
import torch
from reference import cuda_int8_quant

from vllm_smoothquant import fused_quant as fq


@pytest.mark.parametrize(
    "prefix, role",
    [
        ("model.layers.3.self_attn.qkv_proj", "norm"),
        ("model.decoder.layers.0.fc1", "norm"),
        ("transformer.h.1.self_attention.query_key_value", "norm"),
        ("model.layers.3.mlp.down_proj", "act"),
        ("model.decoder.layers.0.fc2", "act"),
        ("model.layers.3.self_attn.o_proj", "attn_out"),
        ("lm_head", None),
    ],
)
def test_role_of_layer(prefix, role):
    assert fq.role_of(prefix) == role


NO_COMPILER = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                 reason="torch.compile on the CPU needs a C++ compiler (g++), none found")


def _activations(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 512, generator=g) * torch.rand(33, 1, generator=g) * 8
    x[:, 7] *= 40  # an outlier channel
    x[5] = 0  # a zero row: scale 0, all-zero int8
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=NO_COMPILER)], ids=["eager", "compiled"])
def test_quant_equals_vllm_cuda_kernel_math(dtype, compiled):
    x = _activations(dtype)
    dyn, static = fq.quant_dynamic, fq.quant_static
    if compiled:  # Inductor (C++ on this CPU): the fp64 divisions and the bit-cast round trip survive codegen
        dyn, static = torch.compile(dyn, dynamic=False), torch.compile(static, dynamic=False)
    q, s = dyn(x)
    q_ref, s_ref = cuda_int8_quant(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (33, 1)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert not q[5].any() and s[5].item() == 0
    scale = torch.tensor(0.05)
    assert torch.equal(static(x, scale), cuda_int8_quant(x, scale)[0])


@NO_COMPILER
def test_quant_rounds_the_producer_output_to_its_dtype_first():
    """Fused after a norm in one compiled function, the quant sees the norm's 16-bit output, not its fp32 value."""

    def norm_then_quant(x, w):
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16) * w
        return y, *fq.quant_dynamic(y)

    x, w = _activations(torch.bfloat16), (torch.rand(512) + 0.5).to(torch.bfloat16)
    y, q, s = torch.compile(norm_then_quant, dynamic=False)(x, w)
    q_ref, s_ref = cuda_int8_quant(y)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
