"""The torch backend: the production path for CPU tensors.

It computes the same per-row statistics as the Triton kernels (``layout.py``) and the analytic gradient of
SPEC §2, a chunk of ``chunk_rows(V)`` rows at a time, so its extra memory is a few ``(chunk, V)``
temporaries whatever ``N``. It works in float32, or in float64 when an input is float64 (for ``gradcheck``).

Speed. The chunk functions follow the kernels: ``e_z = exp(z/T - max)`` and ``e_t = exp(t/T - max)`` are
computed once and the row sums come from them (``F`` and ``R`` from centred sums, as in
``kernels/forward.py``); ToDi's two sigmoids share one ``exp``; AKL's cut is the kernels' radix select
(``akl_select.py``), not a sort. On large CPU inputs in float32 or 16-bit
floats (at least ``COMPILE_MIN_ELEMENTS`` entries) the chunk functions run through ``torch.compile``, which
fuses each into a few loops over the row. Shapes are static and the chunk has a fixed row count: the last
chunk ends at row ``N`` and overlaps the one before it, so there is one compilation per set of options and
``V``, whatever ``N``. The first such call pays the compilation (tens of seconds on a small CPU); the
environment variable ``KDKERNELS_COMPILE=0`` keeps everything eager. Where compilation is unavailable or
fails, the same functions run eagerly, after a warning.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from kdkernels.torch_ops import layout
from kdkernels.torch_ops.akl_select import akl_weights_select
from kdkernels.torch_ops.reference import compute_dtype

CHUNK_ELEMENTS = 1 << 21  # entries of one (chunk, V) temporary on the eager path
# Compiled chunks are larger (fewer calls and parallel regions per batch): inductor fuses the chunk functions
# into loops that keep no (chunk, V) buffer, except ToDi's forward, which keeps three (3 x 32 MiB in float32).
# Smaller inputs run eagerly, so test-sized calls never compile.
COMPILED_CHUNK_ELEMENTS = COMPILE_MIN_ELEMENTS = 1 << 23
AKL_CHUNK_DIVISOR = 8
NEG_INF = float("-inf")
_FAILED: set[str] = set()  # chunk functions whose compilation failed in this process


def chunk_rows(vocab: int, compiled: bool = False) -> int:
    """Rows per chunk: about ``CHUNK_ELEMENTS`` (``COMPILED_CHUNK_ELEMENTS``) entries, at least one row."""
    return max(1, (COMPILED_CHUNK_ELEMENTS if compiled else CHUNK_ELEMENTS) // max(vocab, 1))


def _centred(x: torch.Tensor, temperature: float, dtype: torch.dtype):
    """``(c, e, s, lse)`` of logits ``x`` ``(rows, V)``: ``c = x/T - max`` (the max taken as 0 in an all -inf
    row), ``e = exp(c)`` (0 at -inf entries), ``s = sum e`` and ``lse = max + log s`` (-inf for an all -inf row).
    """
    xs = x.to(dtype) / temperature
    m = xs.amax(-1, keepdim=True)
    m = torch.where(m == NEG_INF, 0.0, m)
    c = xs - m
    e = c.exp()
    s = e.sum(-1)
    return c, e, s, m[:, 0] + s.log()


def _probs(z, t, lse_z, lse_t, temperature: float, dtype: torch.dtype):
    """``(q, p, d, live)`` of one chunk from its logits and final log-sum-exps, all ``(rows, V)``.

    ``d = lq - lp`` (0 where masked); ``exp(-inf - lse)`` is 0, and all -inf rows give probabilities 0, not NaN.
    """
    zs = z.to(dtype) / temperature
    ts = t.to(dtype) / temperature
    live = (zs != NEG_INF) & (ts != NEG_INF)
    lq = zs - lse_z[:, None]
    lp = ts - lse_t[:, None]
    q = torch.where(zs == NEG_INF, 0.0, lq.exp())
    p = torch.where(ts == NEG_INF, 0.0, lp.exp())
    return q, p, torch.where(live, lq - lp, 0.0), live


def _sigmoids(d: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ToDi's ``w = sigmoid(-b d)`` and ``c = sigmoid(b d)`` from one ``u = exp(-b |d|)``.

    With ``r = 1 / (1 + u)`` the larger of the two is ``r`` and the smaller ``u r``, each accurate to a few
    ulp (neither is formed as ``1 - other``).
    """
    u = torch.exp(-beta * d.abs())
    big = 1.0 / (1.0 + u)
    small = u * big
    positive = d >= 0
    return torch.where(positive, small, big), torch.where(positive, big, small)


