"""Forward kernels: one program per row, streaming the vocabulary in blocks.

Passes over the logits in the forward (the backward adds one over ``z`` and ``t``, see ``backward.py``):

- fkl, rkl: 1 pass (``stats_kernel``): the row maxima and sums of ``exp`` that give the log-sum-exps, and the
  sums that give ``P``, ``Q``, ``F`` and ``R``, so the loss needs no second pass.
- todi: 2 passes: ``stats_kernel``, then ``finish_kernel`` (``S_a``, ``S_b``, the loss).
- akl: 2 passes over ``z`` and ``t`` for most rows (``stats_kernel``, which also brackets the head/tail cut,
  and ``finish_kernel``), plus passes over ``t`` alone for flat teachers; see ``akl.py``.
- sfkl, srkl, jsd, tvd (SPEC §2b): 2 passes: ``stats_kernel`` (the log-sum-exps only, as cheap as for fkl), then
  ``finish_kernel``: per entry the mixture (or ``|p - q|``) needs both final log-sum-exps; it sums the loss and
  ``Q_G = sum_m q g``, ``g = dL/dq``, which makes the gradient one pass (``backward.py``).

Every sum is kept per lane (a ``BLOCK_V`` vector) and reduced once at the end of the row; each lane's running
maximum rescales its sums when it grows. The loops are pipelined (``common.whole_blocks``). Work is in base 2
(``exp2``, ``scale2 = log2(e) / T``); the row maximum of the raw logits and the log of the sum are stored apart
(``MAX_*``, ``LOGS_*``), so probabilities are rebuilt as ``exp2((x - max) * scale2 - log2 s)`` at any logit
magnitude. A row's maximum starts at -inf: rows of
``finfo.min`` are ordinary rows.
"""

import triton
import triton.language as tl

from kdkernels.kernels.akl import hint_bracket, hint_thresholds
from kdkernels.kernels.common import (
    AKL,
    AKL_COLS,
    AKL_COUNT,
    AKL_CUT_INDEX,
    AKL_G_HEAD,
    AKL_G_TAIL,
    AKL_HI,
    AKL_LISTED,
    AKL_LO,
    AKL_MASS_BELOW,
    CE,
    FKL,
    FKL_COL,
    FLOOR,
    FOUND_T,
    FOUND_Z,
    JSD,
    LN2,
    LOG2E,
    LOGS_CE,
    LOGS_T,
    LOGS_Z,
    MASS_P,
    MASS_Q,
    MAX_CE,
    MAX_T,
    MAX_Z,
    NUM_STATS,
    Q_G,
    RKL,
    RKL_COL,
    SFKL,
    SRKL,
    TODI,
    TODI_S,
    TVD,
    floored,
    key_bound,
    lane_batch,
    lane_total,
    load_block,
    load_key,
    log2_probs,
    mixture,
    only,
    pick,
    row_keep,
    safe_log,
    safe_max,
    store_row_loss,
    stored_max,
    todi_weights,
    whole_blocks,
)


