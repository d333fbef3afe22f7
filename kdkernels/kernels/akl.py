"""AKL's head/tail cut without a sort: a bracket from the stats pass, refinement passes, exact resolution.

The cut (SPEC §2): entries by ascending ``p``, ties by index; tail while the inclusive cumulative mass is
``<= alpha``. Ordering by ``p`` is ordering by the teacher logit, i.e. by its order key (``order_key``: the
bits, flipped so that unsigned comparison orders like the values, ``-0.0`` keyed as ``+0.0``), so every pass
classifies entries by integer comparisons of keys, exactly alike.

1. ``stats_kernel`` (``forward.py``) keeps per lane, for ``HINT_BINS`` thresholds ``v_k = (A - k) W`` fixed by
   the first block's maximum (``A = floor(max / W)``, ``W`` logits, rounded to the teacher's dtype), the count
   of entries below each and their mass relative to ``exp(v_0 / T)`` (at most 1, so no rescaling);
   :func:`hint_bracket` turns them into the bracket ``[LO, HI)`` where the mass below crosses ``alpha``.
2. ``akl_refine_kernel``: rows whose bracket holds more than ``CAPACITY`` entries (flat teachers) make
   passes over ``t`` alone; each splits the bracket's key range ``WAYS`` ways, sums the exact mass and the
   count below each split and keeps the part where the mass crosses ``alpha``, until at most ``CAPACITY``
   entries or one key remain (at most 4 passes for 16-bit teachers, 8 for float32).
3. ``akl_rank_kernel``: a bracket of one key with more than ``CAPACITY`` entries (a large tie group) is settled
   by rank: its ``r`` lowest-index entries are tail, ``r`` the largest with ``below + r p <= alpha``.
4. ``finish_kernel`` (``forward.py``) sums the gaps ``|p - q|`` of the entries below / above the bracket and
   lists the indices of those inside it; ``akl_resolve_kernel`` orders the listed entries by (key, index),
   settles each by its cumulative mass and writes ``r_h``, ``r_t`` and the loss.

Every mass that decides the cut is ``exp2`` of the final log-probabilities (``log2_probs``), as in the finish
and gradient passes; the stats pass's masses only place the bracket.
"""

import triton
import triton.language as tl

from kdkernels.kernels.common import (
    AKL_BELOW,
    AKL_COLS,
    AKL_COUNT,
    AKL_CUT_INDEX,
    AKL_G_HEAD,
    AKL_G_TAIL,
    AKL_HI,
    AKL_LISTED,
    AKL_LO,
    AKL_MASS_BELOW,
    AKL_ROUNDS,
    CE,
    FKL_COL,
    LOG2E,
    LOGS_T,
    LOGS_Z,
    MAX_T,
    MAX_Z,
    NUM_STATS,
    R_HEAD,
    R_TAIL,
    RKL_COL,
    key_value,
    load_key,
    log2_probs,
    order_key,
    pick,
    row_keep,
    store_key,
)


@triton.jit
def hint_thresholds(row_max, width, bins, dtype: tl.constexpr, KEY_BITS: tl.constexpr):
    """``(values, keys)`` of the thresholds ``(floor(max / W) - k) W``, ``k`` in ``bins``, in the teacher's dtype."""
    values = ((tl.floor(row_max / width) - bins) * width).to(dtype)
    return values.to(tl.float32), order_key(values, KEY_BITS)


@triton.jit
def hint_bracket(akl_row, lt_mass, lt_count, thr_keys, top_scale, s_t, n_entries, alpha, dtype: tl.constexpr,
                 KEY_BITS: tl.constexpr, HINT_BINS: tl.constexpr):
    """Store the bracket ``[LO, HI)`` (keys), its entry count and fresh scratch columns, from the stats pass.

    ``lt_mass[k]``/``lt_count[k]``: mass and count of the entries keyed below ``thr_keys[k]`` (decreasing in
    ``k``); ``lt_mass * top_scale`` is on the scale of ``s_t``. The bracket's lower end is the highest threshold
    with the mass below it ``<= alpha``; the ends past the thresholds are the keys of -inf and of +inf plus one.
    """
    bins = tl.arange(0, HINT_BINS)
    below = lt_mass * top_scale / s_t
    k0 = HINT_BINS - tl.sum((below <= alpha).to(tl.int32), axis=0)
    lowest = order_key(tl.full([], float("-inf"), tl.float32).to(dtype), KEY_BITS)
    highest = order_key(tl.full([], float("inf"), tl.float32).to(dtype), KEY_BITS) + 1
    lo = tl.where(k0 == HINT_BINS, lowest, pick(thr_keys, bins, k0))
    hi = tl.where(k0 == 0, highest, pick(thr_keys, bins, k0 - 1))
    count_lo = tl.where(k0 == HINT_BINS, 0.0, pick(lt_count, bins, k0))
    count_hi = tl.where(k0 == 0, n_entries, pick(lt_count, bins, k0 - 1))
    store_key(akl_row + AKL_LO, lo)
    store_key(akl_row + AKL_HI, hi)
    tl.store(akl_row + AKL_COUNT, count_hi - count_lo)
    tl.store(akl_row + AKL_BELOW, 0.0)
    tl.store(akl_row + AKL_ROUNDS, 0.0)
    tl.store(akl_row + AKL_CUT_INDEX, -1.0)
    tl.store(akl_row + AKL_LISTED, 0.0)


