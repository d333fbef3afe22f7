"""AKL's head/tail cut without a sort: a bracket from the stats pass, refinement passes, exact resolution.

The cut (SPEC §2): entries by ascending ``p``, ties by index; tail while the inclusive cumulative mass is
``<= alpha``. Ordering by ``p`` is ordering by the teacher logit, i.e. by its order key (``order_key``: the
bits, flipped so that unsigned comparison orders like the values, ``-0.0`` keyed as ``+0.0``). Brackets and splits
are ranges of keys; the streaming passes compare an entry's value with bounds that order like the keys
(``common.key_bound``), exactly alike in every pass.

1. ``stats_kernel`` (``forward.py``) keeps per lane, for ``HINT_BINS`` thresholds ``v_k = (A - k) W`` fixed by
   the first tile's maximum (``A = floor(max / W)``, ``W`` logits, rounded to the teacher's dtype), the mass
   below each relative to ``exp(v_0 / T)`` (at most 1, so no rescaling) and the count of entries at or above
   each; :func:`hint_bracket` turns them into the bracket ``[LO, HI)`` where the mass below crosses ``alpha``,
   with its exact number of entries.
2. ``akl_refine_kernel``: rows whose bracket holds more than ``CAPACITY`` entries (flat teachers) make
   passes over ``t`` alone; each splits the bracket's key range ``WAYS`` ways (half evenly in key, half in
   value), sums the exact mass below each split and keeps the part where the mass crosses ``alpha``, until at
   most ``CAPACITY`` entries or one key remain: the key splits bound the rounds by ``KEY_BITS / 2`` (8 for 16-bit
   teachers, 16 for float32) whatever the teacher; smooth teachers need far fewer.
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
    FKL_COL,
    LOG2E,
    LOGS_T,
    LOGS_Z,
    MAX_T,
    MAX_Z,
    MIN_NORMAL,
    NUM_STATS,
    R_HEAD,
    R_TAIL,
    RKL_COL,
    key_bound,
    key_value,
    load_block,
    load_key,
    log2_probs,
    only,
    order_key,
    pick,
    row_keep,
    store_key,
    store_row_loss,
    whole_blocks,
)


@triton.jit
def hint_thresholds(row_max, width, bins, dtype: tl.constexpr, KEY_BITS: tl.constexpr):
    """``(values, keys)`` of the thresholds ``(floor(max / W) - k) W``, ``k`` in ``bins``, in the teacher's dtype."""
    values = ((tl.floor(row_max / width) - bins) * width).to(dtype)
    return values.to(tl.float32), order_key(values, KEY_BITS)


@triton.jit
def count_bound(mass, low_value, max_t, log_st, scale2):
    """An upper bound on the entries of a key range from their mass and the smallest value they can take:
    each has ``p >= p(low_value)`` (a margin covers the rounding of the sums); infinite when that ``p`` is 0."""
    p_low = tl.exp2(log2_probs(low_value, max_t, log_st, scale2))
    return tl.where(p_low > 0, mass * 1.00001 / p_low, float("inf"))


@triton.jit
def hint_bracket(akl_row, lt_mass, at_least, entries, thr_keys, min_t, max_t, alpha, dtype: tl.constexpr,
                 KEY_BITS: tl.constexpr, HINT_BINS: tl.constexpr):
    """Store the bracket ``[LO, HI)`` (keys), its number of entries and fresh scratch columns, from the stats pass's
    ``lt_mass[k]`` and ``at_least[k]``: the teacher mass (probabilities) keyed below ``thr_keys[k]`` (decreasing in
    ``k``) and the entries keyed at or above it, of the row's ``entries``. The bracket's lower end is the highest
    threshold with the mass below it ``<= alpha``; past the thresholds the ends are the row's smallest and largest
    teacher logits.
    """
    bins = tl.arange(0, HINT_BINS)
    k0 = HINT_BINS - tl.sum((lt_mass <= alpha).to(tl.int32), axis=0)
    lo = tl.where(k0 == HINT_BINS, order_key(min_t.to(dtype), KEY_BITS), pick(thr_keys, bins, k0))
    hi = tl.where(k0 == 0, order_key(max_t.to(dtype), KEY_BITS) + 1, pick(thr_keys, bins, k0 - 1))
    below = tl.where(k0 == HINT_BINS, 0.0, pick(lt_mass, bins, k0))
    count = tl.where(k0 == HINT_BINS, entries, pick(at_least, bins, k0)) - tl.where(k0 == 0, 0.0,
                                                                                     pick(at_least, bins, k0 - 1))
    store_key(akl_row + AKL_LO, lo)
    store_key(akl_row + AKL_HI, hi)
    tl.store(akl_row + AKL_COUNT, count)
    tl.store(akl_row + AKL_BELOW, below)
    tl.store(akl_row + AKL_ROUNDS, 0.0)
    tl.store(akl_row + AKL_CUT_INDEX, -1.0)
    tl.store(akl_row + AKL_LISTED, 0.0)


