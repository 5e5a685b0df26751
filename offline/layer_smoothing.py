"""Smoothing one decoder layer: each group's scales (GQA sharing, fused-row layouts, storable norm folds), applied.

The math is :mod:`smoothing`; which module feeds which linears is :mod:`mappings`. For a group whose ``prev`` is
v_proj (``attention_heads``), one kv head's value channels feed the o_proj inputs of all query heads sharing it, so
``s`` is the max over those heads (``s_prev``, per kv channel) repeated per query head (``s_in``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from vllm_smoothquant.format import ActivationScheme, WeightScheme

from .alpha_search import BlockProbe, search_alpha, search_alpha_block
from .experts import MIN_EXPERT_TOKENS
from .mappings import SmoothGroup, expand_groups
from .report import GroupReport
from .smoothing import (
    apply_smoothing,
    repeat_for_query_heads,
    share_across_query_heads,
    smoothing_scales,
    storable_norm_scales,
    weight_absmax,
)


_EXPERT = re.compile(r"\.experts\.(\d+)\.")


@dataclass
class ExpertGroupReport(GroupReport):
    """A mixture-of-experts group's report: ``tokens`` the calibration tokens per expert (the router's group) or
    of its one expert (an up -> down group); ``fallback`` why the group was left unsmoothed (s = 1), or None."""

    tokens: list[int] | int = 0
    fallback: str | None = None


def _expert_tokens(g: SmoothGroup, rows: dict[str, int]) -> list[int] | int | None:
    """Calibration tokens of the group's expert (a per-expert group), per routed expert (a group over experts'
    linears), or None (no expert in the group)."""
    if g.expert is not None:
        return rows.get(g.linears[0], 0)
    per_expert: dict[int, int] = {}
    for n in g.linears:
        if m := _EXPERT.search(n):
            per_expert[int(m[1])] = max(per_expert.get(int(m[1]), 0), rows.get(n, 0))
    return [per_expert[e] for e in sorted(per_expert)] if per_expert else None


def _fallback(g: SmoothGroup, seen: list[str], tokens) -> str | None:
    if g.expert is not None and tokens < MIN_EXPERT_TOKENS:
        return (f"expert {g.expert} saw {tokens} calibration tokens (< {MIN_EXPERT_TOKENS}): up -> down left "
                "unsmoothed (s = 1)")
    if not seen:
        return "no calibration input reached the group's linears: left unsmoothed (s = 1)"
    return None


def group_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float, group: SmoothGroup, heads: int,
                 kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_prev, s_in): s for prev's output channels and for the linears' input channels."""
    if group.attention_heads:
        s_prev = smoothing_scales(share_across_query_heads(act_absmax, heads, kv_heads),
                                  share_across_query_heads(w_absmax, heads, kv_heads), alpha)
        return s_prev, repeat_for_query_heads(s_prev, heads, kv_heads)
    s = smoothing_scales(act_absmax, w_absmax, alpha)
    return s, s


def _smooth_group(layer: nn.Module, g: SmoothGroup, a: torch.Tensor, w: torch.Tensor, alpha: float,
                  heads: tuple[int, int], storage: torch.dtype | None) -> torch.Tensor:
    """Smooth group ``g`` of ``layer`` in place with ``alpha`` (``a``, ``w``: its input and weight absmax);
    returns s_in, the scale of the linears' input channels."""
    s_prev, s_in = group_scales(a, w, alpha, g, *heads)
    prev = layer.get_submodule(g.prev)
    if storage is not None and not isinstance(prev, nn.Linear):
        s_prev = s_in = storable_norm_scales(prev.weight, s_prev.to(prev.weight.device), g.norm_offset, storage)
    scaled = [layer.get_submodule(n) for n in g.linears + g.passengers]
    apply_smoothing(prev, scaled, s_prev, s_in, g.norm_offset, g.rows(prev, *heads))
    return s_in


def _touched(layer: nn.Module, g: SmoothGroup) -> list[torch.Tensor]:
    """The tensors smoothing ``g`` edits in place: prev's weight (and bias), the linears' and passengers' weights."""
    prev = layer.get_submodule(g.prev)
    bias = [prev.bias] if getattr(prev, "bias", None) is not None else []
    return [prev.weight, *bias, *(layer.get_submodule(n).weight for n in g.linears + g.passengers)]


