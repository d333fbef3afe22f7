"""Row helpers shared by every loss path: inputs flattened to rows and row losses reduced (ops layer).

Every loss of the package works on rows: ``(..., V)`` logits become ``(N, V)`` with a contiguous vocabulary (the
kernels address rows by stride), labels ``(...)`` a contiguous int64 ``(N,)`` (the kernels index them by row), and
the ``(N,)`` row losses are reduced at the end by :func:`reduce_rows`. No host synchronisation here.
"""

from __future__ import annotations

import torch


def flat_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(..., V)`` as ``(N, V)`` rows whose vocabulary has unit stride (a view where it already has, so rows
    may still be strided; a contiguous copy otherwise)."""
    x = x.reshape(x.shape[:-1].numel(), x.shape[-1])  # not -1: a vocabulary slice may be empty
    return x if x.stride(-1) == 1 else x.contiguous()


def flat_labels(labels: torch.Tensor | None) -> torch.Tensor | None:
    """``labels`` ``(...)`` as a contiguous int64 ``(N,)`` (a strided view is copied); None stays None."""
    return None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()


def reduce_rows(rows: torch.Tensor, labels: torch.Tensor | None, ignore_index: int, reduction: str,
                lead_shape: torch.Size) -> torch.Tensor:
    """Reduce row losses ``(N,)``; ``"mean"`` divides by the kept rows (and gives 0 when there are none)."""
    if reduction == "none":
        return rows.reshape(lead_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    count = rows.shape[0] if labels is None else (labels != ignore_index).sum()
    if isinstance(count, torch.Tensor):
        count = count.clamp(min=1)
    else:
        count = max(count, 1)
    return total / count