@triton.jit
def _stats_block(z_in, t_in, offs, limit, state, scale2, ce_scale, thr_v, thr_top, PARTIAL: tl.constexpr,
                 DIVERGENCE: tl.constexpr, OWN_CE: tl.constexpr, CE_SQUARE: tl.constexpr):
    """``stats_kernel``'s loop body: add one loaded tile (``(L, R)``: ``R`` entries for each of the ``L`` lanes, at
    indices ``offs``; ``PARTIAL``: it may reach past the row's end) to the per-lane state, returned."""
    m_z, m_t, s_z, s_t, s_c, a_f, p_s, a_r, q_s, lt_mass, at_least, min_t = state
    NEED_F: tl.constexpr = DIVERGENCE == FKL
    NEED_R: tl.constexpr = DIVERGENCE == RKL
    z = z_in.to(tl.float32)
    t = t_in.to(tl.float32)
    mz_new, s_z, shift_z, c_z, e_z = lane_batch(m_z, s_z, z, scale2)
    mt_new, s_t, shift_t, c_t, e_t = lane_batch(m_t, s_t, t, scale2)
    if NEED_F or NEED_R:
        # an entry adds where neither logit is -inf; of the summed side (fkl: t, rkl: z) the weight's e > 0 stands in
        # for that check, and also drops an entry whose c overflowed to -inf (a finite logit ~finfo.min below the
        # lane's maximum; its e is 0, its gap would be 0 * inf)
        live = ((z if NEED_F else t) != float("-inf")) & ((e_t if NEED_F else e_z) > 0.0)
        gap = tl.where(live, c_t - c_z, 0.0)  # log2(p / q) up to the lanes' constants
        shifted = shift_t - shift_z  # both clamped: finite
    if NEED_F:
        # a_f = sum e_t (c_t - c_z) moves to the new maxima as r_t (a_f + p_s (shift_t - shift_z)), r_t = 2^shift_t;
        # the product r_t p_s first, so that a lane whose old terms vanish (r_t = 0) adds 0, not 0 * inf
        e_live = tl.where(live, e_t, 0.0)
        p_old = p_s * tl.exp2(shift_t)
        a_f = a_f * tl.exp2(shift_t) + p_old * shifted + tl.sum(e_live * gap, axis=1)
        p_s = p_old + tl.sum(e_live, axis=1)
    if NEED_R:
        e_live = tl.where(live, e_z, 0.0)
        q_old = q_s * tl.exp2(shift_z)
        a_r = a_r * tl.exp2(shift_z) - q_old * shifted - tl.sum(e_live * gap, axis=1)
        q_s = q_old + tl.sum(e_live, axis=1)
    if CE_SQUARE:  # T = 2: the student's weights at T = 1 are the squares of those at T
        r_z = tl.exp2(shift_z)
        s_c = s_c * (r_z * r_z) + tl.sum(e_z * e_z, axis=1)
    elif OWN_CE:
        s_c = s_c * tl.exp2(shift_z * ce_scale) + tl.sum(tl.exp2(c_z * ce_scale), axis=1)
    if DIVERGENCE == AKL:
        # one 1-D sum per threshold (a (bins, lanes) tensor would cost a shared-memory layout change a tile);
        # below a threshold's bound (``common.key_bound``) is below it by order key
        # relative to the top threshold, at most 1: entries above it (the first tile may lie far below the
        # rest) count in no sum, and would otherwise overflow to inf, and inf * 0 is NaN (``only``)
        e_top = tl.exp2(tl.minimum((t - thr_top) * scale2, 0.0))  # past V: -inf, mass 0
        lt0, lt1, lt2, lt3 = lt_mass
        ge0, ge1, ge2, ge3 = at_least
        v0, v1, v2, v3 = thr_v
        lt_mass = (lt0 + tl.sum(only(t < v0, e_top), axis=1), lt1 + tl.sum(only(t < v1, e_top), axis=1),
                   lt2 + tl.sum(only(t < v2, e_top), axis=1), lt3 + tl.sum(only(t < v3, e_top), axis=1))
        at_least = (ge0 + tl.sum(tl.where(t < v0, 0.0, 1.0), axis=1), ge1 + tl.sum(tl.where(t < v1, 0.0, 1.0), axis=1),
                    ge2 + tl.sum(tl.where(t < v2, 0.0, 1.0), axis=1), ge3 + tl.sum(tl.where(t < v3, 0.0, 1.0), axis=1))
        if PARTIAL:
            t = tl.where(offs < limit, t, float("inf"))
        min_t = tl.minimum(min_t, tl.min(t, axis=1))
    return (mz_new, mt_new, s_z, s_t, s_c, a_f, p_s, a_r, q_s, lt_mass, at_least, min_t)


@triton.jit
def per_bin(sums, bins):
    """The row totals of 4 per-lane sums, as a vector over ``bins``."""
    s0, s1, s2, s3 = sums
    return tl.where(bins == 0, tl.sum(s0, axis=0), tl.where(bins == 1, tl.sum(s1, axis=0), tl.where(
        bins == 2, tl.sum(s2, axis=0), tl.sum(s3, axis=0))))