def _kl_sums(e: torch.Tensor, s: torch.Tensor, centred_diff: torch.Tensor, live: torch.Tensor, log_ratio):
    """``(mass, kl)`` with ``mass = sum_m e / s`` and ``kl = sum_m (e/s) centred_diff - mass log_ratio``.

    For ``e = e_t``, ``centred_diff = b - a``, ``log_ratio = log s_t - log s_z`` this is ``(P, F)``; with the
    roles swapped, ``(Q, R)``. A row with no unmasked mass has ``kl = 0`` (a NaN row stays NaN).
    """
    raw = torch.where(live, e, 0.0).sum(-1)
    acc = torch.where(live, e * centred_diff, 0.0).sum(-1)
    mass = torch.where(raw == 0, 0.0, raw / s)
    return mass, torch.where(raw == 0, 0.0, acc / s - mass * log_ratio)


def _cross_entropy(z: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse, ce)`` of raw logits ``z`` (temperature 1); NaN CE for labels outside [0, V)."""
    zf = z.to(dtype)
    lse = torch.logsumexp(zf, dim=-1)
    valid = (labels >= 0) & (labels < z.shape[-1])
    picked = zf.gather(-1, torch.where(valid, labels, 0)[:, None])[:, 0]
    return lse, torch.where(valid, lse - picked, float("nan"))


def forward_chunk(z, t, labels, divergence, ignore_index, temperature, akl_alpha, todi_beta, kd_weight, ce_weight):
    """Row losses ``(rows,)`` and statistics ``(rows, NUM_STATS)`` (NaN in unused columns) of one chunk."""
    dtype = compute_dtype(z, t)
    a, e_z, s_z, lse_z = _centred(z, temperature, dtype)
    b, e_t, s_t, lse_t = _centred(t, temperature, dtype)
    live = (a != NEG_INF) & (b != NEG_INF)
    log_ratio = s_t.log() - s_z.log()
    cols = [torch.full_like(lse_z, float("nan"))] * layout.NUM_STATS
    cols[layout.LSE_Z], cols[layout.LSE_T] = lse_z, lse_t
    if divergence in ("fkl", "akl"):
        cols[layout.MASS_P], cols[layout.FKL] = _kl_sums(e_t, s_t, b - a, live, log_ratio)
        div = cols[layout.FKL]
    if divergence in ("rkl", "akl"):
        cols[layout.MASS_Q], cols[layout.RKL] = _kl_sums(e_z, s_z, a - b, live, -log_ratio)
        div = cols[layout.RKL]
    if divergence == "akl":
        p = e_t / torch.where(s_t == 0, 1.0, s_t)[:, None]
        q = e_z / torch.where(s_z == 0, 1.0, s_z)[:, None]
        cols[layout.R_HEAD], cols[layout.R_TAIL] = akl_weights_select(t, p, q, akl_alpha)
        div = cols[layout.R_HEAD] * cols[layout.FKL] + cols[layout.R_TAIL] * cols[layout.RKL]
    if divergence == "todi":
        # From the inputs and the final log-sum-exps, as the kernels' second pass: compiled, this is one more
        # fused loop over z and t instead of (chunk, V) buffers kept from the first.
        q, p, d, live = _probs(z, t, lse_z, lse_t, temperature, dtype)
        w, c = _sigmoids(d, todi_beta)
        s_a = torch.where(live, w * p, 0.0).sum(-1)
        s_b = torch.where(live, c * q * (d + 1.0), 0.0).sum(-1)
        cols[layout.TODI_S] = s_a - s_b
        div = torch.where(live, (c * q - w * p) * d, 0.0).sum(-1)
    row_loss = kd_weight * div
    if labels is not None:
        if ce_weight != 0.0:
            cols[layout.LSE_CE], cols[layout.CE] = _cross_entropy(z, labels, dtype)
            row_loss = row_loss + ce_weight * cols[layout.CE]
        row_loss = torch.where(labels != ignore_index, row_loss, 0.0)
    return row_loss, torch.stack(cols, dim=-1)


def backward_chunk(out, grad_rows, z, t, labels, stats, divergence, ignore_index, temperature, todi_beta,
                   kd_weight, ce_weight) -> None:
    """Write the gradient of one chunk of rows into ``out`` ``(rows, V)`` (SPEC §2, times ``g kd_weight / T``)."""
    dtype = compute_dtype(z, t)
    st = stats.to(dtype)
    q, p, d, live = _probs(z, t, st[:, layout.LSE_Z], st[:, layout.LSE_T], temperature, dtype)
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
        w, c = _sigmoids(d, todi_beta)
        g_div = torch.where(live, c * q * (d + 1.0) - w * p, 0.0) + q * st[:, layout.TODI_S, None]
    g = grad_rows.to(dtype)[:, None]
    grad = (g * (kd_weight / temperature)) * g_div
    if labels is not None:
        if ce_weight != 0.0:
            zf = z.to(dtype)
            soft = torch.where(zf == NEG_INF, 0.0, (zf - st[:, layout.LSE_CE, None]).exp())
            onehot = torch.arange(z.shape[-1], device=z.device)[None, :] == labels[:, None]
            grad = grad + (g * ce_weight) * (soft - onehot.to(dtype))
        grad = torch.where((labels != ignore_index)[:, None], grad, 0.0)
    out.copy_(grad)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _use_compiled(z: torch.Tensor, t: torch.Tensor) -> bool:
    """Compile for large float32/16-bit CPU inputs with at least one full chunk, unless disabled."""
    return (
        z.device.type == "cpu"
        and compute_dtype(z, t) == torch.float32
        and z.numel() >= COMPILE_MIN_ELEMENTS
        and z.shape[0] >= chunk_rows(z.shape[1], compiled=True)
        and os.environ.get("KDKERNELS_COMPILE", "1") != "0"
        and not torch.compiler.is_compiling()
    )


def _run(fn, compiled: bool, *args):
    """``fn(*args)``, through ``torch.compile`` when ``compiled`` and its compilation has not failed before."""
    if compiled and fn.__name__ not in _FAILED:
        try:
            return _compiled(fn)(*args)
        except Exception as err:  # no C++ compiler, unsupported platform, or an inductor failure
            _FAILED.add(fn.__name__)
            warnings.warn(f"kdkernels: torch.compile of {fn.__name__} failed, running eagerly: {err!r}", stacklevel=2)
    return fn(*args)


def _row_ranges(n_rows: int, step: int, aligned: bool):
    """``[lo, hi)`` ranges of ``step`` rows covering ``n_rows``; ``aligned``: the last one ends at ``n_rows``
    with a full ``step`` rows (overlapping its predecessor), so every chunk has the same shape."""
    for lo in range(0, n_rows, step):
        lo = min(lo, n_rows - step) if aligned else lo
        yield lo, min(lo + step, n_rows)


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
    stats = torch.empty((n_rows, layout.NUM_STATS), dtype=dtype, device=z.device)
    compiled = _use_compiled(z, t)
    # AKL's radix select keeps a few (chunk, V) buffers (keys, masses, ranks) even compiled: smaller chunks.
    step = chunk_rows(vocab, compiled) // (AKL_CHUNK_DIVISOR if divergence == "akl" else 1)
    for lo, hi in _row_ranges(n_rows, max(step, 1), compiled):
        lab = None if labels is None else labels[lo:hi]
        loss[lo:hi], stats[lo:hi] = _run(forward_chunk, compiled, z[lo:hi], t[lo:hi], lab, divergence,
                                         ignore_index, temperature, akl_alpha, todi_beta, kd_weight, ce_weight)
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
    dz = torch.empty((n_rows, vocab), dtype=z.dtype, device=z.device)
    compiled = _use_compiled(z, t)
    for lo, hi in _row_ranges(n_rows, chunk_rows(vocab, compiled), compiled):
        lab = None if labels is None else labels[lo:hi]
        _run(backward_chunk, compiled, dz[lo:hi], grad_rows[lo:hi], z[lo:hi], t[lo:hi], lab, stats[lo:hi],
             divergence, ignore_index, temperature, todi_beta, kd_weight, ce_weight)
    return dz
