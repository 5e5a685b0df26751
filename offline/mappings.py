"""Smoothing mappings as data, keyed by ``config.architectures[0]``.

A :class:`SmoothGroup` names, relative to one decoder layer, the module whose output feeds
the group's linears (``prev``) and those linears. Smoothing divides ``prev``'s output
channels by ``s`` and multiplies the linears' input channels by ``s``, so ``prev`` must be
linear in its output up to a per-channel scale: a LayerNorm/RMSNorm (weight and bias), or a
Linear followed by nothing, a ReLU, or an elementwise product with another branch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


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
    # [q_h | k_h | v_h] layout, "gate_up:up" = the second half of [gate | up]
    prev_rows: str | None = None


@dataclass(frozen=True)
class ArchMapping:
    layers: str  # attribute path of the decoder layer list
    groups: tuple[SmoothGroup, ...]
    default_alpha: float
    layer_returns_tuple: bool = False  # the decoder layer returns (hidden_states, ...) instead of a tensor


_LLAMA = ArchMapping(
    layers="model.layers",
    groups=(
        SmoothGroup("qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        SmoothGroup("gate_up", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        SmoothGroup("o", "self_attn.v_proj", ("self_attn.o_proj",), attention_heads=True),
        SmoothGroup("down", "mlp.up_proj", ("mlp.down_proj",)),  # silu(gate) * up is linear in up
    ),
    default_alpha=0.8,
)

_OPT = ArchMapping(
    layers="model.decoder.layers",
    groups=(
        SmoothGroup("qkv", "self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        SmoothGroup("fc1", "final_layer_norm", ("fc1",)),
        SmoothGroup("o", "self_attn.v_proj", ("self_attn.out_proj",), attention_heads=True),
        SmoothGroup("fc2", "fc1", ("fc2",)),  # ReLU(x / s) = ReLU(x) / s for s > 0
    ),
    default_alpha=0.5,
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
)

# Falcon (parallel attention, one input_layernorm feeding attention and MLP): one group of both linears;
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
            "Add an ArchMapping to vllm_smoothquant/offline/mappings.py (norm -> linears it feeds)."
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
