"""``--keep-16bit PATTERN``: decoder linears left in the model dtype (mixed precision for sensitive layers).

A pattern is a shell-style glob (``fnmatch``) over the linear's full module name, e.g. ``*.mlp.down_proj`` (every
down_proj), ``model.layers.0.*`` (all of layer 0), ``model.layers.2[0-9].self_attn.o_proj``. A kept linear is
written in ``--dtype`` without scales, listed in the checkpoint's ``ignore`` (vLLM then builds it with its
unquantized method; ``convert`` writes it to compressed-tensors' ``ignore``), and is the target of no smoothing
group: a group whose linears include it is skipped in that layer (it may still be a group's ``prev``: v_proj kept
in 16 bits can still feed v -> o). Linears vLLM fuses (q/k/v, gate/up) are kept all or none; mixture-of-experts
expert linears cannot be kept (vLLM's fused-MoE layer has one scheme for all experts).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from .mappings import ArchMapping, SmoothGroup
from .options import OptionsError


def kept_linears(patterns: tuple[str, ...], mapping: ArchMapping, num_layers: int,
                 local_linears: list[str]) -> dict[int, frozenset[str]]:
    """``{layer: {linear names inside the layer}}`` the patterns keep; every pattern must match a decoder linear."""
    if not patterns:
        return {}
    names = {f"{mapping.layers}.{i}.{n}": (i, n) for i in range(num_layers) for n in local_linears}
    kept: dict[int, set[str]] = {}
    for p in patterns:
        hits = [full for full in names if fnmatchcase(full, p)]
        if not hits:
            raise OptionsError(f"--keep-16bit {p!r} matches no decoder linear; names look like "
                               f"{mapping.layers}.0.{local_linears[-1]} (a shell-style glob over the full name, "
                               f"e.g. '*.{local_linears[-1]}' or '{mapping.layers}.0.*').")
        experts = [h for h in hits if mapping.moe is not None and f".{mapping.moe.experts}." in h]
        if experts:
            raise OptionsError(f"--keep-16bit {p!r} matches mixture-of-experts expert linears (e.g. {experts[0]}): "
                               "vLLM runs all experts of a layer as one fused-MoE layer with one scheme; keep "
                               "attention or shared-expert linears only.")
        for h in hits:
            i, n = names[h]
            kept.setdefault(i, set()).add(n)
    for i, local in kept.items():
        for fused in mapping.fused:
            part = [n for n in fused if n in local]
            if part and len(part) < len(fused):
                raise OptionsError(f"--keep-16bit keeps {part} of layer {i} but not {sorted(set(fused) - set(part))}: "
                                   f"vLLM runs {', '.join(fused)} as one fused layer; keep all of them or none.")
    return {i: frozenset(v) for i, v in kept.items()}


def full_names(kept: dict[int, frozenset[str]], mapping: ArchMapping) -> tuple[str, ...]:
    """The kept linears' full module names, for the checkpoint's ``ignore``."""
    return tuple(f"{mapping.layers}.{i}.{n}" for i in sorted(kept) for n in sorted(kept[i]))


def groups_for_layer(groups: list[SmoothGroup], kept: frozenset[str]) -> list[SmoothGroup]:
    """The smoothing groups of a layer with kept linears ``kept``: those targeting none of them."""
    return [g for g in groups if not kept.intersection(g.linears)]
