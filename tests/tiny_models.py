"""Tiny random causal LMs with injected activation outliers, plus a tiny word-level tokenizer.

Outliers are what SmoothQuant is for: a few norm channels are scaled up (so the inputs of
q/k/v and gate/up or fc1 have outlier channels, as in real LLMs) and a few v_proj / up_proj /
fc1 output rows too (outliers in the inputs of o_proj and down_proj / fc2).
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("OPTForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
         "Phi3ForCausalLM", "BloomForCausalLM", "FalconForCausalLM", "GemmaForCausalLM",
         "Gemma2ForCausalLM", "Gemma3ForCausalLM", "GlmForCausalLM", "Glm4ForCausalLM", "GraniteForCausalLM",
         "CohereForCausalLM", "GPTNeoXForCausalLM")
# Mixtures of experts: 4 experts, top-2 (Qwen2-MoE and GLM-4.5 with a shared expert; GLM-4.5's layer 0 dense, its
# first_k_dense_replace); built by tiny_config like the dense ones.
MOE_ARCHS = ("MixtralForCausalLM", "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "Glm4MoeForCausalLM")
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there one all we their its been has more if no when will would who so my what up out them "
    "time about into than only other new some could these two may first then do any like people now our over"
).split()
VOCAB = 512


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    for i in range(VOCAB - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_config(arch: str, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2):
    import transformers

    common = dict(vocab_size=VOCAB, num_hidden_layers=layers, num_attention_heads=heads, architectures=[arch],
                  max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if arch == "OPTForCausalLM":
        return transformers.OPTConfig(hidden_size=hidden, ffn_dim=4 * hidden, word_embed_proj_dim=hidden, **common)
    if arch == "BloomForCausalLM":
        return transformers.BloomConfig(hidden_size=hidden, n_layer=layers, n_head=heads, tie_word_embeddings=True,
                                        **{k: v for k, v in common.items() if k not in ("num_hidden_layers", "num_attention_heads", "max_position_embeddings")})
    if arch == "FalconForCausalLM":
        return transformers.FalconConfig(hidden_size=hidden, parallel_attn=True, new_decoder_architecture=False,
                                         multi_query=True, bias=False, alibi=False, **common)
    if arch in MOE_ARCHS:
        return _moe_config(arch, hidden, kv_heads, common)
    if arch == "GPTNeoXForCausalLM":  # per-head fused query_key_value, partial rotary, parallel residual
        return transformers.GPTNeoXConfig(hidden_size=hidden, intermediate_size=4 * hidden, rotary_pct=0.25,
                                          use_parallel_residual=True, tie_word_embeddings=False, **common)
    if arch == "GraniteForCausalLM":  # multipliers away from 1: the engine must apply them as transformers does
        return transformers.GraniteConfig(hidden_size=hidden, intermediate_size=3 * hidden, num_key_value_heads=kv_heads,
                                          embedding_multiplier=4.0, residual_multiplier=0.5, attention_multiplier=0.2,
                                          logits_scaling=2.0, tie_word_embeddings=False, **common)
    if arch == "CohereForCausalLM":  # with the optional q/k norms
        return transformers.CohereConfig(hidden_size=hidden, intermediate_size=3 * hidden, num_key_value_heads=kv_heads,
                                         use_qk_norm=True, tie_word_embeddings=True, **common)
    if arch in ("GlmForCausalLM", "Glm4ForCausalLM"):  # fused gate_up_proj, q/k/v bias, partial rotary
        cls = "GlmConfig" if arch == "GlmForCausalLM" else "Glm4Config"
        return getattr(transformers, cls)(hidden_size=hidden, intermediate_size=3 * hidden, num_key_value_heads=kv_heads,
                                          head_dim=hidden // heads, attention_bias=True, tie_word_embeddings=False,
                                          **common)
    if arch.startswith("Gemma"):
        cls = {"GemmaForCausalLM": "GemmaConfig", "Gemma2ForCausalLM": "Gemma2Config",
               "Gemma3ForCausalLM": "Gemma3TextConfig"}[arch]
        return getattr(transformers, cls)(hidden_size=hidden, intermediate_size=3 * hidden, num_key_value_heads=kv_heads,
                                          head_dim=hidden // heads, tie_word_embeddings=True, **common)
    cls = {"LlamaForCausalLM": "LlamaConfig", "MistralForCausalLM": "MistralConfig",
           "Qwen2ForCausalLM": "Qwen2Config", "Qwen3ForCausalLM": "Qwen3Config", "Phi3ForCausalLM": "Phi3Config"}[arch]
    extra = {"head_dim": hidden // heads} if arch == "Qwen3ForCausalLM" else {}
    return getattr(transformers, cls)(hidden_size=hidden, intermediate_size=3 * hidden, num_key_value_heads=kv_heads,
                                      tie_word_embeddings=False, **common, **extra)


def _moe_config(arch: str, hidden: int, kv_heads: int, common: dict):
    import transformers

    moe = dict(num_experts_per_tok=2, num_key_value_heads=kv_heads, tie_word_embeddings=False, **common)
    if arch == "MixtralForCausalLM":
        return transformers.MixtralConfig(hidden_size=hidden, intermediate_size=hidden, num_local_experts=4, **moe)
    if arch == "Glm4MoeForCausalLM":
        return transformers.Glm4MoeConfig(hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden,
                                          n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                                          topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.5,
                                          head_dim=hidden // common["num_attention_heads"], use_qk_norm=False, **moe)
    qwen = dict(hidden_size=hidden, moe_intermediate_size=hidden, intermediate_size=2 * hidden, num_experts=4,
                norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], **moe)
    if arch == "Qwen3MoeForCausalLM":
        return transformers.Qwen3MoeConfig(head_dim=hidden // common["num_attention_heads"], **qwen)
    return transformers.Qwen2MoeConfig(shared_expert_intermediate_size=hidden, **qwen)


@torch.no_grad()
def _inject_expert_outliers(module, g: torch.Generator, factor: float) -> None:
    """Fused experts (transformers 5: gate_up_proj [E, 2I, H]): a few up rows per expert, so each expert's down
    input has its own outlier channels; routers get a spread that keeps top-k choices far from ties."""
    if isinstance(getattr(module, "gate_up_proj", None), torch.nn.Parameter):
        inter = module.gate_up_proj.shape[1] // 2
        for e in range(module.gate_up_proj.shape[0]):
            idx = inter + torch.randperm(inter, generator=g)[:2]
            module.gate_up_proj[e, idx] *= factor / 3
    elif type(module).__name__.lower().endswith("topkrouter"):
        module.weight.normal_(0, 0.3, generator=g)
        if getattr(module, "e_score_correction_bias", None) is not None:  # GLM-4.5's sigmoid router
            module.e_score_correction_bias.normal_(0, 0.05, generator=g)


@torch.no_grad()
def inject_outliers(model, seed: int = 0, factor: float = 30.0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, m in model.named_modules():
        _inject_expert_outliers(m, g, factor)
        leaf = name.rsplit(".", 1)[-1]
        w = getattr(m, "weight", None)
        if w is None or not isinstance(w, torch.nn.Parameter):
            continue
        if "norm" in leaf and w.dim() == 1 and leaf not in ("q_norm", "k_norm") and ("layers." in name or ".h." in name):
            idx = torch.randperm(w.numel(), generator=g)[:3]
            if type(m).__name__ in ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"):  # gain 1 + w (w starts at 0)
                w.normal_(0, 0.1, generator=g)
                w[idx] = (1 + w[idx]) * factor - 1
            else:
                w[idx] *= factor
            if getattr(m, "bias", None) is not None:
                m.bias.normal_(0, 0.5, generator=g)
        elif leaf in ("v_proj", "up_proj", "fc1"):
            idx = torch.randperm(w.shape[0], generator=g)[:2]
            w[idx] *= factor / 3
        elif leaf == "gate_up_proj" and model.config.model_type in ("glm", "glm4"):  # rows of the up half
            idx = w.shape[0] // 2 + torch.randperm(w.shape[0] // 2, generator=g)[:2]
            w[idx] *= factor / 3
        elif leaf == "query_key_value" and model.config.model_type == "gpt_neox":  # any rows, v's among them
            idx = torch.randperm(w.shape[0], generator=g)[:6]
            w[idx] *= factor / 3


def tiny_model(arch: str, seed: int = 0, config_overrides: dict | None = None, **kw):
    """fp32 random model of ``arch`` with outliers; deterministic for a given seed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, **kw)
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    inject_outliers(model, seed)
    return model


def save_tiny(arch: str, path: Path, dtype=torch.bfloat16, seed: int = 0, **kw) -> Path:
    model = tiny_model(arch, seed, **kw).to(dtype)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def calib_text(path: Path, words: int = 6000, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (words,), generator=g).tolist()
    path.write_text(" ".join(WORDS[i] for i in idx))
    return path
