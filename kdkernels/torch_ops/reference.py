"""Plain PyTorch reference of every kdkernels loss (SPEC §2-3): the test oracle and the eager baseline.

It writes the formulas directly on ``(N, V)`` tensors and lets autograd take the gradient, so it
materialises several full-size tensors; no other path may. It computes in float64 when either input is
float64 and in float32 otherwise (bfloat16/float16 inputs are upcast on entry).

Per row, with ``q = softmax(z / T)`` (student), ``p = softmax(t / T)`` (teacher, the target),
``lq = log q``, ``lp = log p`` and the inf mask ``m`` (0 where ``z`` or ``t`` is ``-inf``):

- ``fkl``:  ``F = sum_m p (lp - lq)``
- ``rkl``:  ``R = sum_m q (lq - lp)``
- ``akl``:  ``r_h F + r_t R`` with the head/tail weights of :func:`akl_weights` (constants)
- ``todi``: ``sum_m [w p (lp - lq) + c q (lq - lp)]``, ``w = sigmoid(b (lp - lq))``,
  ``c = sigmoid(b (lq - lp))`` (constants)
- ``sfkl``: ``sum_m p (lp - lm)``, ``lm = log(l p + (1 - l) q)`` (``l = skew_lambda``)
- ``srkl``: ``sum_m q (lq - lm)``, ``lm = log((1 - l) p + l q)``
- ``jsd``:  ``b sum_m p (lp - lM) + (1 - b) sum_m q (lq - lM)``, ``lM = log(b p + (1 - b) q)``
  (``b = jsd_beta``); ``fkl`` at ``b = 0`` and ``rkl`` at ``b = 1`` (TRL's convention, SPEC §2b)
- ``tvd``:  ``1/2 sum_m |p - q|`` (subgradient 0 where ``p = q``)

The mixtures are formed in log space (``logaddexp(log l + lp, log(1 - l) + lq)``); unlike AKL's and ToDi's
weights, nothing in them is held constant. The loss is not multiplied by ``T**2``.
"""

from __future__ import annotations

import math

import torch

DIVERGENCES = ("fkl", "rkl", "akl", "todi", "sfkl", "srkl", "jsd", "tvd")
REDUCTIONS = ("mean", "sum", "none")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def log_probs(x: torch.Tensor, temperature: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log softmax(x / T), softmax(x / T))`` over the last dim, with probability 0 at ``-inf`` entries.

    A row whose entries are all ``-inf`` has no distribution: its probabilities are all 0 (not NaN).
    """
    x = x.to(dtype) / temperature
    dead = (x == float("-inf")).all(dim=-1, keepdim=True)
    log_p = torch.log_softmax(torch.where(dead, 0.0, x), dim=-1)
    return log_p, torch.where(x == float("-inf"), 0.0, log_p.exp())


def akl_weights(p: torch.Tensor, q: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AKL head/tail weights ``(r_h, r_t)``, each ``(N,)``, from probabilities ``p``, ``q`` of shape ``(N, V)``.

    Entries are ordered by ``p`` ascending with ties in index order (a stable sort); an entry is in the
    tail when the inclusive cumulative sum of ``p`` in that order is ``<= alpha``, else in the head.
    """
    with torch.no_grad():
        order = torch.sort(p, dim=-1, stable=True).indices
        tail_sorted = torch.cumsum(torch.gather(p, -1, order), dim=-1) <= alpha
        tail = torch.zeros_like(tail_sorted).scatter(-1, order, tail_sorted)
        return head_tail_weights(tail, p, q)


