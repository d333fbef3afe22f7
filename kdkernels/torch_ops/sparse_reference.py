"""Plain PyTorch reference of the sparse (top-k) teacher losses (SPEC §7) and of ``topk_teacher``: the test oracle.

It materialises ``(N, V)`` tensors and lets autograd take the gradient; it computes in float64 when an input is
float64 and in float32 otherwise. Per row, with ``lq = log_softmax(z / T)`` over the whole vocabulary, the K given
ids and log-probs ``lp_k`` (entries with ``lp_k = -inf`` are padding and dropped):

- ``tail="bucket"``: categories are the valid ids in ascending id order, then a rest category. Student category
  log-probs ``lq_k`` and ``log q_rest = logsumexp_{j not in K} lq_j``; teacher category logits ``lp_k`` and
  ``log p_rest``: the caller's ``teacher_rest_logprob`` exactly when given, else
  ``log(max(1 - sum_K exp(lp_k), REST_FLOOR))`` in float64 (:func:`rest_log_prob`). The rest category is never
  masked for want of teacher mass (only a given ``-inf`` rest, or a student without entries outside K, meets the
  inf mask of SPEC §1, as the dense loss would). The dense divergence of ``reference.divergence_rows`` is
  evaluated on these category logits at temperature 1 (so, like the dense op, the teacher is ``softmax`` of its
  category logits: exactly the given probabilities whenever they sum to at most 1).
- ``tail="renormalize"``: the valid categories only (both distributions renormalised by the softmax).
- ``tail="truncate"`` (fkl only): ``sum_K p_k (lp_k - lq_k)`` with ``p_k = exp(lp_k)`` as given and the full-vocabulary
  ``lq`` (terms where ``lq_k = -inf`` dropped, as the dense inf mask does). Not a divergence: it can be negative.

A row whose valid ids are repeated or outside ``[0, V)`` has a NaN loss. Labels, ``ignore_index``, the CE term,
the weights and the reductions are those of ``reference.kd_loss_reference``.
"""

from __future__ import annotations

import torch

from kdkernels.torch_ops.reference import compute_dtype, cross_entropy_rows, divergence_rows

NEG_INF = float("-inf")
# The teacher's rest mass when only its top-k log-probs are known and they leave (about) nothing outside K: float32's
# smallest normal number, 2**-126. It stays positive in float32 where subnormals flush to zero, its log (-87.3) and
# its reciprocal (2**126) are finite float32 numbers, so every divergence, its mixtures and ToDi's weights stay finite
# and the rest category is never masked; and it lies below any rest mass a student has in practice, so the rest's
# gradient lowers the student's mass outside K (and raises the teacher's top entries) instead of dropping it.
REST_FLOOR = 2.0**-126


def invalid_rows(ids: torch.Tensor, valid: torch.Tensor, vocab: int) -> torch.Tensor:
    """``(N,)`` True where a row's valid ids (``valid`` ``(N, K)``) repeat or fall outside ``[0, vocab)``."""
    out_of_range = (valid & ((ids < 0) | (ids >= vocab))).any(-1)
    key = torch.where(valid, ids.to(torch.int64), torch.iinfo(torch.int64).max)
    ordered = key.sort(-1).values
    repeated = ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != torch.iinfo(torch.int64).max)).any(-1)
    return out_of_range | repeated


def rest_log_prob(lp: torch.Tensor) -> torch.Tensor:
    """``log(max(1 - sum exp(lp), REST_FLOOR))`` per row of ``lp`` ``(N, K)`` (``-inf``: padding), in ``lp``'s dtype
    (float64 where the result matters: ``1 - sum`` cancels). The floor applies when the given mass reaches 1."""
    return torch.log((-torch.expm1(torch.logsumexp(lp, dim=-1))).clamp(min=REST_FLOOR))