@triton.jit
def stats_kernel(
    z_ptr, t_ptr, labels_ptr, loss_ptr, stats_ptr, akl_ptr,
    V, stride_z, stride_t, inv_t, ignore_index, kd_weight, ce_weight, akl_alpha, hint_width,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, CE_SHARES_Z: tl.constexpr,
    CE_SQUARE: tl.constexpr, KEY_BITS: tl.constexpr, HINT_BINS: tl.constexpr, BLOCK_V: tl.constexpr,
    BATCH: tl.constexpr, STAGES: tl.constexpr, UNROLL: tl.constexpr,
):
    """First pass: row maxima and log-sums, CE, ``P``, ``F`` (fkl), ``Q``, ``R`` (rkl), AKL's bracket.

    z, t: (N, V) rows at ``stride_z``/``stride_t``; labels: (N,) int64 if HAS_LABELS; loss: (N,) float32
    (written for fkl/rkl); stats: (N, NUM_STATS) float32; akl: (N, AKL_COLS) float32 (AKL only).
    ``CE_SHARES_Z``: T == 1, so the CE term's log-sum-exp is the student's; ``CE_SQUARE``: T == 2, so its weights
    are the squares of the student's. ``hint_width``: AKL's ``W`` (``akl.py``), ``KEY_BITS`` the width of the
    teacher's order keys. ``STAGES``: the loop's pipeline depth (``common.whole_blocks``).

    The row is read in tiles of ``BLOCK_V`` lanes of ``BATCH`` consecutive entries (``launch.stats_tile``),
    ``UNROLL`` tiles an iteration. Every lane keeps its own running maxima of ``z`` and ``t`` and the sums centred
    on them, raised once a tile (:func:`lane_batch`), so the loop has no block-wide reduction; fkl's
    ``a_f = sum_m e_t (c_t - c_z)`` (``c`` the centred log2 weights, ``e_t = 2^c_t``) moves with both maxima as
    ``2^shift_t (a_f + p_s (shift_t - shift_z))``, rkl's ``a_r`` alike.
    """
    NEED_F: tl.constexpr = DIVERGENCE == FKL  # AKL sums F and R in its finish pass
    NEED_R: tl.constexpr = DIVERGENCE == RKL
    OWN_CE: tl.constexpr = HAS_CE and not CE_SHARES_Z
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    t_row = t_ptr + row * stride_t
    stats_row = stats_ptr + row * NUM_STATS
    keep = row_keep(labels_ptr, row, ignore_index, HAS_LABELS)
    limit = tl.where(keep, V, 0)  # ignored rows read nothing
    scale2 = inv_t * LOG2E
    ce_scale = 1.0 / inv_t  # from the student's log2 weights at T to those at 1

    m_z = tl.full([BLOCK_V], FLOOR, tl.float32)
    m_t = tl.full([BLOCK_V], FLOOR, tl.float32)
    s_z = tl.zeros([BLOCK_V], tl.float32)
    s_t = tl.zeros([BLOCK_V], tl.float32)
    s_c = tl.zeros([BLOCK_V], tl.float32)
    a_f = tl.zeros([BLOCK_V], tl.float32)  # sum_m e_t (c_t - c_z), c = log2 weights centred on the lane maxima
    p_s = tl.zeros([BLOCK_V], tl.float32)  # sum_m e_t
    a_r = tl.zeros([BLOCK_V], tl.float32)  # sum_m e_z (c_z - c_t)
    q_s = tl.zeros([BLOCK_V], tl.float32)  # sum_m e_z
    bins = tl.arange(0, HINT_BINS)
    # AKL: per lane, mass below each threshold (thresholds first: each lane keeps its own) and smallest logit;
    # the thresholds are fixed by the first tile's maximum, their masses relative to the top one (never above 1)
    tl.static_assert(HINT_BINS == 4, "the stats pass keeps one sum per threshold: 4 of them")
    lt_mass = (tl.zeros([BLOCK_V], tl.float32), tl.zeros([BLOCK_V], tl.float32), tl.zeros([BLOCK_V], tl.float32),
               tl.zeros([BLOCK_V], tl.float32))
    at_least = lt_mass  # and the entries at or above each threshold (float32 counts: exact below 2^24)
    min_t = tl.full([BLOCK_V], float("inf"), tl.float32)
    thr = tl.zeros([HINT_BINS], tl.float32)
    thr_keys = tl.zeros([HINT_BINS], tl.uint32)
    thr_top = 0.0
    # a tile: BATCH consecutive entries for each lane, loaded as one vector (Triton's reshape keeps each lane's
    # entries in its thread when they are no more than one vectorised load holds)
    tile = tl.arange(0, BLOCK_V * BATCH)
    if DIVERGENCE == AKL:
        first = load_block(t_row, tile, tile < limit).to(tl.float32)
        thr, thr_keys = hint_thresholds(safe_max(tl.max(first, axis=0)), hint_width, bins, t_ptr.dtype.element_ty,
                                        KEY_BITS)
        thr_top = tl.max(thr, axis=0)
    bound = key_bound(thr_keys, t_ptr.dtype.element_ty, KEY_BITS)
    thr_v = (pick(bound, bins, 0), pick(bound, bins, 1), pick(bound, bins, 2), pick(bound, bins, 3))
    state = (m_z, m_t, s_z, s_t, s_c, a_f, p_s, a_r, q_s, lt_mass, at_least, min_t)
    full = whole_blocks(limit, BLOCK_V * BATCH)
    for start in tl.range(0, full, BLOCK_V * BATCH, num_stages=STAGES, loop_unroll_factor=UNROLL):
        offs = start + tile
        state = _stats_block(tl.reshape(tl.load(z_row + offs), [BLOCK_V, BATCH]),
                             tl.reshape(tl.load(t_row + offs), [BLOCK_V, BATCH]), offs, limit, state, scale2,
                             ce_scale, thr_v, thr_top, False, DIVERGENCE, OWN_CE, CE_SQUARE)
    offs = full + tile
    state = _stats_block(tl.reshape(load_block(z_row, offs, offs < limit), [BLOCK_V, BATCH]),
                         tl.reshape(load_block(t_row, offs, offs < limit), [BLOCK_V, BATCH]),
                         tl.reshape(offs, [BLOCK_V, BATCH]), limit, state, scale2, ce_scale, thr_v, thr_top, True,
                         DIVERGENCE, OWN_CE, CE_SQUARE)
    m_z, m_t, s_z, s_t, s_c, a_f, p_s, a_r, q_s, lt_mass, at_least, min_t = state

    max_z, sum_z = lane_total(m_z, s_z, scale2)
    max_t, sum_t = lane_total(m_t, s_t, scale2)
    log_sz = safe_log(sum_z)
    log_st = safe_log(sum_t)
    tl.store(stats_row + MAX_Z, stored_max(max_z, sum_z))
    tl.store(stats_row + LOGS_Z, log_sz)
    tl.store(stats_row + MAX_T, stored_max(max_t, sum_t))
    tl.store(stats_row + LOGS_T, log_st)
    tl.store(stats_row + FOUND_Z, tl.where(sum_z == 0, 0.0, 1.0))
    tl.store(stats_row + FOUND_T, tl.where(sum_t == 0, 0.0, 1.0))
    div = 0.0
    if NEED_F or NEED_R:
        # each lane's sums moved from its own maxima to the row's
        w_t = tl.exp2((m_t - max_t) * scale2)
        w_z = tl.exp2((m_z - max_z) * scale2)
        lane_shift = ((m_t - max_t) - (m_z - max_z)) * scale2
    if NEED_F:  # a lane whose weight underflows adds 0 (its shift may be +-inf, from a finfo.min maximum)
        raw = tl.sum(w_t * p_s, axis=0)
        a_sum = tl.sum(tl.where(w_t == 0, 0.0, w_t * (a_f + tl.where(p_s == 0, 0.0, p_s * lane_shift))), axis=0)
        mass_p = tl.where(raw == 0, 0.0, raw / sum_t)  # NaN stays NaN
        fkl = tl.where(raw == 0, 0.0, LN2 * a_sum / sum_t - mass_p * (log_st - log_sz))
        tl.store(stats_row + MASS_P, mass_p)
        tl.store(stats_row + FKL_COL, fkl)
        div = fkl
    if NEED_R:
        raw = tl.sum(w_z * q_s, axis=0)
        a_sum = tl.sum(tl.where(w_z == 0, 0.0, w_z * (a_r - tl.where(q_s == 0, 0.0, q_s * lane_shift))), axis=0)
        mass_q = tl.where(raw == 0, 0.0, raw / sum_z)
        rkl = tl.where(raw == 0, 0.0, LN2 * a_sum / sum_z - mass_q * (log_sz - log_st))
        tl.store(stats_row + MASS_Q, mass_q)
        tl.store(stats_row + RKL_COL, rkl)
        div = rkl
    if HAS_CE:
        if CE_SHARES_Z:
            max_c = stored_max(max_z, sum_z)
            log_sc = log_sz
        else:
            sum_c = tl.sum(s_c * tl.exp2((m_z - max_z) * LOG2E), axis=0)
            max_c = stored_max(max_z, sum_c)
            log_sc = safe_log(sum_c)
        label = tl.load(labels_ptr + row)
        valid = (label >= 0) & (label < V)
        z_label = tl.load(z_row + tl.where(valid, label, 0)).to(tl.float32)
        tl.store(stats_row + MAX_CE, max_c)
        tl.store(stats_row + LOGS_CE, log_sc)
        tl.store(stats_row + CE, tl.where(valid, (max_c - z_label) + log_sc, float("nan")))
    if DIVERGENCE == AKL:
        stored_t = stored_max(max_t, sum_t)
        top_scale = tl.exp2((thr_top - stored_t) * scale2) / sum_t  # to probabilities
        below = per_bin(lt_mass, bins)
        hint_bracket(akl_ptr + row * AKL_COLS, below * top_scale, per_bin(at_least, bins), limit, thr_keys,
                     tl.min(min_t, axis=0), stored_t, akl_alpha, t_ptr.dtype.element_ty, KEY_BITS, HINT_BINS)
    if (DIVERGENCE == FKL) or (DIVERGENCE == RKL):
        store_row_loss(loss_ptr, row, keep, div, stats_row, kd_weight, ce_weight, HAS_CE)


