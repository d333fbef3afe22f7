"""Forward kernels: one program per row, streaming the vocabulary in blocks.

Passes over the logits in the forward (the backward adds one, see ``backward.py``):

- fkl, rkl: 1 pass (``stats_kernel``): online log-sum-exps of ``z/T`` and ``t/T`` and online sums
  that give ``P``, ``Q``, ``F`` and ``R`` at the end of the row, so the loss needs no second pass.
- todi: 2 passes: ``stats_kernel`` (log-sum-exps), then ``finish_kernel`` (``S_a``, ``S_b``, loss).
- akl: ``stats_kernel`` (log-sum-exps, ``F``, ``R`` and the first 8-bit level of a radix select of the
  teacher's keys, weighted by probability mass), one ``akl_level_kernel`` per further 8 bits of key
  (1 for bfloat16/float16 teachers, 3 for float32), then ``finish_kernel`` (head/tail gaps, weights,
  loss): 3 passes for 16-bit teacher logits, 5 for float32. Only ``t`` is read by the level passes.

Online sums use running maxes ``m`` rescaled by ``exp(m_old - m_new)`` when a block raises them. The
sums for ``F`` keep each term centred on the running maxes so that the final subtraction
``F = A / s_t - P (log s_t - log s_z)`` stays small and exact in float32.
"""

import triton
import triton.language as tl

from kdkernels.kernels.common import (
    AKL,
    AKL_BELOW,
    CE,
    FKL,
    FKL_COL,
    LSE_CE,
    LSE_T,
    LSE_Z,
    MASS_P,
    MASS_Q,
    NEG_BIG,
    NUM_STATS,
    R_HEAD,
    R_TAIL,
    RADIX,
    RKL,
    RKL_COL,
    TODI,
    TODI_S,
    load_block,
    mass_histogram,
    order_key,
    probs,
    row_keep,
    select_bucket,
)


@triton.jit
def _finish_row(loss_ptr, row, keep, div, stats_row, kd_weight, ce_weight, HAS_CE: tl.constexpr):
    """Row loss ``kd_weight * div + ce_weight * CE``, 0 for ignored rows."""
    value = kd_weight * div
    if HAS_CE:
        value += ce_weight * tl.load(stats_row + CE)
    tl.store(loss_ptr + row, tl.where(keep, value, 0.0))


