"""Backward kernel: one pass over ``z`` and ``t`` per row that writes the gradient w.r.t. ``z``.

With ``g`` the gradient of the row's loss, ``m`` the inf mask and ``d = lq - lp`` (SPEC §2):

- fkl:  ``q_j P - m_j p_j``
- rkl:  ``m_j q_j (d_j + 1) - q_j (R + Q)``
- akl:  ``r_h fkl_j + r_t rkl_j``
- todi: ``m_j (c_j q_j (d_j + 1) - w_j p_j) + q_j (S_a - S_b)``

``dz_j = g (kd_weight / T * div_j + ce_weight (softmax(z)_j - [j == label]))``; ignored rows get 0.
"""

import triton
import triton.language as tl

from kdkernels.kernels.common import (
    AKL,
    FKL,
    LSE_CE,
    LSE_T,
    LSE_Z,
    MASS_P,
    MASS_Q,
    NUM_STATS,
    R_HEAD,
    R_TAIL,
    RKL,
    RKL_COL,
    TODI,
    TODI_S,
    load_block,
    probs,
    row_keep,
)


@triton.jit
def grad_kernel(
    z_ptr, t_ptr, labels_ptr, grad_rows_ptr, stats_ptr, dz_ptr,
    V, stride_z, stride_t, stride_dz, inv_t, ignore_index, kd_weight, ce_weight, todi_beta,
    DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """dz: (N, V) in the student's dtype at ``stride_dz``; grad_rows: (N,) float32."""
    NEED_F: tl.constexpr = (DIVERGENCE == FKL) or (DIVERGENCE == AKL)
    NEED_R: tl.constexpr = (DIVERGENCE == RKL) or (DIVERGENCE == AKL)
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    t_row = t_ptr + row * stride_t
    dz_row = dz_ptr + row * stride_dz
    stats_row = stats_ptr + row * NUM_STATS
    keep = row_keep(labels_ptr, row, ignore_index, HAS_LABELS)
    limit = tl.where(keep, V, 0)  # ignored rows read nothing and write zeros
    g = tl.load(grad_rows_ptr + row)
    scale_kd = g * kd_weight * inv_t
    lse_z = tl.load(stats_row + LSE_Z)
    lse_t = tl.load(stats_row + LSE_T)
    if NEED_F:
        mass_p = tl.load(stats_row + MASS_P)
    if NEED_R:
        r_plus_q = tl.load(stats_row + RKL_COL) + tl.load(stats_row + MASS_Q)
    if DIVERGENCE == AKL:
        r_h = tl.load(stats_row + R_HEAD)
        r_t = tl.load(stats_row + R_TAIL)
    if DIVERGENCE == TODI:
        s_ab = tl.load(stats_row + TODI_S)
    if HAS_CE:
        label = tl.load(labels_ptr + row)
        lse_c = tl.load(stats_row + LSE_CE)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        inb = offs < V
        read = offs < limit
        z_raw = load_block(z_row, offs, read).to(tl.float32)
        z = z_raw * inv_t
        t = load_block(t_row, offs, read).to(tl.float32) * inv_t
        live = (z != float("-inf")) & (t != float("-inf"))
        q = probs(z, lse_z)
        p = probs(t, lse_t)
        d = tl.where(live, (z - lse_z) - (t - lse_t), 0.0)
        if NEED_F:
            g_f = q * mass_p - tl.where(live, p, 0.0)
        if NEED_R:
            g_r = tl.where(live, q * (d + 1.0), 0.0) - q * r_plus_q
        if DIVERGENCE == FKL:
            g_div = g_f
        elif DIVERGENCE == RKL:
            g_div = g_r
        elif DIVERGENCE == AKL:
            g_div = r_h * g_f + r_t * g_r
        else:
            w = tl.sigmoid(-todi_beta * d)
            c = tl.sigmoid(todi_beta * d)
            g_div = tl.where(live, c * q * (d + 1.0) - w * p, 0.0) + q * s_ab
        grad = scale_kd * g_div
        if HAS_CE:
            onehot = tl.where(offs == label, 1.0, 0.0)
            grad += (g * ce_weight) * (probs(z_raw, lse_c) - onehot)
        grad = tl.where(keep, grad, 0.0)
        tl.store(dz_row + offs, grad.to(dz_ptr.dtype.element_ty), mask=inb)