@triton.jit
def _finish_block(z_in, t_in, offs, limit, state, max_z, log_sz, max_t, log_st, scale2, todi_beta, w_x, w_y, v_lo,
                  v_hi, listing, cut, akl_row, list_row, PARTIAL: tl.constexpr, DIVERGENCE: tl.constexpr,
                  CAPACITY: tl.constexpr, BLOCK_V: tl.constexpr):
    """``finish_kernel``'s loop body: add one loaded block (indices ``offs``; ``PARTIAL``: it may reach past the
    row's end) to the per-lane sums, returned."""
    s_a, s_b, acc, acc_g, g_tail, g_head, mass_below, f_sum, r_sum, p_sum, q_sum, held_slot = state
    MIXTURE: tl.constexpr = (DIVERGENCE == SFKL) or (DIVERGENCE == SRKL) or (DIVERGENCE == JSD)
    z = z_in.to(tl.float32)
    t = t_in.to(tl.float32)
    lq2 = log2_probs(z, max_z, log_sz, scale2)
    lp2 = log2_probs(t, max_t, log_st, scale2)
    # the log-probabilities the terms take, floored (``common.floored``): the terms are then finite and summed times
    # ``keep``; sfkl's take only p's (q's may stay -inf: its mixture is then p's), srkl's only q's; tvd's neither
    if (DIVERGENCE != TVD) and (DIVERGENCE != SFKL):
        lq2 = floored(lq2)
    if (DIVERGENCE != TVD) and (DIVERGENCE != SRKL):
        lp2 = floored(lp2)
    q = tl.exp2(lq2)
    p = tl.exp2(lp2)
    if DIVERGENCE != TVD:  # 1.0 where neither logit is -inf (SPEC §1's mask), else 0.0: a masked term costs one
        keep = tl.where((z != float("-inf")) & (t != float("-inf")), 1.0, 0.0)  # multiply-add
    if DIVERGENCE == TODI:
        d2 = lq2 - lp2  # d = log q - log p = d2 ln 2; the loss is summed in log2 units, scaled once per row
        w, c = todi_weights(todi_beta * d2)
        wp = w * p
        cq = c * q
        s_a += wp * keep
        s_b += cq * (d2 * LN2 + 1.0) * keep
        acc += (cq - wp) * d2 * keep
    if MIXTURE:  # p_m, q_m: p and q times keep
        if DIVERGENCE == SRKL:
            q_m, p_m, lxm, lym = mixture(lq2, lp2, w_x, w_y, keep)
            acc += q_m * lxm
            acc_g += p_m * tl.exp2(lxm)
        else:
            p_m, q_m, lxm, lym = mixture(lp2, lq2, w_x, w_y, keep)
            acc += p_m * lxm
            if DIVERGENCE == SFKL:
                acc_g += q_m * tl.exp2(lxm)
            else:
                acc_g += q_m * lym
    if DIVERGENCE == TVD:
        live = (z != float("-inf")) & (t != float("-inf"))
        gap = q - p
        acc += only(live, tl.abs(gap))
        acc_g += only(live, tl.where(gap > 0.0, q, tl.where(gap < 0.0, -q, gap)))  # gap: 0, or NaN
    if DIVERGENCE == AKL:
        d2 = lq2 - lp2
        f_sum += p * d2 * keep
        r_sum += q * d2 * keep
        p_sum += p * keep
        q_sum += q * keep
        gap = tl.abs(p - q)  # 0 past V (both -inf)
        # t's order key against the bracket's, as values (``common.key_bound``): no key to compute
        low = t < v_lo
        inside = (t >= v_lo) & (t < v_hi)
        if PARTIAL:
            inside = inside & (offs < limit)
        tail = low | (inside & (offs <= cut))
        listed = inside & listing
        g_tail += only(tail, gap)
        g_head += only(~(tail | listed), gap)
        mass_below += only(low, p)
        # the previous block's listed entries, whose slots have arrived: the atomic is never waited for in its block
        tl.store(list_row + held_slot, offs - BLOCK_V, mask=held_slot.to(tl.uint32) < CAPACITY)  # -1: none
        slot = tl.atomic_add(akl_row + AKL_LISTED + offs * 0, 1.0, mask=listed, sem="relaxed").to(tl.int32)
        held_slot = tl.where(listed, slot, -1)
    return (s_a, s_b, acc, acc_g, g_tail, g_head, mass_below, f_sum, r_sum, p_sum, q_sum, held_slot)


