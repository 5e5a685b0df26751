"""Reference implementations of the paper's math, written independently of the package.

SmoothQuant (arXiv 2211.10438) eq. 4: s_j = max(|X_j|)^alpha / max(|W_j|)^(1-alpha).
W8A8 as vLLM runs it: int8 symmetric, q_max 127; activations per token (dynamic) or per
tensor (static), weights per output channel or per tensor; y = s_x * s_w * (X_q W_q^T) + b.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def paper_scales(x: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """x: [tokens, in]; weights: each [out_i, in]."""
    act = x.abs().max(dim=0).values
    w = torch.cat(weights, dim=0).abs().max(dim=0).values
    return act**alpha / w ** (1 - alpha)


def fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10) / 127
    return torch.round(x / scale).clamp(-128, 127) * scale


def fake_quant_static(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    return torch.round(x / input_scale).clamp(-128, 127) * input_scale


class FakeQuantLinear(torch.nn.Module):
    def __init__(self, weight_q, weight_scale, bias, input_scale=None):
        super().__init__()
        self.w = weight_q.float() * weight_scale.float().reshape(-1, 1) if weight_scale.numel() > 1 else \
            weight_q.float() * weight_scale.float()
        self.bias = None if bias is None else bias.float()
        self.input_scale = input_scale

    def forward(self, x):
        xf = x.float()
        xq = fake_quant_per_token(xf) if self.input_scale is None else fake_quant_static(xf, self.input_scale.float())
        y = xq @ self.w.T
        return (y if self.bias is None else y + self.bias).to(x.dtype)


def load_fake_quant_model(ckpt: Path, dtype=torch.float32):
    """An HF model for a SmoothQuant checkpoint with every quantized Linear simulated in fp32."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = json.loads((ckpt / "config.json").read_text())
    cfg_dict.pop("quantization_config")
    config = AutoConfig.for_model(**cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    sd = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        sd.update(load_file(f))
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and f"{name}.weight_scale" in sd:
            parent, leaf = name.rsplit(".", 1)
            model.get_submodule(parent).register_module(leaf, FakeQuantLinear(
                sd.pop(f"{name}.weight"), sd.pop(f"{name}.weight_scale"), sd.get(f"{name}.bias"),
                sd.pop(f"{name}.input_scale", None)))
            sd.pop(f"{name}.bias", None)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False)
    assert not unexpected, unexpected
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


@torch.no_grad()
def prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)


@torch.no_grad()
def input_absmax(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{full linear name: max|X| per input channel}`` of every Linear but the LM head, over a whole-model
    fp forward of ``ids``."""
    out: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_m, inputs):
            m = inputs[0].reshape(-1, inputs[0].shape[-1]).abs().amax(0).float()
            out[name] = torch.maximum(out[name], m) if name in out else m
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    try:
        model(ids)
    finally:
        for h in handles:
            h.remove()
    return out
