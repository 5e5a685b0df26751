"""GPTQ rounding of int8 weights with fixed scales (Frantar et al. 2022, arXiv 2210.17323), and its error measure.

For a linear ``y = x Wᵀ`` with calibration inputs ``X [n, in]`` (the smoothed layer's, see :func:`layer_hessians`)::

    H      = 2/n · Xᵀ X                                             fp32 [in, in]
    err(Ŵ) = tr((W − Ŵ) H (W − Ŵ)ᵀ) / tr(W H Wᵀ)  =  ||X Wᵀ − X Ŵᵀ||² / ||X Wᵀ||²

Round to nearest minimizes each weight's error alone; GPTQ quantizes W column by column and spreads each column's
rounding error over the columns not yet quantized, the update that keeps ``X Wᵀ`` closest (optimal brain surgeon)::

    U = chol((H + λI)⁻¹) upper,  λ = damp · mean(diag H)     (retried with 10x, 100x λ; else round to nearest)
    for each column j (in order, or by descending H_jj with act-order; the permutation is undone at the end):
        q_j = clamp(round(w_j / s), −127, 127);   e_j = (w_j − s·q_j) / U_jj;   w_k −= e_j · U_jk  for k > j

with the updates applied lazily in blocks of 128 columns (within a block per column, to later blocks once per block).
The scale ``s`` is chosen first, as for round to nearest (``quantization.weight_scale``: absmax / 127 of the
smoothed weight per output channel or per tensor): the checkpoint format and the plugin are unchanged, GPTQ only
chooses the integers. A dead column (H_jj = 0: its input was 0 on every calibration token) gets H_jj = 1: it is
rounded to nearest and passes no error on (llm-compressor zeroes it instead; a channel silent on the calibration
text may still carry signal later). With H = c·I (uncorrelated inputs of equal scale) GPTQ is round to nearest.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torch import nn

from vllm_smoothquant.format import Q_MAX

from .quantization import weight_scale
from .streaming import run_layer

BLOCK = 128  # columns per lazy update
DAMP = 0.01  # default damping, a fraction of mean(diag H)
RETRIES = (1, 10, 100)  # damping multipliers tried before falling back to round to nearest


class GPTQFallbackWarning(UserWarning):
    """A linear's Hessian could not be inverted: it was rounded to nearest."""


@contextmanager
def record_hessians(linears: dict[str, nn.Linear]):
    """While active, accumulate ``H = 2/n Σ xᵀx`` (fp32, on the input's device) of each linear's input.

    Yields ``{name: H}``, filled when the context exits. Linears called one after the other on the same tensor
    (q/k/v, gate/up) share one accumulation and one H tensor object.
    """
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    owner: dict[str, str] = {}  # linear -> the linear whose accumulation it shares (itself if none)
    last: list = [None, None]  # (input tensor, owner) of the latest call

    def hook(name):
        def fn(_mod, inputs):
            x = inputs[0]
            shared = last[0] is x
            if owner.setdefault(name, last[1] if shared else name) != (last[1] if shared else name):
                raise RuntimeError(f"{name}: its input is the previous linear's in some calls of the layer and "
                                   "not in others, so their GPTQ Hessian cannot be one; quantize this model with "
                                   "--weight-rounding nearest.")
            if shared:
                return
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            sums[name] = sums[name].addmm_(x2.T, x2) if name in sums else x2.T @ x2
            rows[name] = rows.get(name, 0) + x2.shape[0]
            last[0], last[1] = x, name

        return fn

    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in linears.items()]
    hessians: dict[str, torch.Tensor] = {}
    try:
        yield hessians
    finally:
        for h in handles:
            h.remove()
        last.clear()
        for n, s in sums.items():
            s.mul_(2 / rows[n])
        hessians.update({n: sums[o] for n, o in owner.items()})