def _smoothed_absmax(after: dict[str, torch.Tensor], act_absmax: dict[str, torch.Tensor], seen: list[str],
                     s_in: torch.Tensor) -> dict[str, torch.Tensor]:
    """``after`` with the group's linears (``seen``) at their input absmax once smoothed by ``s_in``."""
    return {**after, **{n: act_absmax[n] / s_in.to(act_absmax[n].device) for n in seen}}


def _auto_alpha(layer, g, seen, a, w, act_absmax, after, heads, samples, schemes, weights, storage, probe,
                tokens, rotations) -> float:
    """``--alpha auto`` for one group: the block objective with a ``probe`` on a dense group, else (an expert
    group, or no probe) the group-local objective on the ``samples`` rows (``alpha_search``)."""
    if probe is not None and tokens is None:
        linears = {n: layer.get_submodule(n) for n in schemes}
        return search_alpha_block(
            layer, lambda al: _smooth_group(layer, g, a, w, al, heads, storage), _touched(layer, g), probe,
            linears, schemes, lambda s_in: _smoothed_absmax(after, act_absmax, seen, s_in), weights.strategy,
            rotations=rotations)[0]
    if samples is None:
        raise ValueError(f"--alpha auto, group {g.name!r}: no calibration input rows (samples) for the "
                         "group-local search; pass samples (pipeline.calibrate records them) or a BlockProbe")
    rows_in = torch.cat([samples[n] for n in seen if n in samples])
    return search_alpha(lambda al: group_scales(a, w, al, g, *heads)[1], rows_in.to(w.device),
                        [layer.get_submodule(n).weight for n in g.linears], a, schemes[seen[0]],
                        weights.strategy)[0]


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
    probe: BlockProbe | None = None,
    rotations: dict[str, int] | None = None,
) -> tuple[dict[str, torch.Tensor], list[GroupReport]]:
    """Apply smoothing to one decoder layer in place; return its linears' input absmax after smoothing.

    ``act_absmax`` and ``samples`` are keyed by the linear's name inside the layer. After smoothing a
    group's input is X / s, so its new absmax is ``act_absmax / s`` exactly. ``alpha="auto"`` searches
    alpha per group, in order (see ``alpha_search``): a dense group by the W8A8 error of the layer's output on
    ``probe`` (every linear of ``schemes`` simulated with its activation scheme and the ``weights`` scheme), an
    expert group (or any group without a probe) by its own output error on ``samples``. ``storage``: the
    checkpoint's dtype, in which a folded norm weight must be exact (``storable_norm_scales``). ``rotations``:
    the linears ``--rotate`` will rotate after smoothing (name -> block), simulated rotated by the block search.
    """
    after = dict(act_absmax)
    rows = getattr(act_absmax, "rows", {})
    reports = []
    for g in expand_groups(groups, dict(layer.named_modules())):
        seen = [n for n in g.linears if n in act_absmax]
        tokens = _expert_tokens(g, rows)
        if (fallback := _fallback(g, seen, tokens)) is not None:
            before = max((float(act_absmax[n].max()) for n in seen), default=0.0)
            reports.append(ExpertGroupReport(index, g.name, alpha if alpha != "auto" else 0.0, before, before,
                                             tokens, fallback))
            continue
        w = weight_absmax([layer.get_submodule(n) for n in g.linears])
        a = torch.stack([act_absmax[n].to(w.device) for n in seen]).amax(dim=0)
        group_alpha = alpha if alpha != "auto" else _auto_alpha(
            layer, g, seen, a, w, act_absmax, after, heads, samples, schemes, weights, storage, probe, tokens,
            rotations)
        s_in = _smooth_group(layer, g, a, w, group_alpha, heads, storage)
        after = _smoothed_absmax(after, act_absmax, seen, s_in)
        args = (index, g.name, group_alpha, float(a.max()), float((a / s_in.to(a.device)).max()))
        reports.append(GroupReport(*args) if tokens is None else ExpertGroupReport(*args, tokens))
    return after, reports
