"""Architecture knowledge as data, keyed by ``config.architectures[0]``, and what it says about a loaded model.

A :class:`SmoothGroup` names, relative to one decoder layer, the module whose output feeds
the group's linears (``prev``) and those linears. Smoothing divides ``prev``'s output
channels by ``s`` and multiplies the linears' input channels by ``s``, so ``prev`` must be
linear in its output up to a per-channel scale: a LayerNorm/RMSNorm (weight and bias), or a
Linear followed by nothing, a ReLU, or an elementwise product with another branch.

Introspection beside the data: :func:`layer_linears` (a decoder layer's linears), :func:`attention_heads`
(query and kv head counts) and :data:`ROW_LAYOUTS` (which output rows of a fused ``prev`` feed a group).

Mixtures of experts (:class:`MoeLayout`): the working model holds every expert as its own linears, named as the
checkpoint names them (``offline/experts.py``), so a group's linear name may hold ``*`` for "every expert"
(:func:`expand_groups`): ``*`` in the linears only makes one group over all experts (the norm -> router + every
expert's gate/up); ``*`` in ``prev`` makes one group per expert (that expert's up -> down). A model may mix dense
and MoE decoder layers (:meth:`MoeLayout.moe_layers`): a group's ``layers`` says to which kind it belongs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn


def _v_block(out: int, heads: int, kv_heads: int) -> slice:
    """[q (heads) | k (kv_heads) | v (kv_heads)] x head_dim: the v block."""
    return slice((heads + kv_heads) * (out // (heads + 2 * kv_heads)), out)


def _v_rows_per_head(out: int, heads: int, kv_heads: int) -> torch.Tensor:
    """Per head h: [q_h | k_h | v_h], head_dim rows each (BLOOM, Falcon without multi_query): every head's v rows."""
    d = out // (3 * heads)
    return (torch.arange(heads).view(-1, 1) * 3 * d + 2 * d + torch.arange(d)).reshape(-1)