@triton.jit
def akl_refine_kernel(
    t_ptr, labels_ptr, stats_ptr, akl_ptr,
    V, stride_t, inv_t, ignore_index, akl_alpha,
    HAS_LABELS: tl.constexpr, KEY_BITS: tl.constexpr, WAYS: tl.constexpr, CAPACITY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Narrow the bracket of rows with more than ``CAPACITY`` entries in it, by passes over ``t`` alone.

    Each round splits the key range ``[k_lo, k_hi)`` at ``k_lo + span * j // WAYS`` and keeps the part where
    the exact mass below crosses ``alpha``. Other rows return at once.
    """
    row = tl.program_id(0).to(tl.int64)
    t_row = t_ptr + row * stride_t
    stats_row = stats_ptr + row * NUM_STATS
    akl_row = akl_ptr + row * AKL_COLS
    keep = row_keep(labels_ptr, row, ignore_index, HAS_LABELS)
    scale2 = inv_t * LOG2E
    max_t = tl.load(stats_row + MAX_T)
    log_st = tl.load(stats_row + LOGS_T)
    k_lo = load_key(akl_row + AKL_LO).to(tl.int64)
    k_hi = load_key(akl_row + AKL_HI).to(tl.int64)
    count = tl.load(akl_row + AKL_COUNT)
    below = tl.load(akl_row + AKL_BELOW)
    rounds = tl.load(akl_row + AKL_ROUNDS)
    ways = tl.arange(0, WAYS)
    while keep & (count > CAPACITY) & (k_hi - k_lo > 1):
        splits = k_lo + ((k_hi - k_lo) * ways) // WAYS
        split_keys = splits.to(tl.uint32)
        top = (k_hi - 1).to(tl.uint32)
        mass_lt = tl.zeros([BLOCK_V, WAYS], tl.float32)  # per lane, below each split
        count_lt = tl.zeros([BLOCK_V, WAYS], tl.float32)
        count_top = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            # past V read NaN: its key is above every split and the bracket
            t_in = tl.load(t_row + offs, mask=offs < V, other=float("nan"))
            key = order_key(t_in, KEY_BITS)
            p = tl.exp2(log2_probs(t_in.to(tl.float32), max_t, log_st, scale2))
            lt = key[:, None] < split_keys[None, :]
            mass_lt += tl.where(lt, p[:, None], 0.0)
            count_lt += lt.to(tl.float32)
            count_top += (key <= top).to(tl.float32)
        mass = tl.sum(mass_lt, axis=0)
        counts = tl.sum(count_lt, axis=0)
        part = tl.maximum(tl.sum((mass <= akl_alpha).to(tl.int32), axis=0) - 1, 0)
        count_hi = tl.where(part == WAYS - 1, tl.sum(count_top, axis=0), pick(counts, ways, part + 1))
        count = count_hi - pick(counts, ways, part)
        below = pick(mass, ways, part)
        k_hi = tl.where(part == WAYS - 1, k_hi, pick(splits, ways, part + 1))
        k_lo = pick(splits, ways, part)
        rounds += 1.0
    store_key(akl_row + AKL_LO, k_lo)
    store_key(akl_row + AKL_HI, k_hi)
    tl.store(akl_row + AKL_COUNT, count)
    tl.store(akl_row + AKL_BELOW, below)
    tl.store(akl_row + AKL_ROUNDS, rounds)


@triton.jit
def akl_rank_kernel(
    t_ptr, labels_ptr, stats_ptr, akl_ptr,
    V, stride_t, inv_t, ignore_index, akl_alpha,
    HAS_LABELS: tl.constexpr, KEY_BITS: tl.constexpr, CAPACITY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """For rows whose bracket is one key held by more than ``CAPACITY`` entries (equal ``p``): the index of
    the last tail entry among them in index order (an entry of rank ``r`` is tail when ``below + r p <= alpha``).
    One pass over ``t``; other rows return at once.
    """
    row = tl.program_id(0).to(tl.int64)
    t_row = t_ptr + row * stride_t
    stats_row = stats_ptr + row * NUM_STATS
    akl_row = akl_ptr + row * AKL_COLS
    keep = row_keep(labels_ptr, row, ignore_index, HAS_LABELS)
    count = tl.load(akl_row + AKL_COUNT)
    if keep & (count > CAPACITY):
        group = load_key(akl_row + AKL_LO)
        below = tl.load(akl_row + AKL_BELOW)
        value = key_value(group, t_ptr.dtype.element_ty, KEY_BITS)
        p = tl.exp2(log2_probs(value, tl.load(stats_row + MAX_T), tl.load(stats_row + LOGS_T), inv_t * LOG2E))
        guess = tl.minimum(tl.maximum(tl.floor((akl_alpha - below) / p), 0.0), count)
        guess = tl.where((guess < count) & (below + (guess + 1.0) * p <= akl_alpha), guess + 1.0, guess)
        tail = tl.where((guess > 0) & (below + guess * p > akl_alpha), guess - 1.0, guess).to(tl.int32)
        cut = -1
        seen = 0
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            member = order_key(tl.load(t_row + offs, mask=offs < V, other=float("nan")), KEY_BITS) == group
            rank = seen + tl.cumsum(member.to(tl.int32), axis=0)
            cut = tl.maximum(cut, tl.max(tl.where(member & (rank <= tail), offs, -1), axis=0))
            seen = tl.max(rank, axis=0)
        tl.store(akl_row + AKL_CUT_INDEX, cut.to(tl.float32))


@triton.jit
def akl_resolve_kernel(
    z_ptr, t_ptr, labels_ptr, loss_ptr, stats_ptr, akl_ptr, list_ptr,
    stride_z, stride_t, inv_t, ignore_index, kd_weight, ce_weight, akl_alpha,
    HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, KEY_BITS: tl.constexpr, CAPACITY: tl.constexpr,
):
    """Order the listed bracket entries by (key, index), settle each side, write ``r_h``, ``r_t`` and the loss.

    An entry is tail when the finish pass's mass below the bracket plus the inclusive cumulative mass in that
    order is ``<= alpha``. ``r_h = g_head / (g_head + g_tail)``, ``r_t`` alike (0.5 each when both are 0);
    the row loss is ``kd_weight (r_h F + r_t R) + ce_weight CE``, 0 for ignored rows.
    """
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    t_row = t_ptr + row * stride_t
    stats_row = stats_ptr + row * NUM_STATS
    akl_row = akl_ptr + row * AKL_COLS
    keep = row_keep(labels_ptr, row, ignore_index, HAS_LABELS)
    scale2 = inv_t * LOG2E
    count = tl.load(akl_row + AKL_COUNT)
    slots = tl.arange(0, CAPACITY)
    listed = slots.to(tl.float32) < tl.where(keep & (count <= CAPACITY), count, 0.0)
    index = tl.load(list_ptr + row * CAPACITY + slots, mask=listed, other=0)
    key = order_key(tl.load(t_row + index, mask=listed, other=0.0), KEY_BITS)
    packed = tl.where(listed, (key.to(tl.int64) << 31) | index.to(tl.int64), 0x7FFFFFFFFFFFFFFF)
    ordered = tl.sort(packed)
    valid = ordered != 0x7FFFFFFFFFFFFFFF
    index = (ordered & 0x7FFFFFFF).to(tl.int32)
    t = tl.load(t_row + index, mask=valid, other=float("-inf")).to(tl.float32)
    z = tl.load(z_row + index, mask=valid, other=float("-inf")).to(tl.float32)
    p = tl.exp2(log2_probs(t, tl.load(stats_row + MAX_T), tl.load(stats_row + LOGS_T), scale2))
    q = tl.exp2(log2_probs(z, tl.load(stats_row + MAX_Z), tl.load(stats_row + LOGS_Z), scale2))
    gap = tl.abs(p - q)
    tail = valid & (tl.load(akl_row + AKL_MASS_BELOW) + tl.cumsum(p, axis=0) <= akl_alpha)
    g_tail = tl.load(akl_row + AKL_G_TAIL) + tl.sum(tl.where(tail, gap, 0.0), axis=0)
    g_head = tl.load(akl_row + AKL_G_HEAD) + tl.sum(tl.where(valid & ~tail, gap, 0.0), axis=0)
    total = g_head + g_tail
    r_h = tl.where(total > 0, g_head / total, 0.5)
    r_t = tl.where(total > 0, g_tail / total, 0.5)
    tl.store(stats_row + R_HEAD, r_h)
    tl.store(stats_row + R_TAIL, r_t)
    value = kd_weight * (r_h * tl.load(stats_row + FKL_COL) + r_t * tl.load(stats_row + RKL_COL))
    if HAS_CE:
        value += ce_weight * tl.load(stats_row + CE)
    tl.store(loss_ptr + row, tl.where(keep, value, 0.0))