def head_tail_weights(tail: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``r_h = g_head / (g_head + g_tail)`` and ``r_t``, with ``g = sum |p - q|`` over each part of the
    ``(N, V)`` split ``tail``; 0.5/0.5 when both sums are 0."""
    gap = (p - q).abs()
    return head_tail_ratios(torch.where(tail, 0.0, gap).sum(-1), torch.where(tail, gap, 0.0).sum(-1))


def head_tail_ratios(g_head: torch.Tensor, g_tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g_head / (g_head + g_tail), g_tail / (g_head + g_tail))`` of the gap sums ``(N,)``; 0.5/0.5 where both
    are 0 (student equals teacher)."""
    total = g_head + g_tail
    safe = torch.where(total > 0, total, 1.0)
    return torch.where(total > 0, g_head / safe, 0.5), torch.where(total > 0, g_tail / safe, 0.5)


def divergence_rows(
    z: torch.Tensor,
    t: torch.Tensor,
    divergence: str,
    temperature: float = 1.0,
    akl_alpha: float = 0.5,
    todi_beta: float = 1.0,
    skew_lambda: float = 0.1,
    jsd_beta: float = 0.5,
) -> torch.Tensor:
    """Row divergences ``(N,)`` of student logits ``z`` and teacher logits ``t``, both ``(N, V)``; see the module
    docstring (``skew_lambda`` is sfkl's and srkl's ``l``, ``jsd_beta`` is jsd's ``b``)."""
    if divergence == "jsd" and jsd_beta in (0.0, 1.0):
        divergence = "fkl" if jsd_beta == 0.0 else "rkl"  # the formula is 0 at both ends (SPEC §2b)
    dtype = compute_dtype(z, t)
    lq, q = log_probs(z, temperature, dtype)
    lp, p = log_probs(t, temperature, dtype)
    mask = (z != float("-inf")) & (t != float("-inf"))
    # Masked terms via torch.where on the factors, so autograd never multiplies 0 by inf.
    lq, lp = torch.where(mask, lq, 0.0), torch.where(mask, lp, 0.0)
    d = lq - lp  # 0 where masked
    fkl = -(p * d).sum(-1)
    rkl = (q * d).sum(-1)
    if divergence == "fkl":
        return fkl
    if divergence == "rkl":
        return rkl
    if divergence == "akl":
        r_h, r_t = akl_weights(p, q, akl_alpha)
        return r_h * fkl + r_t * rkl
    if divergence == "todi":
        w = torch.sigmoid(-todi_beta * d).detach()
        c = torch.sigmoid(todi_beta * d).detach()
        return (-w * p * d + c * q * d).sum(-1)
    # The baselines (SPEC §2b), masked on their probability factors too.
    pm, qm = torch.where(mask, p, 0.0), torch.where(mask, q, 0.0)
    if divergence == "sfkl":
        lm = torch.logaddexp(math.log(skew_lambda) + lp, math.log1p(-skew_lambda) + lq)
        return (pm * (lp - lm)).sum(-1)
    if divergence == "srkl":
        lm = torch.logaddexp(math.log1p(-skew_lambda) + lp, math.log(skew_lambda) + lq)
        return (qm * (lq - lm)).sum(-1)
    if divergence == "jsd":
        lm = torch.logaddexp(math.log(jsd_beta) + lp, math.log1p(-jsd_beta) + lq)
        return jsd_beta * (pm * (lp - lm)).sum(-1) + (1.0 - jsd_beta) * (qm * (lq - lm)).sum(-1)
    if divergence == "tvd":
        gap = pm - qm
        # 0 * gap**2 adds nothing to the value or to a finite gradient, but passes an invalid row's NaN on to
        # its gradient, which abs()'s subgradient sign(NaN) = 0 would hide.
        return 0.5 * (gap.abs() + 0.0 * gap.square()).sum(-1)
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


def cross_entropy_rows(z: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row cross-entropies ``-log_softmax(z)[label]`` ``(N,)`` of raw logits ``z`` ``(N, V)`` (temperature 1).

    ``log_softmax`` subtracts the row maximum before adding the log of the sum, so the ``log V`` of a row of
    ``finfo.min`` survives (``logsumexp(z) - z[label]`` rounds it away). A label outside ``[0, V)`` gives NaN
    (as in the kernels; ``F.cross_entropy`` would raise), one that points at a ``-inf`` logit gives ``+inf``.
    """
    log_q = torch.log_softmax(z.to(dtype), dim=-1)
    valid = (labels >= 0) & (labels < z.shape[-1])
    picked = log_q.gather(-1, torch.where(valid, labels, 0)[:, None])[:, 0]
    return -torch.where(valid, picked, float("nan"))


def kd_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "fkl",
    *,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    reduction: str = "mean",
    akl_alpha: float = 0.5,
    todi_beta: float = 1.0,
    skew_lambda: float = 0.1,
    jsd_beta: float = 0.5,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
) -> torch.Tensor:
    """The full loss of SPEC §3 on logits of shape ``(..., V)``, differentiable by autograd.

    ``row = kd_weight * divergence + ce_weight * CE(z, label)`` (CE at temperature 1); rows whose label is
    ``ignore_index`` count 0 and get gradient 0, whatever their logits hold. ``"mean"`` divides by the number
    of kept rows (0 when there are none). Labels may have any integer dtype.
    """
    vocab = student_logits.shape[-1]
    z = student_logits.reshape(-1, vocab)
    t = teacher_logits.reshape(-1, vocab)
    if labels is not None:
        flat = labels.reshape(-1).to(torch.int64)
        keep = flat != ignore_index
        # Zeros stand in for the ignored rows' logits (which may be NaN padding), so autograd never sees them.
        z = torch.where(keep[:, None], z, 0.0)
        t = torch.where(keep[:, None], t, 0.0)
    rows = kd_weight * divergence_rows(z, t, divergence, temperature, akl_alpha, todi_beta, skew_lambda, jsd_beta)
    if labels is not None:
        if ce_weight != 0.0:
            rows = rows + ce_weight * cross_entropy_rows(z, flat, rows.dtype)
        rows = torch.where(keep, rows, 0.0)
        count = keep.sum()
    else:
        if ce_weight != 0.0:
            raise ValueError("ce_weight needs labels")
        count = torch.tensor(rows.shape[0], device=rows.device)
    if reduction == "none":
        return rows.reshape(student_logits.shape[:-1])
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / count.clamp(min=1)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