@triton.jit
def stats_kernel(
    z_ptr, t_ptr, labels_ptr, loss_ptr, stats_ptr, key_ptr,
    V, stride_z, stride_t, inv_t, ignore_index, kd_weight, ce_weight, akl_alpha,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr,
    KEY_BITS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """First pass: log-sum-exps, ``P``, ``Q``, ``F``, ``R``, CE and AKL's first radix level.

    z, t: (N, V) rows at ``stride_z``/``stride_t``; labels: (N,) int64 if HAS_LABELS;
    loss: (N,) float32 (written for fkl/rkl); stats: (N, NUM_STATS) float32; key: (N,) int64 (AKL).
    """
    NEED_F: tl.constexpr = (DIVERGENCE == FKL) or (DIVERGENCE == AKL)
    NEED_R: tl.constexpr = (DIVERGENCE == RKL) or (DIVERGENCE == AKL)
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    t_row = t_ptr + row * stride_t
    stats_row = stats_ptr + row * NUM_STATS
    keep = row_keep(labels_ptr, row, ignore_index, HAS_LABELS)
    limit = tl.where(keep, V, 0)  # ignored rows read nothing

    m_z = NEG_BIG
    m_t = NEG_BIG
    m_c = NEG_BIG
    s_z = 0.0
    s_t = 0.0
    s_c = 0.0
    a_f = 0.0  # sum_m e^{t'-m_t} ((t'-m_t) - (z'-m_z))
    p_s = 0.0  # sum_m e^{t'-m_t}
    a_r = 0.0  # sum_m e^{z'-m_z} ((z'-m_z) - (t'-m_t))
    q_s = 0.0  # sum_m e^{z'-m_z}
    hist = tl.zeros([RADIX], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        inb = offs < limit
        z_raw = load_block(z_row, offs, inb).to(tl.float32)
        t_in = load_block(t_row, offs, inb)
        z = z_raw * inv_t
        t = t_in.to(tl.float32) * inv_t
        live = (z != float("-inf")) & (t != float("-inf"))
        mz_new = tl.maximum(m_z, tl.max(z, axis=0))
        mt_new = tl.maximum(m_t, tl.max(t, axis=0))
        scale_z = tl.exp(m_z - mz_new)
        scale_t = tl.exp(m_t - mt_new)
        e_z = tl.exp(z - mz_new)
        e_t = tl.exp(t - mt_new)
        centred = (t - mt_new) - (z - mz_new)
        shift = (m_t - mt_new) - (m_z - mz_new)
        if NEED_F:
            a_f = scale_t * (a_f + tl.where(p_s > 0, p_s * shift, 0.0))
            a_f += tl.sum(tl.where(live, e_t * centred, 0.0), axis=0)
            p_s = scale_t * p_s + tl.sum(tl.where(live, e_t, 0.0), axis=0)
        if NEED_R:
            a_r = scale_z * (a_r - tl.where(q_s > 0, q_s * shift, 0.0))
            a_r -= tl.sum(tl.where(live, e_z * centred, 0.0), axis=0)
            q_s = scale_z * q_s + tl.sum(tl.where(live, e_z, 0.0), axis=0)
        if DIVERGENCE == AKL:
            digit = order_key(t_in, KEY_BITS) >> (KEY_BITS - 8)
            hist = hist * scale_t + mass_histogram(digit, tl.where(inb, e_t, 0.0))
        if HAS_CE:
            mc_new = tl.maximum(m_c, tl.max(z_raw, axis=0))
            s_c = s_c * tl.exp(m_c - mc_new) + tl.sum(tl.exp(z_raw - mc_new), axis=0)
            m_c = mc_new
        s_z = s_z * scale_z + tl.sum(e_z, axis=0)
        s_t = s_t * scale_t + tl.sum(e_t, axis=0)
        m_z = mz_new
        m_t = mt_new

    log_sz = tl.log(s_z)
    log_st = tl.log(s_t)
    tl.store(stats_row + LSE_Z, m_z + log_sz)
    tl.store(stats_row + LSE_T, m_t + log_st)
    div = 0.0
    if NEED_F:
        mass_p = tl.where(p_s == 0, 0.0, p_s / s_t)  # NaN stays NaN
        fkl = tl.where(p_s == 0, 0.0, a_f / s_t - mass_p * (log_st - log_sz))
        tl.store(stats_row + MASS_P, mass_p)
        tl.store(stats_row + FKL_COL, fkl)
        div = fkl
    if NEED_R:
        mass_q = tl.where(q_s == 0, 0.0, q_s / s_z)
        rkl = tl.where(q_s == 0, 0.0, a_r / s_z - mass_q * (log_sz - log_st))
        tl.store(stats_row + MASS_Q, mass_q)
        tl.store(stats_row + RKL_COL, rkl)
        div = rkl
    if HAS_CE:
        label = tl.load(labels_ptr + row)
        valid = (label >= 0) & (label < V)
        z_label = tl.load(z_row + tl.where(valid, label, 0)).to(tl.float32)
        lse_c = m_c + tl.log(s_c)
        tl.store(stats_row + LSE_CE, lse_c)
        tl.store(stats_row + CE, tl.where(valid, lse_c - z_label, float("nan")))
    if DIVERGENCE == AKL:
        bucket, below = select_bucket(hist / s_t, 0.0, akl_alpha)
        tl.store(key_ptr + row, bucket.to(tl.int64))
        tl.store(stats_row + AKL_BELOW, below)
    if (DIVERGENCE == FKL) or (DIVERGENCE == RKL):
        _finish_row(loss_ptr, row, keep, div, stats_row, kd_weight, ce_weight, HAS_CE)


@triton.jit
def akl_level_kernel(
    t_ptr, labels_ptr, stats_ptr, key_ptr,
    V, stride_t, inv_t, ignore_index, akl_alpha,
    HAS_LABELS: tl.constexpr, KEY_BITS: tl.constexpr, SHIFT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One more radix level of AKL's cut: the 8 key bits at ``SHIFT`` among keys matching the prefix.

    Reads the prefix (key bits above ``SHIFT + 8``) and the mass below it, histograms the teacher mass
    of the matching entries by their next 8 bits, and writes back the longer prefix and its mass below.
    Blocks with no matching entry skip the histogram.
    """
    row = tl.program_id(0).to(tl.int64)
    t_row = t_ptr + row * stride_t
    stats_row = stats_ptr + row * NUM_STATS
    keep = row_keep(labels_ptr, row, ignore_index, HAS_LABELS)
    limit = tl.where(keep, V, 0)  # ignored rows read nothing
    prefix = tl.load(key_ptr + row).to(tl.uint32)
    below = tl.load(stats_row + AKL_BELOW)
    lse_t = tl.load(stats_row + LSE_T)
    hist = tl.zeros([RADIX], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        inb = offs < limit
        t_in = load_block(t_row, offs, inb)
        key = order_key(t_in, KEY_BITS)
        match = inb & ((key >> (SHIFT + 8)) == prefix)
        if tl.sum(match.to(tl.int32), axis=0) > 0:
            p = probs(t_in.to(tl.float32) * inv_t, lse_t)
            hist += mass_histogram((key >> SHIFT) & 0xFF, tl.where(match, p, 0.0))
    bucket, below = select_bucket(hist, below, akl_alpha)
    tl.store(key_ptr + row, (prefix.to(tl.int64) << 8) | bucket.to(tl.int64))
    tl.store(stats_row + AKL_BELOW, below)


@triton.jit
def finish_kernel(
    z_ptr, t_ptr, labels_ptr, loss_ptr, stats_ptr, key_ptr,
    V, stride_z, stride_t, inv_t, ignore_index, kd_weight, ce_weight, akl_alpha, todi_beta,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr,
    KEY_BITS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Last forward pass, with the final log-sum-exps known.

    todi: ``S_a = sum_m w p``, ``S_b = sum_m c q (d + 1)`` and the loss ``sum_m (c q - w p) d``.
    akl: an entry is tail if its key is below the cut's key ``k``, or equals it and
    ``below + (rank + 1) p <= alpha`` where ``rank`` counts the earlier entries (by index) keyed ``k``;
    then ``g_head``/``g_tail`` (sums of ``|p - q|`` over all entries), ``r_h``, ``r_t`` and the loss.
    """
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    t_row = t_ptr + row * stride_t
    stats_row = stats_ptr + row * NUM_STATS
    keep = row_keep(labels_ptr, row, ignore_index, HAS_LABELS)
    limit = tl.where(keep, V, 0)  # ignored rows read nothing
    lse_z = tl.load(stats_row + LSE_Z)
    lse_t = tl.load(stats_row + LSE_T)
    s_a = 0.0
    s_b = 0.0
    acc = 0.0
    g_head = 0.0
    g_tail = 0.0
    if DIVERGENCE == AKL:
        cut = tl.load(key_ptr + row).to(tl.uint32)
        below = tl.load(stats_row + AKL_BELOW)
        seen = tl.zeros([1], dtype=tl.int32)  # entries keyed `cut` in earlier blocks
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        inb = offs < limit
        z = load_block(z_row, offs, inb).to(tl.float32) * inv_t
        t_in = load_block(t_row, offs, inb)
        t = t_in.to(tl.float32) * inv_t
        live = (z != float("-inf")) & (t != float("-inf"))
        q = probs(z, lse_z)
        p = probs(t, lse_t)
        d = tl.where(live, (z - lse_z) - (t - lse_t), 0.0)
        if DIVERGENCE == TODI:
            w = tl.sigmoid(-todi_beta * d)
            c = tl.sigmoid(todi_beta * d)
            s_a += tl.sum(tl.where(live, w * p, 0.0), axis=0)
            s_b += tl.sum(tl.where(live, c * q * (d + 1.0), 0.0), axis=0)
            acc += tl.sum(tl.where(live, (c * q - w * p) * d, 0.0), axis=0)
        if DIVERGENCE == AKL:
            key = order_key(t_in, KEY_BITS)
            at_cut = inb & (key == cut)
            rank = seen + tl.cumsum(at_cut.to(tl.int32), axis=0)  # inclusive count in index order
            tail = inb & ((key < cut) | (at_cut & (below + rank.to(tl.float32) * p <= akl_alpha)))
            gap = tl.where(inb, tl.abs(p - q), 0.0)
            g_tail += tl.sum(tl.where(tail, gap, 0.0), axis=0)
            g_head += tl.sum(tl.where(tail, 0.0, gap), axis=0)
            seen += tl.sum(at_cut.to(tl.int32), axis=0)
    if DIVERGENCE == TODI:
        tl.store(stats_row + TODI_S, s_a - s_b)
        div = acc
    else:
        total = g_head + g_tail
        r_h = tl.where(total > 0, g_head / total, 0.5)
        r_t = tl.where(total > 0, g_tail / total, 0.5)
        tl.store(stats_row + R_HEAD, r_h)
        tl.store(stats_row + R_TAIL, r_t)
        div = r_h * tl.load(stats_row + FKL_COL) + r_t * tl.load(stats_row + RKL_COL)
    _finish_row(loss_ptr, row, keep, div, stats_row, kd_weight, ce_weight, HAS_CE)