def sparse_divergence_rows(z: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor, divergence: str, tail: str,
                           temperature: float = 1.0, rest: torch.Tensor | None = None,
                           **params: float) -> torch.Tensor:
    """Row losses ``(N,)`` of student logits ``z`` ``(N, V)`` against the sparse teacher ``(ids, lp)`` ``(N, K)``;
    ``rest`` ``(N,)``: the teacher's log-mass outside K (bucket), or None for :func:`rest_log_prob`."""
    dtype = compute_dtype(z, lp)
    vocab = z.shape[-1]
    lp = lp.to(dtype)
    valid = lp != NEG_INF
    bad = invalid_rows(ids, valid, vocab)
    safe = torch.where(valid & ~bad[:, None], ids.to(torch.int64), 0)
    x = z.to(dtype) / temperature
    dead = (x == NEG_INF).all(-1, keepdim=True)
    lq = torch.log_softmax(torch.where(dead, 0.0, x), dim=-1)
    lq = torch.where(x == NEG_INF, NEG_INF, lq)
    lq_k = torch.where(valid, lq.gather(-1, safe), NEG_INF)
    if tail == "truncate":
        live = valid & (lq_k != NEG_INF)
        rows = (torch.where(live, lp.exp(), 0.0) * torch.where(live, lp - lq_k, 0.0)).sum(-1)
    else:
        order = torch.where(valid, safe, vocab).argsort(dim=-1, stable=True)  # ascending id, padding last
        student = lq_k.gather(-1, order)
        teacher = torch.where(valid, lp, NEG_INF).gather(-1, order)
        if tail == "bucket":
            # padding scatters into a dummy last column, so no write can clear a valid id's flag
            in_k = torch.zeros(x.shape[0], vocab + 1, dtype=torch.bool, device=x.device)
            in_k = in_k.scatter(-1, torch.where(valid, safe, vocab), True)[:, :vocab]
            q_rest = torch.logsumexp(torch.where(in_k, NEG_INF, lq), dim=-1)
            student = torch.cat([student, q_rest[:, None]], dim=-1)
            if rest is None:
                rest = rest_log_prob(torch.where(valid, lp, NEG_INF).to(torch.float64)).to(dtype)
            teacher = torch.cat([teacher, rest.to(dtype)[:, None]], dim=-1)
        rows = divergence_rows(student, teacher, divergence, 1.0, **params)
    return torch.where(bad, float("nan"), rows)


def sparse_kd_loss_reference(
    student_logits: torch.Tensor,
    teacher_indices: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    divergence: str = "fkl",
    *,
    tail: str = "bucket",
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    reduction: str = "mean",
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    teacher_rest_logprob: torch.Tensor | None = None,
    **params: float,
) -> torch.Tensor:
    """The sparse-teacher loss of SPEC §7 on ``(..., V)`` logits and ``(..., K)`` ids / log-probs, by autograd.

    ``teacher_rest_logprob``: ``(...)`` the teacher's log-mass outside K (bucket tail), or None (then
    :func:`rest_log_prob`). ``params``: the divergence parameters (``akl_alpha``, ``todi_beta``, ``skew_lambda``,
    ``jsd_beta``).
    """
    vocab, k = student_logits.shape[-1], teacher_indices.shape[-1]
    z = student_logits.reshape(-1, vocab)
    ids = teacher_indices.reshape(-1, k)
    lp = teacher_logprobs.reshape(-1, k)
    rest = None if teacher_rest_logprob is None else teacher_rest_logprob.reshape(-1)
    keep = None
    if labels is not None:
        flat = labels.reshape(-1).to(torch.int64)
        keep = flat != ignore_index
        z = torch.where(keep[:, None], z, 0.0)  # ignored rows may hold anything (NaN padding)
        lp = torch.where(keep[:, None], lp, NEG_INF)
        rest = None if rest is None else torch.where(keep, rest, 0.0)
    rows = kd_weight * sparse_divergence_rows(z, ids, lp, divergence, tail, temperature, rest, **params)
    if ce_weight != 0.0:
        rows = rows + ce_weight * cross_entropy_rows(z, flat, rows.dtype)
    if keep is not None:
        rows = torch.where(keep, rows, 0.0)
    if reduction == "none":
        return rows.reshape(student_logits.shape[:-1])
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (max(rows.shape[0], 1) if keep is None else keep.sum().clamp(min=1))


def topk_teacher_reference(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0, return_rest: bool = False):
    """``(ids int64, log-probs float64)`` ``(..., k)``: the ``k`` largest of ``log_softmax(t / T)`` in float64, in
    descending order, equal values in ascending id order (a stable sort); with ``return_rest`` also the float64 log of
    the mass outside them, ``logsumexp`` of the other log-probs ``(...)`` (``-inf`` for ``k = V``)."""
    lp = torch.log_softmax(teacher_logits.double() / temperature, dim=-1)
    values, ids = torch.sort(lp, dim=-1, descending=True, stable=True)
    if return_rest:
        return ids[..., :k], values[..., :k], torch.logsumexp(values[..., k:], dim=-1)
    return ids[..., :k], values[..., :k]
