"""AKL's head/tail weights without a sort: the Triton kernels' radix select, written with torch ops.

The reference (``reference.akl_weights``) sorts every row; this finds the same cut in ``O(V)`` per 8-bit level:
order-preserving integer keys of the teacher logits (``-0.0`` keyed as ``+0.0``; the key order is the order of
``p``), a 256-bucket histogram of teacher mass per level (``scatter_add``), the bucket where the cumulative
mass crosses ``alpha``, and after the last level the cut's exact key. An entry is tail if its key is below the
cut, or equal to it and ``below + rank * p <= alpha`` (``rank``: its 1-based position among equal keys in index
order, ``below``: the mass of smaller keys), exactly the stable-sort rule of SPEC §2.
"""

from __future__ import annotations

import torch

from kdkernels.torch_ops.reference import akl_weights, head_tail_weights

_KEY_BITS = {torch.bfloat16: 16, torch.float16: 16, torch.float32: 32}
_INT_VIEW = {16: torch.int16, 32: torch.int32}


def order_keys(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Unsigned keys (int64) of ``t``'s bits that order like its values, and their width in bits."""
    bits = _KEY_BITS[t.dtype]
    raw = t.view(_INT_VIEW[bits]).to(torch.int64) & ((1 << bits) - 1)
    sign = 1 << (bits - 1)
    key = torch.where(raw >= sign, raw ^ ((1 << bits) - 1), raw ^ sign)
    return torch.where(t == 0, sign, key), bits


def akl_weights_select(t: torch.Tensor, p: torch.Tensor, q: torch.Tensor, alpha: float):
    """``(r_h, r_t)``, each ``(rows,)``, from teacher logits ``t`` and probabilities ``p``, ``q`` ``(rows, V)``.

    Float64 teachers (64-bit keys) go to the reference's stable sort.
    """
    if t.dtype not in _KEY_BITS:
        return akl_weights(p, q, alpha)
    key, bits = order_keys(t)
    rows = t.shape[0]
    buckets = torch.arange(256, device=t.device)
    prefix = torch.zeros(rows, 1, dtype=torch.int64, device=t.device)
    below = torch.zeros(rows, 1, dtype=p.dtype, device=t.device)
    for shift in range(bits - 8, -1, -8):
        match = (key >> (shift + 8)) == prefix
        digit = (key >> shift) & 255
        hist = torch.zeros(rows, 256, dtype=p.dtype, device=t.device).scatter_add_(1, digit, p * match)
        cum = below + hist.cumsum(1)
        bucket = (cum <= alpha).sum(1, keepdim=True).clamp(max=255)
        below = torch.where(buckets < bucket, cum, below).amax(1, keepdim=True)
        prefix = prefix * 256 + bucket
    at_cut = key == prefix
    rank = at_cut.cumsum(1)
    tail = (key < prefix) | (at_cut & (below + rank * p <= alpha))
    return head_tail_weights(tail, p, q)
