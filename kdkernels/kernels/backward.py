"""Backward kernel: one pass over ``z`` and ``t`` per row that writes the gradient w.r.t. ``z``.

With ``g`` the gradient of the row's loss, ``m`` the inf mask and ``d = lq - lp`` (SPEC §2):

- fkl:  ``q_j P - m_j p_j``
- rkl:  ``m_j q_j (d_j + 1) - q_j (R + Q)``
- akl:  ``r_h fkl_j + r_t rkl_j``
- todi: ``m_j (c_j q_j (d_j + 1) - w_j p_j) + q_j (S_a - S_b)``, both sigmoids from one ``exp`` (as ``forward.py``)
- sfkl, srkl, jsd, tvd (SPEC §2b): ``m_j q_j g_j - q_j Q_G``, ``g = dL/dq``, ``Q_G = sum_m q g`` from ``finish_kernel``;
  with its mixture terms (``lxm = log2(X / M)``, ``lym = log2(Y / M)``): sfkl ``q g = -(1 - lambda) q 2^lxm``, srkl
  ``q g = q ln2 lxm + (1 - lambda) p 2^lxm``, jsd ``q g = (1 - beta) q ln2 lym``, tvd ``q g = q sign(q - p) / 2``.

``dz_j = g (kd_weight / T * div_j + ce_weight (softmax(z)_j - [j == label]))``; ignored rows get 0. A kept row
whose label is outside ``[0, V)`` while ``ce_weight != 0`` has a NaN loss and gets a NaN gradient.
"""

import triton
import triton.language as tl

from kdkernels.kernels.common import (
    AKL,
    FKL,
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
    R_HEAD,
    R_TAIL,
    RKL,
    RKL_COL,
    SFKL,
    SRKL,
    TODI,
    TODI_S,
    TVD,
    floored,
    load_block,
    log2_probs,
    mixture,
    row_keep,
    todi_weights,
    whole_blocks,
)


@triton.jit
def _grad_block(z_in, t_in, offs, V, dz_row, scale2, max_z, log_sz, max_t, log_st, mass_p, r_plus_q, r_h, r_t, s_ab,
                q_g, scale_kd, scale_ce, target, max_c, log_sc, ce_ratio, todi_beta, w_x, w_y, LABEL: tl.constexpr,
                DIVERGENCE: tl.constexpr, HAS_CE: tl.constexpr, CE_SHARES_Z: tl.constexpr, CE_SQUARE: tl.constexpr):
    """Write the gradient of one block of a row (``grad_kernel``'s loop body): ``z_in``, ``t_in`` the loaded block,
    ``offs`` its indices; the scalars are the row's statistics and scales (unused ones are ignored)."""
    MIXTURE: tl.constexpr = (DIVERGENCE == SFKL) or (DIVERGENCE == SRKL) or (DIVERGENCE == JSD)
    NEED_F: tl.constexpr = (DIVERGENCE == FKL) or (DIVERGENCE == AKL)
    NEED_R: tl.constexpr = (DIVERGENCE == RKL) or (DIVERGENCE == AKL)
    inb = offs < V
    z = z_in.to(tl.float32)
    t = t_in.to(tl.float32)
    lq2 = log2_probs(z, max_z, log_sz, scale2)
    lp2 = log2_probs(t, max_t, log_st, scale2)
    # the log-probabilities the terms take, floored (``common.floored``); the baselines' gradients take only q's
    # (their mixture is q's where p's is -inf)
    if NEED_R or (DIVERGENCE == TODI) or MIXTURE:
        lq2 = floored(lq2)
    if NEED_R or (DIVERGENCE == TODI):
        lp2 = floored(lp2)
    if DIVERGENCE == SRKL:
        q, p, lxm, lym = mixture(lq2, lp2, w_x, w_y, 1.0)
    elif MIXTURE:
        p, q, lxm, lym = mixture(lp2, lq2, w_x, w_y, 1.0)
    else:
        q = tl.exp2(lq2)
        p = tl.exp2(lp2)
    live = (z != float("-inf")) & (t != float("-inf"))
    if NEED_R or (DIVERGENCE == TODI):
        d2 = lq2 - lp2
        d_plus_1 = d2 * LN2 + 1.0  # d + 1, d = log q - log p in nats
    if NEED_F:
        g_f = q * mass_p - tl.where(live, p, 0.0)
    if NEED_R:
        g_r = tl.where(live, q * d_plus_1, 0.0) - q * r_plus_q
    if DIVERGENCE == FKL:
        g_div = g_f
    elif DIVERGENCE == RKL:
        g_div = g_r
    elif DIVERGENCE == AKL:
        g_div = r_h * g_f + r_t * g_r
    elif DIVERGENCE == TODI:
        w, c = todi_weights(todi_beta * d2)
        g_div = tl.where(live, c * q * d_plus_1 - w * p, 0.0) + q * s_ab
    else:
        if DIVERGENCE == SFKL:
            qg = -w_y * (q * tl.exp2(lxm))
        elif DIVERGENCE == SRKL:
            qg = LN2 * (q * lxm) + w_y * (p * tl.exp2(lxm))
        elif DIVERGENCE == JSD:
            qg = LN2 * w_y * (q * lym)
        else:
            gap = q - p
            qg = 0.5 * tl.where(gap > 0.0, q, tl.where(gap < 0.0, -q, gap))  # gap: 0, or NaN
        g_div = tl.where(live, qg, 0.0) - q * q_g
    grad = scale_kd * g_div
    if CE_SQUARE:  # T = 2: scale_ce softmax(z) is q^2 times a row constant
        grad += q * (q * ce_ratio)
    elif HAS_CE:
        if CE_SHARES_Z:
            soft = q
        else:
            soft = tl.exp2(log2_probs(z, max_c, log_sc, LOG2E))
        grad += scale_ce * soft
    if LABEL:  # only the label's entry, with its one-hot term
        grad -= scale_ce
        inb = inb & (offs == target)
    tl.store(dz_row + offs, grad.to(dz_row.dtype.element_ty), mask=inb)


