"""Smoothing one decoder layer: each group's scales (GQA sharing, fused-row layouts, storable norm folds), applied.

The math is :mod:`smoothing`; which module feeds which linears is :mod:`mappings`. For a group whose ``prev`` is
v_proj (``attention_heads``), one kv head's value channels feed the o_proj inputs of all query heads sharing it, so
``s`` is the max over those heads (``s_prev``, per kv channel) repeated per query head (``s_in``).
"""

from __future__ import annotations

import torch
from torch import nn

from vllm_smoothquant.format import ActivationScheme, WeightScheme

from .alpha_search import search_alpha
from .mappings import SmoothGroup
from .report import GroupReport
from .smoothing import (
    apply_smoothing,
    repeat_for_query_heads,
    share_across_query_heads,
    smoothing_scales,
    storable_norm_scales,
    weight_absmax,
)


def group_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float, group: SmoothGroup, heads: int,
                 kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_prev, s_in): s for prev's output channels and for the linears' input channels."""
    if group.attention_heads:
        s_prev = smoothing_scales(share_across_query_heads(act_absmax, heads, kv_heads),
                                  share_across_query_heads(w_absmax, heads, kv_heads), alpha)
        return s_prev, repeat_for_query_heads(s_prev, heads, kv_heads)
    s = smoothing_scales(act_absmax, w_absmax, alpha)
    return s, s


@torch.no_grad()
def smooth_layer(
    layer: nn.Module,
    index: int,
    groups: list[SmoothGroup],
    act_absmax: dict[str, torch.Tensor],
    alpha: float | str,
    heads: tuple[int, int],
    samples: dict[str, torch.Tensor] | None = None,
    schemes: dict[str, ActivationScheme] | None = None,
    weights: WeightScheme = WeightScheme(),
    storage: torch.dtype | None = None,
) -> tuple[dict[str, torch.Tensor], list[GroupReport]]:
    """Apply smoothing to one decoder layer in place; return its linears' input absmax after smoothing.

    ``act_absmax`` and ``samples`` are keyed by the linear's name inside the layer. After smoothing a
    group's input is X / s, so its new absmax is ``act_absmax / s`` exactly. ``alpha="auto"``
    searches alpha per group on ``samples`` (see ``alpha_search``) for the layer's activation
    ``schemes`` and the ``weights`` scheme. ``storage``: the checkpoint's dtype, in which a folded norm
    weight must be exact (``storable_norm_scales``).
    """
    after = dict(act_absmax)
    reports = []
    for g in groups:
        linears = [layer.get_submodule(n) for n in g.linears]
        w = weight_absmax(linears)
        a = act_absmax[g.linears[0]].to(w.device)
        group_alpha = alpha
        if alpha == "auto":
            group_alpha, _ = search_alpha(
                lambda al: group_scales(a, w, al, g, *heads)[1], samples[g.linears[0]].to(w.device),
                [lin.weight for lin in linears], a, schemes[g.linears[0]], weights.strategy,
            )
        s_prev, s_in = group_scales(a, w, group_alpha, g, *heads)
        prev = layer.get_submodule(g.prev)
        if storage is not None and not isinstance(prev, nn.Linear):
            s_prev = s_in = storable_norm_scales(prev.weight, s_prev.to(prev.weight.device), g.norm_offset, storage)
        apply_smoothing(prev, linears, s_prev, s_in, g.norm_offset, g.rows(prev, *heads))
        for n in g.linears:
            after[n] = act_absmax[n] / s_in.to(act_absmax[n].device)
        reports.append(GroupReport(index, g.name, group_alpha, float(a.max()), float(after[g.linears[0]].max())))
    return after, reports
