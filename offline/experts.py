"""Mixture-of-experts blocks in the working model: every expert as its own ``nn.Linear``s, named as the checkpoint.

transformers 5 stores a block's experts fused (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``)
and converts the checkpoint's per-expert tensors on load; SmoothQuant needs them per expert (each expert's weights
get their own int8 scales, each expert's inputs their own absmax) and the output checkpoint must use the per-expert
names vLLM loads (``FusedMoE.make_expert_params_mapping``). :func:`split_experts` swaps each layer's fused experts
for an :class:`ExpertList` of :class:`Expert` modules (weights sliced from the fused ones, or left on the meta
device for lazy loading), registers the block under the checkpoint's name (Mixtral's ``block_sparse_moe``; the
decoder layer still reaches it as ``mlp``), and turns the block's kept modules (routers, Qwen2-MoE's
``shared_expert_gate``) into :class:`KeptLinear`: not ``nn.Linear``, so they are neither hooked nor quantized.

An expert's linears see only the tokens routed to it (its top-k), so the input statistics recorded on them
(``streaming.record_inputs``) are per expert, from that expert's own tokens.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn import functional as F

from .mappings import ArchMapping, MoeLayout
from .options import OptionsError

# An expert that saw fewer calibration tokens than this gets no up -> down smoothing (s = 1, its weights are
# quantized as they are): an absmax from a handful of tokens says little about the tokens it will see served.
MIN_EXPERT_TOKENS = 16


class ExpertCountError(OptionsError):
    """The checkpoint's experts do not match config.json's expert count."""


class Expert(nn.Module):
    """One SiLU-gated expert: ``down(act(gate(x)) * up(x))``, its linears named as the checkpoint names them."""

    def __init__(self, names: tuple[str, str, str], hidden: int, intermediate: int, act, dtype, device):
        super().__init__()
        self.names, self.act = names, act
        for name, (out, inp) in zip(names, ((intermediate, hidden), (intermediate, hidden), (hidden, intermediate))):
            self.add_module(name, nn.Linear(inp, out, bias=False, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act(gate(x)) * up(x))


class ExpertList(nn.ModuleList):
    """The routed experts, called as transformers calls its fused experts: each token's output is the sum over its
    top-k experts of ``weight * expert(token)``."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, pos = torch.where(top_k_index == e)
            if token.numel():
                y = expert(hidden_states[token]) * top_k_weights[token, pos, None]
                out.index_add_(0, token, y.to(out.dtype))
        return out