@triton.jit
def grad_kernel(
    z_ptr, t_ptr, labels_ptr, grad_rows_ptr, stats_ptr, dz_ptr,
    V, stride_z, stride_t, stride_dz, inv_t, ignore_index, kd_weight, ce_weight, todi_beta,
    w_x, w_y,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, CE_SHARES_Z: tl.constexpr,
    CE_SQUARE: tl.constexpr, BLOCK_V: tl.constexpr, STAGES: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """dz: (N, V) in the student's dtype at ``stride_dz``; grad_rows: (N,) float32.

    ``CE_SHARES_Z``: T == 1, so ``softmax(z)`` is ``q``; ``CE_SQUARE``: T == 2 with the CE term, so ``softmax(z)``
    is ``q^2 exp(MAX_Z - MAX_CE + 2 LOGS_Z - LOGS_CE)``, no ``exp2`` an entry. ``w_x, w_y``: the mixture weights of
    ``forward.finish_kernel`` (sfkl, srkl, jsd). ``STAGES``: the loop's pipeline depth
    (``common.whole_blocks``).
    """
    MIXTURE: tl.constexpr = (DIVERGENCE == SFKL) or (DIVERGENCE == SRKL) or (DIVERGENCE == JSD)
    NEED_F: tl.constexpr = (DIVERGENCE == FKL) or (DIVERGENCE == AKL)
    NEED_R: tl.constexpr = (DIVERGENCE == RKL) or (DIVERGENCE == AKL)
    mass_p = 0.0  # the row's statistics, loaded below where the divergence uses them
    r_plus_q = 0.0
    r_h = 0.0
    r_t = 0.0
    s_ab = 0.0
    q_g = 0.0
    target = 0
    scale_ce = 0.0
    max_c = 0.0
    log_sc = 0.0
    ce_ratio = 0.0
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    t_row = t_ptr + row * stride_t
    dz_row = dz_ptr + row * stride_dz
    stats_row = stats_ptr + row * NUM_STATS
    keep = row_keep(labels_ptr, row, ignore_index, HAS_LABELS)
    limit = tl.where(keep, V, 0)  # ignored rows read nothing and write zeros
    g = tl.load(grad_rows_ptr + row)
    scale_kd = tl.where(keep, g * kd_weight * inv_t, 0.0)
    scale2 = inv_t * LOG2E
    max_z = tl.load(stats_row + MAX_Z)
    log_sz = tl.load(stats_row + LOGS_Z)
    max_t = tl.load(stats_row + MAX_T)
    log_st = tl.load(stats_row + LOGS_T)
    if NEED_F:
        mass_p = tl.load(stats_row + MASS_P)
    if NEED_R:
        r_plus_q = tl.load(stats_row + RKL_COL) + tl.load(stats_row + MASS_Q)
    if DIVERGENCE == AKL:
        r_h = tl.load(stats_row + R_HEAD)
        r_t = tl.load(stats_row + R_TAIL)
    if DIVERGENCE == TODI:
        s_ab = tl.load(stats_row + TODI_S)
    if MIXTURE or (DIVERGENCE == TVD):
        q_g = tl.load(stats_row + Q_G)
    if HAS_CE:
        label = tl.load(labels_ptr + row)
        valid = (label >= 0) & (label < V)
        target = tl.where(valid, label, -1).to(tl.int32)
        scale_ce = tl.where(keep, tl.where(valid, g * ce_weight, float("nan")), 0.0)
        max_c = tl.load(stats_row + MAX_CE)
        log_sc = tl.load(stats_row + LOGS_CE)
        ce_ratio = scale_ce * tl.exp((max_z - max_c) + (2.0 * log_sz - log_sc))
    lanes = tl.arange(0, BLOCK_V)
    full = whole_blocks(limit, BLOCK_V)
    for start in tl.range(0, full, BLOCK_V, num_stages=STAGES, loop_unroll_factor=UNROLL):
        offs = start + lanes
        _grad_block(tl.load(z_row + offs), tl.load(t_row + offs), offs, V, dz_row, scale2, max_z, log_sz, max_t,
                    log_st, mass_p, r_plus_q, r_h, r_t, s_ab, q_g, scale_kd, scale_ce, target, max_c, log_sc, ce_ratio,
                    todi_beta, w_x, w_y, False, DIVERGENCE, HAS_CE, CE_SHARES_Z, CE_SQUARE)
    offs = full + lanes  # the partial block (ignored rows: the first block, zeros)
    _grad_block(load_block(z_row, offs, offs < limit), load_block(t_row, offs, offs < limit), offs, V, dz_row, scale2,
                max_z, log_sz, max_t, log_st, mass_p, r_plus_q, r_h, r_t, s_ab, q_g, scale_kd, scale_ce, target, max_c,
                log_sc, ce_ratio, todi_beta, w_x, w_y, False, DIVERGENCE, HAS_CE, CE_SHARES_Z, CE_SQUARE)
    if HAS_CE:  # the label's entry again, with the CE term's one-hot part (no compare an entry in the loops)
        tl.debug_barrier()  # after every thread's first store of it
        offs = tl.maximum(target, 0) // BLOCK_V * BLOCK_V + lanes
        _grad_block(load_block(z_row, offs, offs < limit), load_block(t_row, offs, offs < limit), offs, V, dz_row,
                    scale2, max_z, log_sz, max_t, log_st, mass_p, r_plus_q, r_h, r_t, s_ab, q_g, scale_kd, scale_ce,
                    target, max_c, log_sc, ce_ratio, todi_beta, w_x, w_y, True, DIVERGENCE, HAS_CE, CE_SHARES_Z,
                    CE_SQUARE)
    for start in range(BLOCK_V, tl.where(keep, 0, V), BLOCK_V):  # ignored rows: zeros past the first block
        tl.store(dz_row + start + lanes, tl.zeros([BLOCK_V], dz_row.dtype.element_ty), mask=start + lanes < V)