def _up_half(out: int, heads: int, kv_heads: int) -> slice:
    """[gate | up]: the up half."""
    return slice(out // 2, out)


# Which output rows of a fused `prev` linear (`out` rows) feed a group, in the order of the group's input channels.
ROW_LAYOUTS: dict[str, Callable[[int, int, int], slice | torch.Tensor]] = {
    "qkv:v": _v_block, "qkv:v-per-head": _v_rows_per_head, "gate_up:up": _up_half,
}


@dataclass(frozen=True)
class SmoothGroup:
    name: str  # short id used on the CLI and in reports, e.g. "qkv"
    prev: str  # norm or linear whose output channels are divided by s
    linears: tuple[str, ...]  # linears whose input channels are multiplied by s
    # prev is v_proj feeding o_proj through attention: with GQA one kv head serves several
    # query heads, so s must be equal across the query heads that share a kv head.
    attention_heads: bool = False
    norm_offset: float = 0.0  # prev is a norm computing x_hat * (norm_offset + weight): Gemma's RMSNorm uses 1
    # prev is a fused linear of which only some output rows feed the group: "qkv:v" = the v block of
    # [q | k | v] (heads x head_dim rows each), "qkv:v-per-head" = the v rows of BLOOM's per-head
    # [q_h | k_h | v_h] layout, "gate_up:up" = the second half of [gate | up] (ROW_LAYOUTS)
    prev_rows: str | None = None
    # modules that read the group's input but stay in the model dtype (an MoE router, Qwen2-MoE's
    # shared_expert_gate): their input columns get the same x s, so smoothing stays exact, but their
    # weights take no part in s (they are never quantized)
    passengers: tuple[str, ...] = ()
    expert: int | None = None  # set by expand_groups on a per-expert group
    # which decoder layers of a mixture-of-experts model the group belongs to: "all", "moe" (layers whose MLP is the
    # MoE block) or "dense" (layers whose MLP is a dense MLP: GLM-4.5's first_k_dense_replace layers, Qwen-MoE's
    # mlp_only_layers / decoder_sparse_step); see MoeLayout.moe_layers
    layers: str = "all"

    def __post_init__(self):
        if self.layers not in ("all", "moe", "dense"):
            raise ValueError(f"SmoothGroup {self.name!r}: layers must be 'all', 'moe' or 'dense', not {self.layers!r}")
        if self.prev_rows is not None and self.prev_rows not in ROW_LAYOUTS:
            raise ValueError(f"SmoothGroup {self.name!r}: unknown prev_rows {self.prev_rows!r}; "
                             f"use one of {sorted(ROW_LAYOUTS)}")

    def rows(self, prev: nn.Module, heads: int, kv_heads: int) -> slice | torch.Tensor | None:
        """The output rows of ``prev`` that feed this group (None: all of them)."""
        return None if self.prev_rows is None else ROW_LAYOUTS[self.prev_rows](prev.weight.shape[0], heads, kv_heads)


@dataclass(frozen=True)
class MoeLayout:
    """Where a decoder layer's mixture-of-experts block lives and how its experts are named in the checkpoint
    (and in vLLM's ``FusedMoE.make_expert_params_mapping``): ``<block>.<experts>.<e>.<gate|up|down>.weight``."""

    block: str  # the block's name in the checkpoint and in vLLM ("block_sparse_moe" for Mixtral)
    attribute: str  # the decoder layer's attribute for it in transformers ("mlp")
    linears: tuple[str, str, str]  # each expert's (gate, up, down) linears: ("w1", "w3", "w2") for Mixtral
    num_experts: str  # config attribute: the number of routed experts
    intermediate: str  # config attribute: one expert's intermediate size
    # modules of the block that stay in the model dtype (vLLM builds them unquantized): routers
    kept: tuple[str, ...] = ("gate",)
    experts: str = "experts"

    def moe_layers(self, config, num_layers: int) -> frozenset[int]:
        """The decoder layers whose MLP is this MoE block, as transformers and vLLM build them from config.json: all
        but the first ``first_k_dense_replace`` (GLM-4.5), those in ``mlp_only_layers`` and those off every
        ``decoder_sparse_step``-th (Qwen-MoE); the others hold a dense MLP."""
        first = getattr(config, "first_k_dense_replace", None) or 0
        dense = set(getattr(config, "mlp_only_layers", None) or ())
        step = getattr(config, "decoder_sparse_step", None) or 1
        return frozenset(i for i in range(num_layers) if i >= first and i not in dense and (i + 1) % step == 0)

    def expert_linear(self, e: int | str, which: int) -> str:
        """Expert ``e``'s gate (0), up (1) or down (2) linear, relative to the decoder layer."""
        return f"{self.block}.{self.experts}.{e}.{self.linears[which]}"


@dataclass(frozen=True)
class ArchMapping:
    layers: str  # attribute path of the decoder layer list
    groups: tuple[SmoothGroup, ...]
    default_alpha: float
    layer_returns_tuple: bool = False  # the decoder layer returns (hidden_states, ...) instead of a tensor
    # linears of a decoder layer that vLLM packs into one layer (QKVParallelLinear, MergedColumnParallelLinear):
    # they run with one activation scheme. Linears fused in the checkpoint itself (Phi-3, BLOOM, Falcon) are one.
    fused: tuple[tuple[str, ...], ...] = ()
    # the attention module of a decoder layer: it hands K and V to the KV cache (offline/kv_stats.py), and
    # "<layer>.<attention>.k_scale" / ".v_scale" are the checkpoint's KV-cache scales (format.py)
    attention: str = "self_attn"
    moe: MoeLayout | None = None  # the decoder layer's mixture-of-experts block, if it has one
    # the MLP's output projection (its input: the activation function's output, the int8 input with the largest
    # per-token outliers), which ``--rotate down_proj`` rotates; None: not rotatable (MoE experts run inside vLLM's
    # fused-MoE kernel, which quantizes their intermediate itself)
    mlp_out: str | None = "mlp.down_proj"

    def layer_groups(self, groups, moe_layer: bool) -> list[SmoothGroup]:
        """Those of ``groups`` (this mapping's) that apply to an MoE decoder layer or (``moe_layer`` False) to a dense
        one of an MoE model; every group for a dense model."""
        if self.moe is None:
            return list(groups)
        return [g for g in groups if g.layers in ("all", "moe" if moe_layer else "dense")]


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


_LLAMA = ArchMapping(
    layers="model.layers",
    groups=(
        SmoothGroup("qkv", "input_layernorm", _QKV),
        SmoothGroup("gate_up", "post_attention_layernorm", _GATE_UP),
        SmoothGroup("o", "self_attn.v_proj", ("self_attn.o_proj",), attention_heads=True),
        SmoothGroup("down", "mlp.up_proj", ("mlp.down_proj",)),  # silu(gate) * up is linear in up
    ),
    default_alpha=0.8,
    fused=(_QKV, _GATE_UP),
)

_OPT = ArchMapping(
    layers="model.decoder.layers",
    groups=(
        SmoothGroup("qkv", "self_attn_layer_norm", _QKV),
        SmoothGroup("fc1", "final_layer_norm", ("fc1",)),
        SmoothGroup("o", "self_attn.v_proj", ("self_attn.out_proj",), attention_heads=True),
        SmoothGroup("fc2", "fc1", ("fc2",)),  # ReLU(x / s) = ReLU(x) / s for s > 0
    ),
    default_alpha=0.5,
    fused=(_QKV,),
    mlp_out="fc2",
)

# Phi-3 stores q/k/v and gate/up fused (qkv_proj, gate_up_proj): v->o and up->down divide only the v / up rows.
_PHI3 = ArchMapping(
    layers="model.layers",
    groups=(
        SmoothGroup("qkv", "input_layernorm", ("self_attn.qkv_proj",)),
        SmoothGroup("gate_up", "post_attention_layernorm", ("mlp.gate_up_proj",)),
        SmoothGroup("o", "self_attn.qkv_proj", ("self_attn.o_proj",), attention_heads=True, prev_rows="qkv:v"),
        SmoothGroup("down", "mlp.gate_up_proj", ("mlp.down_proj",), prev_rows="gate_up:up"),
    ),
    default_alpha=0.8,
)

# BLOOM: fused query_key_value (vLLM repacks its per-head layout, scales included); GELU between dense_h_to_4h and
# dense_4h_to_h is not positively homogeneous, so no fc1 -> fc2 pair.
_BLOOM = ArchMapping(
    layers="transformer.h",
    groups=(
        SmoothGroup("qkv", "input_layernorm", ("self_attention.query_key_value",)),
        SmoothGroup("fc1", "post_attention_layernorm", ("mlp.dense_h_to_4h",)),
        SmoothGroup("o", "self_attention.query_key_value", ("self_attention.dense",), attention_heads=True,
                    prev_rows="qkv:v-per-head"),
    ),
    default_alpha=0.5,
    layer_returns_tuple=True,
    attention="self_attention",
    mlp_out="mlp.dense_4h_to_h",
)

# Falcon (parallel attention, one input_layernorm feeding attention and MLP): one smoothing group of both linears,
# which vLLM still runs as two layers (query_key_value, dense_h_to_4h), each with its own activation scheme;
# v -> dense through the v rows of query_key_value: [q heads | k | v] with multi_query (7B), per head
# [q_h | k_h | v_h] without (mapping_for picks); GELU blocks fc1 -> fc2.
_FALCON = ArchMapping(
    layers="transformer.h",
    groups=(
        SmoothGroup("qkv_fc1", "input_layernorm", ("self_attention.query_key_value", "mlp.dense_h_to_4h")),
        SmoothGroup("o", "self_attention.query_key_value", ("self_attention.dense",), attention_heads=True,
                    prev_rows="qkv:v"),
    ),
    default_alpha=0.5,
    layer_returns_tuple=True,
    attention="self_attention",
    mlp_out="mlp.dense_4h_to_h",
)

# Gemma: RMSNorm computes x_hat * (1 + w), so folding stores (1 + w) / s - 1 (smoothing.apply_smoothing);
# GELU(gate) * up is linear in up, so up -> down is exact as for Llama.
_GEMMA = ArchMapping(
    layers="model.layers",
    groups=(
        SmoothGroup("qkv", "input_layernorm", _LLAMA.groups[0].linears, norm_offset=1.0),
        SmoothGroup("gate_up", "post_attention_layernorm", _LLAMA.groups[1].linears, norm_offset=1.0),
        *_LLAMA.groups[2:],  # v -> o, up -> down
    ),
    default_alpha=0.8,
    fused=_LLAMA.fused,
)

# Gemma 2/3: the attention and MLP outputs pass through their own norms before the residual add; the MLP input
# norm is pre_feedforward_layernorm (post_attention_layernorm normalizes o_proj's output, feeding no linear).
# Gemma 3's q_norm/k_norm act after q/k_proj, per head: unaffected.
_GEMMA2 = ArchMapping(
    layers="model.layers",
    groups=(
        _GEMMA.groups[0],
        SmoothGroup("gate_up", "pre_feedforward_layernorm", _LLAMA.groups[1].linears, norm_offset=1.0),
        *_LLAMA.groups[2:],
    ),
    default_alpha=0.8,
    fused=_LLAMA.fused,
)


def _moe_mapping(moe: MoeLayout, shared: str | None = None) -> ArchMapping:
    """Llama-style attention and an MoE MLP: post_attention_layernorm -> router (unquantized, a passenger) and
    every expert's gate/up [and the shared expert's gate/up] as one group; v -> o; each expert's up -> its down
    [the shared expert's up -> down]. Dense decoder layers among the MoE ones (``MoeLayout.moe_layers``) hold a
    Llama MLP (``mlp.gate_proj/up_proj/down_proj``): their groups are Llama's gate_up and down."""
    gate_up = (moe.expert_linear("*", 0), moe.expert_linear("*", 1))
    shared_gate_up = (f"{shared}.gate_proj", f"{shared}.up_proj") if shared else ()
    routers = tuple(f"{moe.block}.{k}" for k in moe.kept)  # each exactly once: scaled twice, it would be wrong
    groups = [
        SmoothGroup("qkv", "input_layernorm", _QKV),
        SmoothGroup("moe", "post_attention_layernorm", gate_up + shared_gate_up, passengers=routers, layers="moe"),
        SmoothGroup("o", "self_attn.v_proj", ("self_attn.o_proj",), attention_heads=True),
        SmoothGroup("down", moe.expert_linear("*", 1), (moe.expert_linear("*", 2),), layers="moe"),  # per expert
    ]
    if shared:
        groups.append(SmoothGroup("shared_down", f"{shared}.up_proj", (f"{shared}.down_proj",), layers="moe"))
    groups += [SmoothGroup("gate_up", "post_attention_layernorm", _GATE_UP, layers="dense"),
               SmoothGroup("down", "mlp.up_proj", ("mlp.down_proj",), layers="dense")]
    return ArchMapping(layers="model.layers", groups=tuple(groups), default_alpha=0.8,
                       fused=(_QKV, _GATE_UP) + ((shared_gate_up,) if shared else ()), moe=moe, mlp_out=None)


# Mixtral: transformers calls the block `mlp`, the checkpoint and vLLM `block_sparse_moe`; experts w1/w3/w2.
_MIXTRAL = _moe_mapping(MoeLayout("block_sparse_moe", "mlp", ("w1", "w3", "w2"), "num_local_experts",
                                  "intermediate_size"))
_QWEN_MOE = MoeLayout("mlp", "mlp", ("gate_proj", "up_proj", "down_proj"), "num_experts", "moe_intermediate_size",
                      kept=("gate", "shared_expert_gate"))
# Qwen3-MoE: no shared expert (q_norm/k_norm act after q/k_proj: unaffected).
_QWEN3_MOE = _moe_mapping(replace(_QWEN_MOE, kept=("gate",)))
# Qwen2-MoE: a shared expert (one dense SiLU MLP, quantized as vLLM's merged gate_up + down) scaled by
# sigmoid(shared_expert_gate(x)): that gate reads the normed input too and stays in the model dtype.
_QWEN2_MOE = _moe_mapping(_QWEN_MOE, shared="mlp.shared_expert")

# GLM-4.5 / 4.6 / 4.7 (Glm4MoeForCausalLM): the first first_k_dense_replace layers dense (Llama MLP), the rest a
# sigmoid router with a correction bias (Glm4MoeTopkRouter: not an nn.Linear, it computes in fp32 from its weight;
# its e_score_correction_bias is added after the sigmoid, so scaling the weight's input columns keeps it exact), 128
# routed experts and one shared expert (shared_experts, a dense SiLU MLP); q_norm/k_norm (use_qk_norm) act after
# q/k_proj, per head: unaffected.
_GLM4_MOE = _moe_mapping(MoeLayout("mlp", "mlp", ("gate_proj", "up_proj", "down_proj"), "n_routed_experts",
                                   "moe_intermediate_size"), shared="mlp.shared_experts")

# GLM (glm-4-9b-hf) and GLM-4 (0414): Llama attention (q/k/v biases on the linears, partial rotary on q/k) and the
# checkpoint's own fused gate_up_proj ([gate | up], up * silu(gate): linear in up). GLM-4's post_self_attn_layernorm and
# post_mlp_layernorm normalize the attention / MLP *outputs* before the residual add: they feed no linear, so they
# are no smoothing target (v -> o and up -> down smooth those paths instead).
_GLM = ArchMapping(
    layers="model.layers",
    groups=(
        SmoothGroup("qkv", "input_layernorm", _QKV),
        SmoothGroup("gate_up", "post_attention_layernorm", ("mlp.gate_up_proj",)),
        SmoothGroup("o", "self_attn.v_proj", ("self_attn.o_proj",), attention_heads=True),
        SmoothGroup("down", "mlp.gate_up_proj", ("mlp.down_proj",), prev_rows="gate_up:up"),
    ),
    default_alpha=0.8,
    fused=(_QKV,),
)

# Command-R (CohereForCausalLM): one LayerNorm (weight, no bias) feeds attention and the MLP in parallel, so q/k/v and
# gate/up are one smoothing group (vLLM still runs qkv_proj and gate_up_proj as two layers); the optional q_norm /
# k_norm (use_qk_norm) act after q/k_proj, per head: unaffected; the logit_scale acts after lm_head.
_COHERE = ArchMapping(
    layers="model.layers",
    groups=(
        SmoothGroup("qkv_gate_up", "input_layernorm", _QKV + _GATE_UP),
        *_LLAMA.groups[2:],  # v -> o, up -> down
    ),
    default_alpha=0.8,
    fused=(_QKV, _GATE_UP),
)

# GPT-NeoX / Pythia: input_layernorm -> query_key_value (fused, per head [q_h | k_h | v_h] as BLOOM; vLLM 0.26's
# native model repacks it, scales included; 0.32 serves it through its Transformers backend as stored),
# post_attention_layernorm -> dense_h_to_4h (parallel residual or not, that norm feeds only the MLP); v -> dense
# through the v rows of each head; GELU between dense_h_to_4h and dense_4h_to_h blocks fc1 -> fc2.
_GPT_NEOX = ArchMapping(
    layers="gpt_neox.layers",
    groups=(
        SmoothGroup("qkv", "input_layernorm", ("attention.query_key_value",)),
        SmoothGroup("fc1", "post_attention_layernorm", ("mlp.dense_h_to_4h",)),
        SmoothGroup("o", "attention.query_key_value", ("attention.dense",), attention_heads=True,
                    prev_rows="qkv:v-per-head"),
    ),
    default_alpha=0.5,
    attention="attention",
    mlp_out="mlp.dense_4h_to_h",
)

MAPPINGS: dict[str, ArchMapping] = {
    "OPTForCausalLM": _OPT,
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,  # q/k/v biases live on the linears: unaffected by input scaling
    "Qwen3ForCausalLM": _LLAMA,  # q_norm/k_norm act after q/k_proj, per head: unaffected
    "Phi3ForCausalLM": _PHI3,
    "BloomForCausalLM": _BLOOM,
    "FalconForCausalLM": _FALCON,  # parallel_attn with a single layernorm (7B-style); see mapping_for
    "GemmaForCausalLM": _GEMMA,
    "Gemma2ForCausalLM": _GEMMA2,
    "Gemma3ForCausalLM": _GEMMA2,  # text-only Gemma 3 (1B); the multimodal Gemma3ForConditionalGeneration is not mapped
    "MixtralForCausalLM": _MIXTRAL,
    "Qwen3MoeForCausalLM": _QWEN3_MOE,
    "Qwen2MoeForCausalLM": _QWEN2_MOE,
    "GlmForCausalLM": _GLM,
    "Glm4ForCausalLM": _GLM,  # + post_self_attn_layernorm / post_mlp_layernorm on the outputs: no target
    "Glm4MoeForCausalLM": _GLM4_MOE,
    "GraniteForCausalLM": _LLAMA,  # embedding/residual/attention/logits multipliers act on no smoothed channel
    "CohereForCausalLM": _COHERE,
    "GPTNeoXForCausalLM": _GPT_NEOX,
}


class UnsupportedArchitectureError(ValueError):
    pass


def mapping_for(config) -> ArchMapping:
    """The mapping for a transformers config; an unknown architecture is an error listing the supported ones."""
    archs = getattr(config, "architectures", None) or []
    if not archs:
        raise UnsupportedArchitectureError(
            "config.json has no 'architectures' entry; add e.g. \"architectures\": [\"LlamaForCausalLM\"]. "
            f"Supported: {', '.join(sorted(MAPPINGS))}."
        )
    if archs[0] not in MAPPINGS:
        raise UnsupportedArchitectureError(
            f"architecture {archs[0]!r} has no SmoothQuant mapping. Supported: {', '.join(sorted(MAPPINGS))}. "
            "Add an ArchMapping to offline/mappings.py (norm -> linears it feeds)."
        )
    if archs[0] == "FalconForCausalLM" and (getattr(config, "new_decoder_architecture", False)
                                            or not getattr(config, "parallel_attn", True)):
        raise UnsupportedArchitectureError(
            "FalconForCausalLM with new_decoder_architecture (ln_attn/ln_mlp, 40B/180B-style) or sequential "
            "attention has no SmoothQuant mapping yet; only the parallel-attention, single-layernorm layout (7B) is "
            "supported."
        )
    if archs[0] == "FalconForCausalLM" and not getattr(config, "multi_query", True):
        o = replace(_FALCON.groups[1], prev_rows="qkv:v-per-head")
        return replace(_FALCON, groups=(_FALCON.groups[0], o))
    return MAPPINGS[archs[0]]


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of one decoder layer, by name inside the layer (e.g. ``self_attn.q_proj``)."""
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


def attention_heads(config) -> tuple[int, int]:
    """(query heads, kv heads); Falcon-7B's multi_query means one kv head."""
    heads = config.num_attention_heads
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        return heads, 1
    return heads, getattr(config, "num_key_value_heads", None) or heads


def _pattern(name: str) -> re.Pattern:
    return re.compile(re.escape(name).replace(r"\*", r"(\d+)") + "$")


def expert_indices(pattern: str, names) -> list[int]:
    """The expert indices ``*`` takes in ``pattern`` among ``names`` (module names inside a layer), ascending."""
    rx = _pattern(pattern)
    return sorted({int(m.group(1)) for n in names if (m := rx.match(n))})


def expand_groups(groups, names) -> list[SmoothGroup]:
    """``groups`` with every ``*`` made concrete against ``names`` (the module names of one decoder layer): ``*``
    in ``prev`` gives one group per expert (named ``<group>.<e>``), ``*`` in the linears alone lists every expert's
    linear in the one group. Groups without ``*`` come back as they are."""
    names = list(names)
    out = []
    for g in groups:
        if "*" in g.prev:
            out += [replace(g, name=f"{g.name}.{e}", prev=g.prev.replace("*", str(e)), expert=e,
                            linears=tuple(n.replace("*", str(e)) for n in g.linears))
                    for e in expert_indices(g.prev, names)]
        elif any("*" in n for n in g.linears):
            linears = tuple(n.replace("*", str(e)) for n in g.linears if "*" in n
                            for e in expert_indices(n, names))
            out.append(replace(g, linears=linears + tuple(n for n in g.linears if "*" not in n)))
        else:
            out.append(g)
    return out
