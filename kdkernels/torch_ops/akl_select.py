"""AKL's head/tail weights without a sort: a radix select over the teacher logits, written with torch ops.

The reference (``reference.akl_weights``) sorts every row; this finds the same cut in ``O(V)`` per 8-bit level.
Keys: the teacher logits' bits as int32 ``s``, negative values with their magnitude bits flipped, so that the
signed order of ``s`` is the order of the values, hence of ``p`` (``-0.0`` keyed as ``+0.0``). Each level builds
a 256-bucket histogram of teacher mass (``scatter_add``) over the entries whose higher digits match the cut's
so far, and takes the bucket where the cumulative mass crosses ``alpha``; after the last level the cut's exact
key is known. An entry is tail if its key is below the cut, or equal to it and ``below + rank * p <= alpha``
(``rank``: its 1-based position among equal keys in index order, ``below``: the mass of smaller keys), exactly
the stable-sort rule of SPEC §2. Everything is int32 (the scatter index aside): half the memory traffic of
int64 keys, and twice the lanes per vector instruction (float64 teachers, keyed only on the vocabulary-parallel
path, take int64 keys and 8 levels).

Vocabulary-parallel rows (SPEC §8): with a ``reducer`` (``vocab_parallel.GroupReducer``), each rank holds a slice of
every row; the per-level histograms ``(rows, 256)`` are summed over the group before the bucket is picked, so
every rank finds the same cut, and an entry's tie rank counts the equal keys of the lower ranks (whose slices hold
the lower indices) first.
"""

from __future__ import annotations

import torch

from kdkernels.torch_ops.reference import akl_weights, head_tail_weights

_KEY_BITS = {torch.bfloat16: 16, torch.float16: 16, torch.float32: 32, torch.float64: 64}
_INT_VIEW = {16: torch.int16, 32: torch.int32, 64: torch.int64}


def order_keys(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Signed int32 keys ``s`` of ``t``'s bits (int64 for float64) whose order is the order of its values, and
    their width in bits.

    ``s = b`` for ``b >= 0`` and ``b`` with its ``bits - 1`` low bits flipped for ``b < 0`` (``b``: the bits as a
    signed integer); zeros of either sign get key 0.
    """
    bits = _KEY_BITS[t.dtype]
    raw = t.view(_INT_VIEW[bits]).to(torch.int64 if bits == 64 else torch.int32)
    key = raw ^ ((raw >> (bits - 1)) & ((1 << (bits - 1)) - 1))
    return torch.where(t == 0, 0, key), bits


def _pick_bucket(digit: torch.Tensor, mass: torch.Tensor, below: torch.Tensor, alpha: float, reducer=None):
    """One level: the bucket ``(rows, 1)`` (``digit``'s dtype) of ``digit`` ``(rows, V)`` where the cumulative
    ``mass``, after the ``below`` ``(rows, 1)`` of the smaller keys, crosses ``alpha``; and the mass below that
    bucket. With a ``reducer`` the histogram ``(rows, 256)`` is summed over its group first."""
    hist = torch.zeros(digit.shape[0], 256, dtype=mass.dtype, device=mass.device)
    hist.scatter_add_(1, digit.long(), mass)
    if reducer is not None:
        hist = reducer.sum(hist)
    cum = below + hist.cumsum(1)
    bucket = (cum <= alpha).sum(1, keepdim=True, dtype=digit.dtype).clamp(max=255)
    buckets = torch.arange(256, device=mass.device)
    return bucket, torch.where(buckets < bucket, cum, below).amax(1, keepdim=True)


def akl_weights_select(t: torch.Tensor, p: torch.Tensor, q: torch.Tensor, alpha: float):
    """``(r_h, r_t)``, each ``(rows,)``, from teacher logits ``t`` and probabilities ``p``, ``q`` ``(rows, V)``.

    Float64 teachers go to the reference's sort (gradcheck's inputs); the others to :func:`akl_tail_select`.
    """
    if t.dtype == torch.float64:
        return akl_weights(p, q, alpha)
    return head_tail_weights(akl_tail_select(t, p, alpha), p, q)


def akl_tail_select(t: torch.Tensor, p: torch.Tensor, alpha: float, reducer=None) -> torch.Tensor:
    """AKL's tail ``(rows, V)`` bool of teacher logits ``t`` and probabilities ``p`` ``(rows, V)``, by radix select.

    The levels read the digits of the unsigned key ``s + 2**(bits - 1)`` from the top: ``(s >> (bits - 8)) + 128``,
    then ``(s >> shift) & 255``; ``prefix`` holds ``s_cut >> shift`` (an arithmetic shift), the cut's digits found
    so far. With a ``reducer`` (vocabulary-parallel rows, see the module docstring) ``t`` and ``p`` are this rank's
    slice, the histograms are summed over the group, and ``rank`` is offset by ``reducer.count_before`` of this
    slice's count of keys equal to the cut.
    """
    key, bits = order_keys(t)
    below = torch.zeros(t.shape[0], 1, dtype=p.dtype, device=t.device)
    bucket, below = _pick_bucket((key >> (bits - 8)) + 128, p, below, alpha, reducer)
    prefix = bucket - 128
    for shift in range(bits - 16, -1, -8):
        mass = torch.where((key >> (shift + 8)) == prefix, p, 0.0)
        bucket, below = _pick_bucket((key >> shift) & 255, mass, below, alpha, reducer)
        prefix = prefix * 256 + bucket
    at_cut = key == prefix
    rank = at_cut.cumsum(1, dtype=torch.int32)
    if reducer is not None:
        rank = rank + reducer.count_before(at_cut.sum(1, dtype=torch.int32))[:, None]
    return (key < prefix) | (at_cut & (below + rank * p <= alpha))