@triton.jit
def finish_kernel(
    z_ptr, t_ptr, labels_ptr, loss_ptr, stats_ptr, akl_ptr, list_ptr,
    V, stride_z, stride_t, inv_t, ignore_index, kd_weight, ce_weight, akl_alpha, todi_beta,
    w_x, w_y,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, KEY_BITS: tl.constexpr,
    CAPACITY: tl.constexpr, BLOCK_V: tl.constexpr, STAGES: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """Last pass over ``z`` and ``t`` of the forward, with the final maxima and log-sums known.

    todi: ``S_a = sum_m w p``, ``S_b = sum_m c q (d + 1)``, the loss ``sum_m (c q - w p) d``, with
    ``w = sigmoid(-b d)``, ``c = sigmoid(b d)`` from one ``u = exp(-|b d|)``: ``1 / (1 + u)`` and ``u / (1 + u)``.
    akl: ``P``, ``Q``, ``F``, ``R`` from the final log-probabilities; entries keyed below ``LO`` are tail, at or
    above ``HI`` head, and the gaps ``|p - q|`` of each side are summed.
    Inside the bracket: with at most ``CAPACITY`` entries, their indices go to ``list`` ((N, CAPACITY) int32,
    in any order: slots from an atomic counter, whose returned slots are used one block later so that the loop
    never waits for the atomic) for ``akl_resolve_kernel``; otherwise the bracket is one key and the entries up to
    ``akl_rank_kernel``'s cut index are tail. ``STAGES``: the loop's pipeline depth (``common.whole_blocks``).

    sfkl, srkl, jsd (SPEC §2b): the mixture ``M = w_x X + w_y Y`` of :func:`mixture`, ``lxm = log2(X / M)``:
    sfkl ``X = p``, ``Y = q``, ``w_x = lambda``; srkl ``X = q``, ``Y = p``, ``w_x = lambda``; jsd ``X = p``,
    ``Y = q``, ``w_x = beta``; ``w_y = 1 - w_x``. Per row, with ``g = dL/dq`` (in nats):

    - sfkl: ``L = ln2 sum_m p lxm``, ``g = -(1 - lambda) p / M``, ``Q_G = -(1 - lambda) sum_m q 2^lxm``;
    - srkl: ``L = ln2 sum_m q lxm``, ``g = ln(q / M) + 1 - lambda q / M``; as ``1 - lambda q / M = (1 - lambda) p / M``,
      ``Q_G = L + (1 - lambda) sum_m p 2^lxm`` (a sum of positive terms, no cancellation);
    - jsd:  ``L = ln2 (beta sum_m p lxm + (1 - beta) sum_m q lym)``, ``lym = log2(q / M)``,
      ``g = (1 - beta) ln2 lym``, ``Q_G = (1 - beta) ln2 sum_m q lym``;
    - tvd:  ``L = 1/2 sum_m |p - q|``, ``g = sign(q - p) / 2``, ``Q_G = 1/2 sum_m q sign(q - p)``.
    """
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    t_row = t_ptr + row * stride_t
    stats_row = stats_ptr + row * NUM_STATS
    keep = row_keep(labels_ptr, row, ignore_index, HAS_LABELS)
    limit = tl.where(keep, V, 0)  # ignored rows read nothing
    scale2 = inv_t * LOG2E
    max_z = tl.load(stats_row + MAX_Z)
    log_sz = tl.load(stats_row + LOGS_Z)
    max_t = tl.load(stats_row + MAX_T)
    log_st = tl.load(stats_row + LOGS_T)
    s_a = tl.zeros([BLOCK_V], tl.float32)
    s_b = tl.zeros([BLOCK_V], tl.float32)
    acc = tl.zeros([BLOCK_V], tl.float32)  # todi and the baselines: the loss
    acc_g = tl.zeros([BLOCK_V], tl.float32)  # the baselines: their Q_G sum (jsd: the q part of the loss)
    g_tail = tl.zeros([BLOCK_V], tl.float32)
    g_head = tl.zeros([BLOCK_V], tl.float32)
    mass_below = tl.zeros([BLOCK_V], tl.float32)
    f_sum = tl.zeros([BLOCK_V], tl.float32)  # AKL: sum_m p d2 and sum_m q d2, d2 = log2 q - log2 p
    r_sum = tl.zeros([BLOCK_V], tl.float32)
    p_sum = tl.zeros([BLOCK_V], tl.float32)
    q_sum = tl.zeros([BLOCK_V], tl.float32)
    akl_row = akl_ptr + row * AKL_COLS
    list_row = list_ptr + row * CAPACITY
    v_lo = 0.0  # AKL: the values of the bracket's keys [LO, HI), whether its entries are listed, and the index of
    v_hi = 0.0  # the last tail entry among them (-1 when they are listed: none by index)
    listing = 0
    cut = 0
    if DIVERGENCE == AKL:
        v_lo = key_bound(load_key(akl_row + AKL_LO), t_ptr.dtype.element_ty, KEY_BITS)
        v_hi = key_bound(load_key(akl_row + AKL_HI), t_ptr.dtype.element_ty, KEY_BITS)
        # vectors: Triton's interpreter rejects `&` between a scalar and a vector mask
        by_rank = tl.full([BLOCK_V], 0.0, tl.float32) + tl.load(akl_row + AKL_COUNT) > CAPACITY
        listing = ~by_rank
        cut = tl.where(by_rank, tl.load(akl_row + AKL_CUT_INDEX).to(tl.int32), -1)
    lanes = tl.arange(0, BLOCK_V)
    # AKL: the list slots of the previous block's listed entries (-1: not listed), stored once they have arrived
    held_slot = tl.full([BLOCK_V], -1, tl.int32)
    state = (s_a, s_b, acc, acc_g, g_tail, g_head, mass_below, f_sum, r_sum, p_sum, q_sum, held_slot)
    full = whole_blocks(limit, BLOCK_V)
    for start in tl.range(0, full, BLOCK_V, num_stages=STAGES, loop_unroll_factor=UNROLL):
        offs = start + lanes
        state = _finish_block(tl.load(z_row + offs), tl.load(t_row + offs), offs, limit, state, max_z, log_sz, max_t,
                              log_st, scale2, todi_beta, w_x, w_y, v_lo, v_hi, listing, cut, akl_row, list_row,
                              False, DIVERGENCE, CAPACITY, BLOCK_V)
    offs = full + lanes
    state = _finish_block(load_block(z_row, offs, offs < limit), load_block(t_row, offs, offs < limit), offs, limit,
                          state, max_z, log_sz, max_t, log_st, scale2, todi_beta, w_x, w_y, v_lo, v_hi, listing, cut,
                          akl_row, list_row, True, DIVERGENCE, CAPACITY, BLOCK_V)
    s_a, s_b, acc, acc_g, g_tail, g_head, mass_below, f_sum, r_sum, p_sum, q_sum, held_slot = state
    if DIVERGENCE == TODI:
        tl.store(stats_row + TODI_S, tl.sum(s_a, axis=0) - tl.sum(s_b, axis=0))
        store_row_loss(loss_ptr, row, keep, LN2 * tl.sum(acc, axis=0), stats_row, kd_weight, ce_weight, HAS_CE)
    elif DIVERGENCE == AKL:
        tl.store(list_row + held_slot, offs, mask=(held_slot >= 0) & (held_slot < CAPACITY))
        tl.store(stats_row + MASS_P, tl.sum(p_sum, axis=0))
        tl.store(stats_row + MASS_Q, tl.sum(q_sum, axis=0))
        f_total = tl.sum(f_sum, axis=0)
        r_total = tl.sum(r_sum, axis=0)
        tl.store(stats_row + FKL_COL, -f_total * LN2)
        tl.store(stats_row + RKL_COL, r_total * LN2)
        tl.store(akl_row + AKL_MASS_BELOW, tl.sum(mass_below, axis=0))
        tl.store(akl_row + AKL_G_TAIL, tl.sum(g_tail, axis=0))
        tl.store(akl_row + AKL_G_HEAD, tl.sum(g_head, axis=0))
    else:
        loss_sum = tl.sum(acc, axis=0)
        g_sum = tl.sum(acc_g, axis=0)
        if DIVERGENCE == SFKL:
            div = LN2 * loss_sum
            q_g = -w_y * g_sum
        elif DIVERGENCE == SRKL:
            div = LN2 * loss_sum
            q_g = div + w_y * g_sum
        elif DIVERGENCE == JSD:
            div = LN2 * (w_x * loss_sum + w_y * g_sum)
            q_g = LN2 * w_y * g_sum
        else:
            div = 0.5 * loss_sum
            q_g = 0.5 * g_sum
        tl.store(stats_row + Q_G, q_g)
        store_row_loss(loss_ptr, row, keep, div, stats_row, kd_weight, ce_weight, HAS_CE)