@triton.jit
def _refine_block(t_in, masses, split_v, v_hi, max_t, log_st, scale2):
    """``akl_refine_kernel``'s loop body: add one loaded block of ``t`` to the per-lane masses below each of the
    8 splits and below ``k_hi`` (``split_v``, ``v_hi``: their ``common.key_bound``), returned (one 1-D sum each: a
    ``(ways, block)`` tensor would cost a shared-memory layout change a block)."""
    m0, m1, m2, m3, m4, m5, m6, m7, mass_top = masses
    v0, v1, v2, v3, v4, v5, v6, v7 = split_v
    t = t_in.to(tl.float32)
    p = tl.exp2(log2_probs(t, max_t, log_st, scale2))
    return (m0 + only(t < v0, p), m1 + only(t < v1, p), m2 + only(t < v2, p), m3 + only(t < v3, p),
            m4 + only(t < v4, p), m5 + only(t < v5, p), m6 + only(t < v6, p), m7 + only(t < v7, p),
            mass_top + only(t < v_hi, p))


@triton.jit
def akl_refine_kernel(
    t_ptr, labels_ptr, stats_ptr, akl_ptr,
    V, stride_t, inv_t, ignore_index, akl_alpha,
    HAS_LABELS: tl.constexpr, KEY_BITS: tl.constexpr, WAYS: tl.constexpr, CAPACITY: tl.constexpr,
    MAX_ROUNDS: tl.constexpr, BLOCK_V: tl.constexpr, STAGES: tl.constexpr, UNROLL: tl.constexpr,
):
    """Narrow the bracket of rows that may hold more than ``CAPACITY`` entries, by passes over ``t`` alone.

    Each round splits the key range ``[k_lo, k_hi)`` at ``WAYS`` points: ``WAYS / 2`` evenly spaced in key and
    ``WAYS / 2`` at the keys of teacher values (evenly spaced in the first round; after it, 1/16 of the range apart
    around the value where the mass, interpolated linearly between the ends, crosses ``alpha``: smooth teachers
    narrow by far more than 8 a round); it sums
    the exact mass below each split and keeps the part where the mass below crosses ``alpha``, until its bound on
    entries (``count_bound``) is at most ``CAPACITY`` or it is one key. The key splits alone leave a part of at most
    ``ceil(range / (WAYS / 2))`` keys, so ``MAX_ROUNDS = ceil(KEY_BITS / log2(WAYS / 2))`` rounds reach one key
    whatever the teacher, and the loop stops there. Other rows return at once. Entries past ``V`` read as -inf
    (mass 0). ``STAGES``: the loop's pipeline depth (``common.whole_blocks``).
    """
    KEY_WAYS: tl.constexpr = WAYS // 2
    tl.static_assert(WAYS == 8, "the refinement keeps one sum per split: 8 of them")
    row = tl.program_id(0).to(tl.int64)
    t_row = t_ptr + row * stride_t
    stats_row = stats_ptr + row * NUM_STATS
    akl_row = akl_ptr + row * AKL_COLS
    keep = row_keep(labels_ptr, row, ignore_index, HAS_LABELS)
    dtype: tl.constexpr = t_ptr.dtype.element_ty
    scale2 = inv_t * LOG2E
    max_t = tl.load(stats_row + MAX_T)
    log_st = tl.load(stats_row + LOGS_T)
    k_lo = load_key(akl_row + AKL_LO).to(tl.int64)
    k_hi = load_key(akl_row + AKL_HI).to(tl.int64)
    count = tl.load(akl_row + AKL_COUNT)
    below = tl.load(akl_row + AKL_BELOW)
    mass_hi = -1.0  # the mass below k_hi, known after a round (before: -1)
    rounds = 0
    ways = tl.arange(0, WAYS)
    part_of = (ways // 2).to(tl.int64)  # even ways split by key, odd ones by value
    lanes = tl.arange(0, BLOCK_V)
    while keep & (count > CAPACITY) & (k_hi - k_lo > 1) & (rounds < MAX_ROUNDS):
        v_lo = key_value(k_lo, dtype, KEY_BITS)
        v_top = key_value(k_hi - 1, dtype, KEY_BITS)
        by_key = k_lo + ((k_hi - k_lo) * part_of) // KEY_WAYS
        # value splits: evenly spaced in the first round; then 1/16 of the range apart around the value where the
        # mass, interpolated linearly between the part's ends, crosses alpha (the key splits keep the bound)
        cross = (akl_alpha - below) / (mass_hi - below)
        near = tl.minimum(tl.maximum(cross, 0.0), 1.0) + (2 * part_of.to(tl.float32) - 3) / 32
        spaced = v_lo + (v_top - v_lo) * tl.where(mass_hi > below, near, part_of.to(tl.float32) / KEY_WAYS)
        spaced = tl.where(tl.abs(spaced) < MIN_NORMAL, 0.0, spaced)  # subnormals to 0: keys stay in order
        spaced = order_key(spaced.to(dtype), KEY_BITS).to(tl.int64)
        by_value = tl.where(v_top - v_lo < float("inf"), tl.minimum(tl.maximum(spaced, k_lo), k_hi), k_lo)
        splits = tl.sort(tl.where(ways % 2 == 0, by_key, by_value))
        values = key_bound(splits, dtype, KEY_BITS)
        split_v = (pick(values, ways, 0), pick(values, ways, 1), pick(values, ways, 2), pick(values, ways, 3),
                   pick(values, ways, 4), pick(values, ways, 5), pick(values, ways, 6), pick(values, ways, 7))
        v_hi = key_bound(k_hi, dtype, KEY_BITS)
        zero = tl.zeros([BLOCK_V], tl.float32)  # per lane: the mass below each split, and below ``k_hi``
        masses = (zero, zero, zero, zero, zero, zero, zero, zero, zero)
        full = whole_blocks(V, BLOCK_V)
        for start in tl.range(0, full, BLOCK_V, num_stages=STAGES, loop_unroll_factor=UNROLL):
            masses = _refine_block(tl.load(t_row + start + lanes), masses, split_v, v_hi, max_t, log_st, scale2)
        offs = full + lanes
        masses = _refine_block(load_block(t_row, offs, offs < V), masses, split_v, v_hi, max_t, log_st, scale2)
        m0, m1, m2, m3, m4, m5, m6, m7, mass_top = masses
        mass = tl.where(ways == 0, tl.sum(m0, axis=0), tl.where(ways == 1, tl.sum(m1, axis=0), tl.where(
            ways == 2, tl.sum(m2, axis=0), tl.where(ways == 3, tl.sum(m3, axis=0), tl.where(
                ways == 4, tl.sum(m4, axis=0), tl.where(ways == 5, tl.sum(m5, axis=0), tl.where(
                    ways == 6, tl.sum(m6, axis=0), tl.sum(m7, axis=0))))))))
        # the last split with the mass below it <= alpha: the next one is above it (equal splits, equal masses)
        part = tl.maximum(tl.sum((mass <= akl_alpha).to(tl.int32), axis=0) - 1, 0)
        mass_hi = tl.where(part == WAYS - 1, tl.sum(mass_top, axis=0), pick(mass, ways, part + 1))
        below = pick(mass, ways, part)
        new_lo = pick(splits, ways, part)
        k_hi = tl.where(part == WAYS - 1, k_hi, pick(splits, ways, part + 1))
        k_lo = new_lo
        count = count_bound(mass_hi - below, key_value(k_lo, dtype, KEY_BITS), max_t, log_st, scale2)
        rounds += 1
    store_key(akl_row + AKL_LO, k_lo)
    store_key(akl_row + AKL_HI, k_hi)
    tl.store(akl_row + AKL_COUNT, count)
    tl.store(akl_row + AKL_BELOW, below)
    tl.store(akl_row + AKL_ROUNDS, rounds.to(tl.float32))


@triton.jit
def akl_rank_kernel(
    t_ptr, labels_ptr, stats_ptr, akl_ptr,
    V, stride_t, inv_t, ignore_index, akl_alpha,
    HAS_LABELS: tl.constexpr, KEY_BITS: tl.constexpr, CAPACITY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """For rows whose bracket is one key that may hold more than ``CAPACITY`` entries (equal ``p``): the index of
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
        guess = tl.minimum(tl.maximum(tl.floor((akl_alpha - below) / p), 0.0), 2.0 * V)
        guess = tl.where(below + (guess + 1.0) * p <= akl_alpha, guess + 1.0, guess)
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
    slots = tl.arange(0, CAPACITY)
    listed = slots.to(tl.float32) < tl.where(keep, tl.load(akl_row + AKL_LISTED), 0.0)
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
    div = r_h * tl.load(stats_row + FKL_COL) + r_t * tl.load(stats_row + RKL_COL)
    store_row_loss(loss_ptr, row, keep, div, stats_row, kd_weight, ce_weight, HAS_CE)
