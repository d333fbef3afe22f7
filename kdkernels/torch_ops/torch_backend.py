"""The torch backend: the production path for CPU tensors.

It computes the same per-row statistics as the Triton kernels (``layout.py``) and the analytic gradient of
SPEC §2, a chunk of rows at a time, so its extra memory is a few ``(chunk, V)`` temporaries whatever ``N``.
It works in float32, or in float64 when an input is float64 (for ``gradcheck``).
"""

from __future__ import annotations

import torch

from kdkernels.torch_ops import layout
from kdkernels.torch_ops.reference import akl_weights, compute_dtype

CHUNK_ELEMENTS = 1 << 21  # entries of one (chunk, V) temporary


def chunk_rows(vocab: int) -> int:
    """Rows per chunk: about ``CHUNK_ELEMENTS`` entries, at least one row."""
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


class _Rows:
    """Probabilities and centred log-ratios of one chunk of rows, all ``(rows, V)`` in ``dtype``."""

    def __init__(self, z: torch.Tensor, t: torch.Tensor, temperature: float, dtype: torch.dtype):
        zs = z.to(dtype) / temperature
        ts = t.to(dtype) / temperature
        self.lse_z = torch.logsumexp(zs, dim=-1)
        self.lse_t = torch.logsumexp(ts, dim=-1)
        self.live = (zs != float("-inf")) & (ts != float("-inf"))
        lq = zs - self.lse_z[:, None]
        lp = ts - self.lse_t[:, None]
        # exp(-inf - lse) is 0, and rows of all -inf give probabilities 0, not NaN.
        self.q = torch.where(zs == float("-inf"), 0.0, lq.exp())
        self.p = torch.where(ts == float("-inf"), 0.0, lp.exp())
        self.d = torch.where(self.live, lq - lp, 0.0)  # lq - lp

    def mass(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.live, x, 0.0).sum(-1)

    def todi_weights(self, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``w = sigmoid(b (lp - lq))`` and ``c = sigmoid(b (lq - lp))``, each its own sigmoid."""
        return torch.sigmoid(-beta * self.d), torch.sigmoid(beta * self.d)


def _cross_entropy(z: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse, ce)`` of raw logits ``z`` (temperature 1); NaN CE for labels outside [0, V)."""
    zf = z.to(dtype)
    lse = torch.logsumexp(zf, dim=-1)
    valid = (labels >= 0) & (labels < z.shape[-1])
    picked = zf.gather(-1, torch.where(valid, labels, 0)[:, None])[:, 0]
    return lse, torch.where(valid, lse - picked, float("nan"))


def kd_forward(
    z: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    divergence: str,
    ignore_index: int,
    temperature: float,
    akl_alpha: float,
    todi_beta: float,
    kd_weight: float,
    ce_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row losses ``(N,)`` and statistics ``(N, NUM_STATS)`` of ``z``, ``t`` ``(N, V)``; see ``layout.py``."""
    n_rows, vocab = z.shape
    dtype = compute_dtype(z, t)
    loss = torch.empty(n_rows, dtype=dtype, device=z.device)
    stats = torch.full((n_rows, layout.NUM_STATS), float("nan"), dtype=dtype, device=z.device)
    step = chunk_rows(vocab)
    for lo in range(0, n_rows, step):
        hi = min(lo + step, n_rows)
        rows = _Rows(z[lo:hi], t[lo:hi], temperature, dtype)
        st = stats[lo:hi]
        st[:, layout.LSE_Z] = rows.lse_z
        st[:, layout.LSE_T] = rows.lse_t
        st[:, layout.MASS_P] = rows.mass(rows.p)
        st[:, layout.MASS_Q] = rows.mass(rows.q)
        st[:, layout.FKL] = fkl = -(rows.p * rows.d).sum(-1)
        st[:, layout.RKL] = rkl = (rows.q * rows.d).sum(-1)
        if divergence == "fkl":
            div = fkl
        elif divergence == "rkl":
            div = rkl
        elif divergence == "akl":
            r_h, r_t = akl_weights(rows.p, rows.q, akl_alpha)
            st[:, layout.R_HEAD] = r_h
            st[:, layout.R_TAIL] = r_t
            div = r_h * fkl + r_t * rkl
        else:
            w, c = rows.todi_weights(todi_beta)
            s_a = rows.mass(w * rows.p)
            s_b = rows.mass(c * rows.q * (rows.d + 1.0))
            st[:, layout.TODI_S] = s_a - s_b
            div = ((c * rows.q - w * rows.p) * rows.d).sum(-1)
        row_loss = kd_weight * div
        if labels is not None:
            lab = labels[lo:hi]
            if ce_weight != 0.0:
                st[:, layout.LSE_CE], st[:, layout.CE] = _cross_entropy(z[lo:hi], lab, dtype)
                row_loss = row_loss + ce_weight * st[:, layout.CE]
            row_loss = torch.where(lab != ignore_index, row_loss, 0.0)
        loss[lo:hi] = row_loss
    return loss, stats


def kd_backward(
    grad_rows: torch.Tensor,
    z: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    stats: torch.Tensor,
    divergence: str,
    ignore_index: int,
    temperature: float,
    todi_beta: float,
    kd_weight: float,
    ce_weight: float,
) -> torch.Tensor:
    """Gradient ``(N, V)`` w.r.t. ``z`` in ``z``'s dtype, from the row-loss gradient ``grad_rows`` ``(N,)``."""
    n_rows, vocab = z.shape
    dtype = compute_dtype(z, t)
    dz = torch.empty((n_rows, vocab), dtype=z.dtype, device=z.device)
    step = chunk_rows(vocab)
    for lo in range(0, n_rows, step):
        hi = min(lo + step, n_rows)
        rows = _Rows(z[lo:hi], t[lo:hi], temperature, dtype)
        st = stats[lo:hi].to(dtype)
        q, p, d, live = rows.q, rows.p, rows.d, rows.live
        if divergence in ("fkl", "akl"):
            g_f = q * st[:, layout.MASS_P, None] - torch.where(live, p, 0.0)
        if divergence in ("rkl", "akl"):
            r_plus_q = st[:, layout.RKL] + st[:, layout.MASS_Q]
            g_r = torch.where(live, q * (d + 1.0), 0.0) - q * r_plus_q[:, None]
        if divergence == "fkl":
            g_div = g_f
        elif divergence == "rkl":
            g_div = g_r
        elif divergence == "akl":
            g_div = st[:, layout.R_HEAD, None] * g_f + st[:, layout.R_TAIL, None] * g_r
        else:
            w, c = rows.todi_weights(todi_beta)
            g_div = torch.where(live, c * q * (d + 1.0) - w * p, 0.0) + q * st[:, layout.TODI_S, None]
        g = grad_rows[lo:hi].to(dtype)[:, None]
        grad = (g * (kd_weight / temperature)) * g_div
        if labels is not None:
            lab = labels[lo:hi]
            if ce_weight != 0.0:
                zf = z[lo:hi].to(dtype)
                soft = torch.where(zf == float("-inf"), 0.0, (zf - st[:, layout.LSE_CE, None]).exp())
                onehot = torch.arange(vocab, device=z.device)[None, :] == lab[:, None]
                grad = grad + (g * ce_weight) * (soft - onehot.to(dtype))
            grad = torch.where((lab != ignore_index)[:, None], grad, 0.0)
        dz[lo:hi] = grad
    return dz