class KeptLinear(nn.Module):
    """A linear that stays in the model dtype (router, shared-expert gate): ``x @ weight.T`` (+ bias)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@torch.no_grad()
def _expert_list(fused: nn.Module, moe: MoeLayout, config) -> ExpertList:
    gate_up, down = fused.gate_up_proj, fused.down_proj  # [E, 2I, H], [E, H, I]
    num, inter, hidden = gate_up.shape[0], gate_up.shape[1] // 2, gate_up.shape[2]
    experts = ExpertList(Expert(moe.linears, hidden, inter, fused.act_fn, gate_up.dtype, gate_up.device)
                         for _ in range(num))
    if gate_up.device.type != "meta":
        for e, expert in enumerate(experts):
            g, u, d = (getattr(expert, n) for n in moe.linears)
            g.weight.copy_(gate_up[e, :inter])
            u.weight.copy_(gate_up[e, inter:])
            d.weight.copy_(down[e])
    return experts


def split_experts(model: nn.Module, mapping: ArchMapping) -> None:
    """Every decoder layer's MoE block with per-expert linears under the checkpoint's names (see module doc);
    in place. A model without an MoE mapping is left as it is."""
    moe = mapping.moe
    if moe is None:
        return
    for layer in model.get_submodule(mapping.layers):
        block = getattr(layer, moe.attribute)
        fused = getattr(block, moe.experts, None)
        if fused is None:  # a dense decoder layer among the MoE ones (MoeLayout.moe_layers)
            continue
        if not isinstance(fused, ExpertList):
            setattr(block, moe.experts, _expert_list(fused, moe, model.config))
        for kept in moe.kept:
            if isinstance(m := getattr(block, kept, None), nn.Linear):
                setattr(block, kept, KeptLinear(m))
        if moe.block != moe.attribute and moe.attribute in layer._modules:
            del layer._modules[moe.attribute]
            layer.add_module(moe.block, block)
            object.__setattr__(layer, moe.attribute, block)  # the layer's forward still calls self.<attribute>


def check_expert_tensors(mapping: ArchMapping, config, names, where: str) -> None:
    """Every decoder layer's checkpoint tensors name exactly experts ``0..E-1`` (E from config.json), each with its
    gate, up and down weight; else an error naming the tensor. ``names``: the checkpoint's tensor names."""
    moe = mapping.moe
    if moe is None:
        return
    count = getattr(config, moe.num_experts)
    rx = re.compile(re.escape(mapping.layers) + r"\.(\d+)\." + re.escape(f"{moe.block}.{moe.experts}.") + r"(\d+)\.(\w+)\.")
    seen: dict[tuple[int, str], set[int]] = {}
    for n in names:
        if (m := rx.match(n)) is None:
            continue
        layer, e, proj = int(m.group(1)), int(m.group(2)), m.group(3)
        if e >= count:
            raise ExpertCountError(
                f"{where}: tensor {n} belongs to expert {e}, but config.json's {moe.num_experts} is {count} "
                f"(experts 0..{count - 1}): the weights and config.json come from different models; use the "
                "config.json that was saved with these weights.")
        seen.setdefault((layer, proj), set()).add(e)
    for i in sorted(moe.moe_layers(config, getattr(config, "num_hidden_layers"))):
        for which, proj in enumerate(moe.linears):
            missing = sorted(set(range(count)) - seen.get((i, proj), set()))
            if missing:
                name = f"{mapping.layers}.{i}.{moe.expert_linear(missing[0], which)}.weight"
                raise ExpertCountError(
                    f"{where}: tensor {name} is missing ({len(missing)} of {count} experts' {proj} weights absent in "
                    f"layer {i}); config.json's {moe.num_experts} is {count}: the weights and config.json come from "
                    "different models, or the checkpoint is incomplete.")


def kept_modules(mapping: ArchMapping, moe_layers) -> tuple[str, ...]:
    """The full names of every MoE layer's kept (unquantized) modules, for the checkpoint's ``ignore`` list;
    ``moe_layers``: the indices of the decoder layers whose MLP is the MoE block (``MoeLayout.moe_layers``)."""
    moe = mapping.moe
    if moe is None:
        return ()
    return tuple(f"{mapping.layers}.{i}.{moe.block}.{k}" for i in sorted(moe_layers) for k in moe.kept)


def is_expert_linear(mapping: ArchMapping, local: str) -> bool:
    """``local`` (a linear's name inside a decoder layer) is a routed expert's."""
    moe = mapping.moe
    return moe is not None and local.startswith(f"{moe.block}.{moe.experts}.")


def check_expert_schemes(fmt, mapping: ArchMapping, num_layers: int, local_linears) -> None:
    """Routed experts run with dynamic per-token activations only: vLLM's fused-MoE int8 kernels quantize each
    expert's input per token at run time and take no calibrated input scale; and they take per-channel weight
    scales only. Fails before any weight is read."""
    if mapping.moe is not None and fmt.weights.strategy != "channel":
        raise OptionsError(f"--weights {fmt.weights.strategy}: vLLM's fused-MoE int8 kernels take per-channel weight "
                           "scales for the experts; use --weights channel for mixture-of-experts models.")
    for i in range(num_layers):
        for n in local_linears:
            name = f"{mapping.layers}.{i}.{n}"
            if is_expert_linear(mapping, n) and not fmt.activations_for(name).dynamic:
                raise OptionsError(
                    f"{name}: static activations for a mixture-of-experts expert; vLLM's fused-MoE int8 kernels "
                    "quantize expert inputs dynamically per token only. Use --activations token, or keep static "
                    "activations for attention only with --activation-override (e.g. o_proj=static).")
