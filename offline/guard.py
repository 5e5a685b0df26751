"""The smoothing guard: a decoder layer, smoothed, must compute what it computed before, or quantizing stops.

Smoothing is an identity of the full-precision model (``prev``'s output channels / s, the linears' input channels
x s), but only if the mapping is right for the model: a group whose ``prev`` does not feed exactly its linears (a
wrong or outdated mapping, a remote-code variant of a known architecture, a fused row layout read the wrong way)
changes what the layer computes, and the checkpoint would be written damaged without a word. So, per decoder layer:
the layer's full-precision output on the first calibration batch before smoothing (``calibrate`` computes it anyway)
is compared with its output after smoothing, before any rotation or quantization.

The comparison is per token, on what the layer adds to its input (``y - x``: the residual stream ``x`` passes through
unchanged and would hide a damaged branch): ``e_t = |dy_t| / (|y_t - x_t| + 16 u |y_t|)`` (u: the unit roundoff of the
compute dtype; the second term keeps y's own rounding from counting as damage where the branch is small, ``FLOOR``).
The layer fails when the 90th percentile of ``e_t`` over the batch's tokens exceeds :data:`BOUNDS` for the compute
dtype, so a few tokens whose top-k expert choice flips on a near tie (an MoE router reads the smoothed input too;
rounding moves its logits) do not stop a correct run, while a wrong mapping, which changes every token (the outlier
channels are in all of them), does.

Bounds (measured 2026-12-03 on every family's tiny model with outliers, ``tests/offline/test_guard.py``, alpha 0.5):
smoothing's own rounding gives a 90th percentile of at most 9e-7 in float32 and 0.027 in bfloat16 (bf16 weights
rounded after x s, and the residual add rounded at the scale of ``|y|``, not of the branch); the wrong mappings of that
test (silu(gate) as a prev, GPT-NeoX's per-head v rows read as one block, GLM-4's post-attention norm as the input
norm, Command-R's gate/up left out of their norm's group) give 0.80 to 18 in either dtype. The bounds sit between:
1e-4 in fp32 (100x over the rounding), 0.1 in bf16 (3.7x over it, 8x under the smallest wrong mapping).

On failure the layer's parameters are put back as they were before smoothing and its groups applied again one at a
time, with the alphas the run chose, checking after each: the error names the layer and the first group that breaks
it. Cost per layer: one forward of the layer on one batch, and a copy of the parameters smoothing edits (host
memory for a CPU run; the compute device otherwise), freed after the check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from .layer_smoothing import smooth_layer
from .mappings import SmoothGroup, expand_groups
from .options import OptionsError
from .report import GroupReport
from .streaming import _as_hidden

# 90th percentile of the per-token relative error of a smoothed layer's branch output, by compute dtype
BOUNDS = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 0.1, torch.float16: 0.05}  # fp16: not measured
QUANTILE = 0.9
# The output y is rounded to its dtype (the residual add), an error of ~u |y| that a branch small beside the residual
# stream (deep layers of large models) would inflate: the branch's norm gets FLOOR u |y| added, which caps that part
# of e_t near 0.4 u |y| / (FLOOR u |y|) = 0.025 (bf16 u = 2^-8); a wrong mapping still gives
# e_t ~ 1 / (1 + FLOOR u |y| / |y - x|), over the bf16 bound up to |y| / |y - x| ~ 140.
FLOOR = 16


class SmoothingGuardError(OptionsError):
    """Smoothing changed what a decoder layer computes: the architecture's mapping does not fit this model."""


def branch_error(x: torch.Tensor, reference: torch.Tensor, got: torch.Tensor) -> float:
    """The ``QUANTILE`` over tokens of ``|got_t - reference_t| / (|reference_t - x_t| + FLOOR u |reference_t|)``, u the
    unit roundoff of the outputs' dtype (see the module doc)."""
    u = torch.finfo(reference.dtype).eps / 2
    x, reference, got = (t.float().reshape(-1, t.shape[-1]) for t in (x, reference, got))
    scale = (reference - x).norm(dim=-1) + FLOOR * u * reference.norm(dim=-1)
    scale = scale.clamp_min(torch.finfo(torch.float32).tiny)
    return float(torch.quantile((got - reference).norm(dim=-1) / scale, QUANTILE))