def layer_hessians(layer: nn.Module, linears: dict[str, nn.Linear], hidden,
                   kwargs: list[dict]) -> dict[str, torch.Tensor]:
    """One forward of ``layer`` over every calibration batch, recording each linear's input Hessian."""
    with record_hessians(linears) as hessians:
        run_layer(layer, hidden, kwargs)
    return hessians


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``: the relative squared output error on the inputs ``H`` was made of."""
    w, d = w.float(), (w.float() - w_hat.float())
    den = float(((w @ h) * w).sum())
    return float(((d @ h) * d).sum()) / den if den > 0 else 0.0


def _upper_inverse_cholesky(h: torch.Tensor, damp: float, name: str) -> torch.Tensor | None:
    """``chol((H + λI)⁻¹)`` (upper), with λ raised on failure; None (and a warning) where it cannot be had."""
    if torch.isfinite(h).all():
        mean = h.diagonal().mean()
        for factor in RETRIES:
            hd = h.clone()
            hd.diagonal().add_(factor * damp * mean)
            low, info = torch.linalg.cholesky_ex(hd)
            if info == 0:
                up, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
                if info == 0 and torch.isfinite(up).all():
                    return up
    warnings.warn(f"{name}: GPTQ could not invert the Hessian of its calibration inputs even with damping "
                  f"{RETRIES[-1] * damp:g} x mean(diag H); rounded to nearest instead. Pass more --num-samples, "
                  "or a larger --gptq-damp.", GPTQFallbackWarning, stacklevel=2)
    return None


@contextmanager
def _one_cpu_thread(device: torch.device):
    """GPTQ is thousands of small ops per linear: on CPU one thread runs them ~30x faster than two on a busy
    2-core machine (one SmolLM2-135M layer's linears: 0.4 s vs 12 s), as thread hand-offs dominate."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def gptq_round(w: torch.Tensor, scale: torch.Tensor, h: torch.Tensor, damp: float = DAMP, act_order: bool = False,
               name: str = "linear", block: int = BLOCK) -> torch.Tensor:
    """int8 ``[out, in]`` for ``w [out, in]`` with the fixed ``scale`` (``[out, 1]`` or ``[1]``) and Hessian
    ``h [in, in]`` (not modified); see the module docstring. ``name`` is for the fallback warning."""
    with _one_cpu_thread(w.device):
        return _gptq_round(w, scale, h, damp, act_order, name, block)


def _gptq_round(w, scale, h, damp, act_order, name, block) -> torch.Tensor:
    h = h.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else None
    if perm is not None:
        h = h[perm][:, perm]
    u = _upper_inverse_cholesky(h, damp, name)
    if u is None:
        return torch.round(w.float() / scale).clamp(-Q_MAX, Q_MAX).to(torch.int8)  # as quantize_weight
    s = scale.float().reshape(-1).expand(w.shape[0])  # one scale per output row
    wt = (w.float()[:, perm] if perm is not None else w.float()).T.contiguous()  # [in, out]: a column is a row
    qt = torch.empty_like(wt)
    for i1 in range(0, wt.shape[0], block):
        i2 = min(i1 + block, wt.shape[0])
        w1, u1, e1 = wt[i1:i2], u[i1:i2, i1:i2], torch.empty_like(wt[i1:i2])
        for j in range(i2 - i1):
            qt[i1 + j] = torch.round(w1[j] / s).clamp_(-Q_MAX, Q_MAX)
            e1[j] = (w1[j] - qt[i1 + j] * s) / u1[j, j]
            w1[j + 1:].addr_(u1[j, j + 1:], e1[j], alpha=-1)
        wt[i2:].addmm_(u[i1:i2, i2:].T, e1, alpha=-1)
    q = qt.T
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q.contiguous().to(torch.int8)


@torch.no_grad()
def gptq_quantize_linears(weights: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor],
                          strategy: str = "channel", damp: float = DAMP, act_order: bool = False,
                          prefix: str = "") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """:func:`gptq_quantize` of each weight; weights whose H is one tensor object (q/k/v, gate/up: one input) run
    stacked as one matrix, each with its own scale: GPTQ's update of a row only involves that row's errors, so
    stacking changes the speed, not the result. ``prefix`` + name is each linear's name in warnings."""
    shared: dict[int, list[str]] = {}
    for n in weights:
        shared.setdefault(id(hessians[n]), []).append(n)
    out = {}
    for names in shared.values():
        scales = [weight_scale(weights[n], strategy) for n in names]
        rows = [weights[n].shape[0] for n in names]
        w = torch.cat([weights[n].float() for n in names])
        s = torch.cat([sc.expand(r, 1) for sc, r in zip(scales, rows)])
        h = hessians[names[0]].to(w.device)
        q = gptq_round(w, s, h, damp, act_order, " / ".join(prefix + n for n in names))
        out.update({n: (part.contiguous(), sc) for n, part, sc in zip(names, q.split(rows), scales)})
    return out


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, strategy: str = "channel", damp: float = DAMP,
                  act_order: bool = False, name: str = "linear") -> tuple[torch.Tensor, torch.Tensor]:
    """``w [out, in]`` -> (int8 ``[out, in]``, float32 scale), the contract of ``quantization.quantize_weight``:
    the same scale, GPTQ-chosen integers."""
    scale = weight_scale(w, strategy)
    return gptq_round(w, scale, h.to(w.device), damp, act_order, name), scale
