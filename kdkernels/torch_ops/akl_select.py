"""AKL's head/tail weights without a sort: a radix select over the teacher logits, written with torch ops.

The reference (``reference.akl_weights``) sorts every row; this finds the same cut in ``O(V)`` per 8-bit level.
Keys: the teacher logits' bits as int32 ``s``, negative values with their magnitude bits flipped, so that the
signed order of ``s`` is the order of the values, hence of ``p`` (``-0.0`` keyed as ``+0.0``). Each level builds
a 256-bucket histogram of teacher mass (``scatter_add``) over the entries whose higher digits match the cut's
so far, and takes the bucket where the cumulative mass crosses ``alpha``; after the last level the cut's exact
key is known. An entry is tail if its key is below the cut, or equal to it and ``below + rank * p <= alpha``
(``rank``: its 1-based position among equal keys in index order, ``below``: the mass of smaller keys), exactly
the stable-sort rule of SPEC §2. Everything is int32 (the scatter index aside): half the memory traffic of
int64 keys, and twice the lanes per vector instruction.
"""

from __future__ import annotations

import torch

from kdkernels.torch_ops.reference import akl_weights, head_tail_weights

_KEY_BITS = {torch.bfloat16: 16, torch.float16: 16, torch.float32: 32}
_INT_VIEW = {16: torch.int16, 32: torch.int32}


def order_keys(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Signed int32 keys ``s`` of ``t``'s bits whose order is the order of its values, and their width in bits.

    ``s = b`` for ``b >= 0`` and ``b`` with its ``bits - 1`` low bits flipped for ``b < 0`` (``b``: the bits as a
    signed integer); zeros of either sign get key 0.
    """
    bits = _KEY_BITS[t.dtype]
    raw = t.view(_INT_VIEW[bits]).to(torch.int32)
    key = raw ^ ((raw >> (bits - 1)) & ((1 << (bits - 1)) - 1))
    return torch.where(t == 0, 0, key), bits


def _pick_bucket(digit: torch.Tensor, mass: torch.Tensor, below: torch.Tensor, alpha: float):
    """One level: the bucket ``(rows, 1)`` (int32) of ``digit`` ``(rows, V)`` where the cumulative ``mass``, after
    the ``below`` ``(rows, 1)`` of the smaller keys, crosses ``alpha``; and the mass below that bucket."""
    hist = torch.zeros(digit.shape[0], 256, dtype=mass.dtype, device=mass.device)
    cum = below + hist.scatter_add_(1, digit.long(), mass).cumsum(1)
    bucket = (cum <= alpha).sum(1, keepdim=True, dtype=torch.int32).clamp(max=255)
    buckets = torch.arange(256, device=mass.device)
    return bucket, torch.where(buckets < bucket, cum, below).amax(1, keepdim=True)


def akl_weights_select(t: torch.Tensor, p: torch.Tensor, q: torch.Tensor, alpha: float):
    """``(r_h, r_t)``, each ``(rows,)``, from teacher logits ``t`` and probabilities ``p``, ``q`` ``(rows, V)``.

    The levels read the digits of the unsigned key ``s + 2**(bits - 1)`` from the top: ``(s >> (bits - 8)) + 128``,
    then ``(s >> shift) & 255``; ``prefix`` holds ``s_cut >> shift`` (an arithmetic shift), the cut's digits found
    so far. Float64 teachers (64-bit keys) go to the reference's sort.
    """
    if t.dtype not in _KEY_BITS:
        return akl_weights(p, q, alpha)
    key, bits = order_keys(t)
    below = torch.zeros(t.shape[0], 1, dtype=p.dtype, device=t.device)
    bucket, below = _pick_bucket((key >> (bits - 8)) + 128, p, below, alpha)
    prefix = bucket - 128
    for shift in range(bits - 16, -1, -8):
        mass = torch.where((key >> (shift + 8)) == prefix, p, 0.0)
        bucket, below = _pick_bucket((key >> shift) & 255, mass, below, alpha)
        prefix = prefix * 256 + bucket
    at_cut = key == prefix
    rank = at_cut.cumsum(1, dtype=torch.int32)
    tail = (key < prefix) | (at_cut & (below + rank * p <= alpha))
    return head_tail_weights(tail, p, q)