def _params(layer: nn.Module, groups: list[SmoothGroup]) -> dict[str, nn.Parameter]:
    """The parameters smoothing ``groups`` may edit: every prev's weight and bias, every linear's and passenger's
    weight."""
    names = dict(layer.named_modules())
    out = {}
    for g in expand_groups(groups, names):
        for m in (g.prev, *g.linears, *g.passengers):
            if m in names:
                for p in ("weight", "bias"):
                    if isinstance(t := getattr(names[m], p, None), torch.Tensor):
                        out[f"{m}.{p}"] = t
    return out


@dataclass
class SmoothingGuard:
    """One decoder layer's check (see the module doc): its first calibration batch, call arguments and
    full-precision output before smoothing, and a copy of the parameters smoothing edits."""

    index: int
    name: str  # the layer's full name, e.g. model.layers.3
    hidden: torch.Tensor
    kwargs: dict
    reference: torch.Tensor
    saved: dict[str, torch.Tensor]
    seconds: float = 0.0  # the guard's own time on this layer: the copy and the forward (the report's cost)

    @classmethod
    def before_smoothing(cls, layer: nn.Module, index: int, name: str, groups: list[SmoothGroup],
                         hidden: torch.Tensor, kwargs: dict, reference: torch.Tensor) -> SmoothingGuard:
        start = time.perf_counter()
        saved = {k: t.detach().clone() for k, t in _params(layer, groups).items()}
        return cls(index, name, hidden, kwargs, reference, saved, time.perf_counter() - start)

    @torch.no_grad()
    def error(self, layer: nn.Module) -> float:
        return branch_error(self.hidden, self.reference, _as_hidden(layer(self.hidden, **self.kwargs)))

    @torch.no_grad()
    def check(self, layer: nn.Module, groups: list[SmoothGroup], reports: list[GroupReport], act_absmax,
              heads: tuple[int, int], storage: torch.dtype | None) -> float:
        """The layer's error after smoothing (returned); above the bound, :class:`SmoothingGuardError` naming the
        first group that breaks the layer (found by smoothing again group by group, from the saved parameters)."""
        start = time.perf_counter()
        bound = BOUNDS[next(iter(self.saved.values())).dtype] if self.saved else BOUNDS[torch.float32]
        err = self.error(layer)
        self.seconds += time.perf_counter() - start
        if err <= bound:
            self.saved.clear()
            return err
        params = _params(layer, groups)
        alphas = {r.group: r.alpha for r in reports}
        culprit, culprit_err = "the groups together", err
        for k, t in self.saved.items():
            params[k].copy_(t)
        for g in expand_groups(groups, dict(layer.named_modules())):
            smooth_layer(layer, self.index, [g], act_absmax, alphas.get(g.name, 0.5), heads, storage=storage)
            if (e := self.error(layer)) > bound:
                culprit, culprit_err = f"group {g.name!r} ({g.prev} -> {', '.join(g.linears)})", e
                break
        self.saved.clear()
        raise SmoothingGuardError(
            f"{self.name}: smoothing changed the layer's full-precision output ({QUANTILE:.0%} of the first "
            f"calibration batch's tokens off by up to {culprit_err:.3g} relative, bound {bound:g}); {culprit} breaks "
            "it. The architecture's smoothing mapping (offline/mappings.py) does not fit this model (a modified or "
            "remote-code variant?): nothing was written. Fix the mapping, or leave that group out with "
            "--smooth-groups, or quantize without smoothing (--no-smooth).")


def guard_json(checked: list[dict], dtype: torch.dtype) -> dict:
    """The report's ``smoothing_guard``: the bound, each checked layer's error and the guard's seconds in all (its
    copies and forwards)."""
    return {"bound": BOUNDS[dtype], "quantile": QUANTILE, "seconds": round(sum(c["seconds"] for c in checked), 3),
            "layers": [{"layer": c["layer"], "error": float(f"{c['error']:.3g}")} for c in checked]}
