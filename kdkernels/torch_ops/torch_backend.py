"""The torch backend: the production path for CPU tensors.

It computes the per-row statistics of ``layout.py`` and the analytic gradient of SPEC §2 and §2b, a chunk of rows
at a time, so its extra memory is bounded by a chunk whatever ``N``. It works in float32, or in float64 when an
input is float64 (for ``gradcheck``).

Log-probabilities. With ``x`` a row of raw logits, ``m = max x`` and ``s = sum exp((x - m) / T)``, every
log-probability is formed as ``(x - m) / T - log s``, never as ``x / T - lse`` with ``lse`` rounded to one
float32 number: at ``|x| = 1e4`` that rounding alone moves every probability by 5e-4, and at ``x = -1e9`` (a
common mask value) it swallows ``log s`` entirely. So the forward stores ``m`` and ``log s`` apart, in the columns
the Triton kernels use (``MAX_Z``, ``LOGS_Z``, ``MAX_T``, ``LOGS_T``, and ``MAX_CE``, ``LOGS_CE`` at ``T = 1``).
A row of all ``-inf`` has ``m = 0`` and, for the divergences,
``log s = 0``, so its probabilities are exactly 0.

Speed. The chunk functions follow the kernels: ``e = exp((x - m) / T)`` is computed once and the forward's sums
come from it (``F`` and ``R`` from centred sums, as in ``kernels/forward.py``); AKL's cut is a radix select
(``akl_select.py``), not a sort. CPU inputs in float32 or 16-bit floats with at least
``COMPILE_MIN_ELEMENTS`` entries (``2**18``: N = 32 rows of V = 8192) run the chunk functions through
``torch.compile``: inductor turns each into a few loops over the rows (the backward into one, a single pass over
``z`` and ``t``) and keeps no ``(chunk, V)`` buffer, except in AKL's radix select (hence its smaller chunks).
Shapes are static but for the row count, which is marked dynamic, so one compilation per set of options and ``V``
serves every ``N``; the rows are cut into equal chunks of at most ``COMPILED_CHUNK_ELEMENTS / V`` rows (the last
one overlapping its predecessor where they cannot be equal). The first call with new options pays the compilation
(several seconds per function on a small CPU); the environment variable ``KDKERNELS_COMPILE=0`` keeps everything
eager. Where compilation is unavailable or fails, the same functions run eagerly, after a warning. Smaller inputs,
the test suite's among them, run eagerly, where fewer passes count more than fewer ``exp`` calls (ToDi's sigmoids).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from kdkernels.torch_ops import layout
from kdkernels.torch_ops.akl_select import akl_weights_select
from kdkernels.torch_ops.options import KDOptions
from kdkernels.torch_ops.reference import compute_dtype

CHUNK_ELEMENTS = 1 << 21  # entries of one (chunk, V) temporary on the eager path
# Compiled chunks keep no (chunk, V) buffer, so they are large (fewer calls and thread barriers), except AKL's
# forward: its radix select keeps a few (keys, digits, masses, ranks).
COMPILED_CHUNK_ELEMENTS = 1 << 26
AKL_CHUNK_ELEMENTS = 1 << 20
COMPILE_MIN_ELEMENTS = 1 << 18  # smaller inputs run eagerly, so test-sized calls never compile
RECOMPILE_LIMIT = 64  # compilations of one chunk function (options x V) before dynamo runs it eagerly
NEG_INF = float("-inf")
BASELINES = ("sfkl", "srkl", "jsd", "tvd")  # SPEC §2b: gradient q (g - Q_G) / T with g = dL/dq
_FAILED: set[str] = set()  # chunk functions whose compilation failed in this process


def chunk_rows(vocab: int, compiled: bool = False, akl_select: bool = False) -> int:
    """Rows per chunk: about ``CHUNK_ELEMENTS`` (``COMPILED_CHUNK_ELEMENTS``) entries, at most
    ``AKL_CHUNK_ELEMENTS`` for AKL's forward, at least one row."""
    elements = COMPILED_CHUNK_ELEMENTS if compiled else CHUNK_ELEMENTS
    return max(1, (min(elements, AKL_CHUNK_ELEMENTS) if akl_select else elements) // max(vocab, 1))


def _balanced(n_rows: int, most: int) -> int:
    """Rows per chunk when ``n_rows`` are cut into as few chunks of at most ``most`` rows as possible, of equal
    size where they can be (2048 rows at most 262 a chunk: 8 chunks of 256, none overlapping)."""
    chunks = max(1, -(-n_rows // most))
    return max(1, -(-n_rows // chunks))


def _scaled(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """``x / T`` (``x`` itself at ``T = 1``, where the division is exact)."""
    return x if temperature == 1.0 else x / temperature


def _row_max(x: torch.Tensor) -> torch.Tensor:
    """Row maxima ``(rows,)`` of ``x`` ``(rows, V)``; 0 for an all ``-inf`` row, so that ``x - max`` stays ``-inf``
    there instead of NaN."""
    m = x.amax(-1)
    return torch.where(m == NEG_INF, 0.0, m)


def _floored(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``c = (x - m) / T`` with the lowest finite value where a finite ``x`` overflowed it to ``-inf`` (``finfo.min``
    at ``T < 1``): that entry's probability is 0 either way, but it is not masked (SPEC §1 masks ``-inf`` logits
    only). ``-inf`` at ``-inf`` logits and NaN stay."""
    return torch.where(x == NEG_INF, c, c.clamp_min(torch.finfo(c.dtype).min))


def _centred(x: torch.Tensor, m: torch.Tensor, temperature: float):
    """``(c, e, s)`` of a chunk ``x`` ``(rows, V)`` with row maxima ``m`` ``(rows,)``: ``c = (x - m) / T``
    (:func:`_floored`), ``e = exp(c)`` (0 at ``-inf`` entries) and ``s = sum e`` ``(rows,)``."""
    c = _floored(_scaled(x - m[:, None], temperature), x)
    e = c.exp()
    return c, e, e.sum(-1)


def _log_sum(s: torch.Tensor) -> torch.Tensor:
    """``log s``, or 0 where ``s = 0`` (an all ``-inf`` row: its probabilities ``exp(c - log s)`` are then 0)."""
    return torch.where(s == 0, 0.0, s.log())


def _log_probs(x: torch.Tensor, m: torch.Tensor, log_sum: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probabilities ``(x - m) / T - log s`` ``(rows, V)`` from the stored ``m`` and ``log s`` ``(rows,)``
    (:func:`_floored`)."""
    return _floored(_scaled(x - m[:, None], temperature), x) - log_sum[:, None]


def _sigmoids(d: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ToDi's ``w = sigmoid(-b d)`` and ``c = sigmoid(b d)``, neither formed as ``1 - other``.

    Compiled, from one ``u = exp(-b |d|)``: with ``r = 1 / (1 + u)`` the larger of the two is ``r`` and the
    smaller ``u r``, each accurate to a few ulp, one ``exp`` per entry instead of two. Eager, two fused
    ``torch.sigmoid`` calls, fewer passes over the chunk.
    """
    if not torch.compiler.is_compiling():
        return torch.sigmoid(-beta * d), torch.sigmoid(beta * d)
    u = torch.exp(-beta * d.abs())
    big = (1.0 + u).reciprocal()
    small = u * big
    positive = d >= 0
    return torch.where(positive, small, big), torch.where(positive, big, small)


def _mixture_log_ratios(lp: torch.Tensor, lq: torch.Tensor, w_p: float,
                        w_q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log(p / M), log(q / M))`` for ``M = w_p p + w_q q`` (``w_p + w_q = 1``), from ``lp``, ``lq`` ``(rows, V)``.

    With ``d = lq - lp``, the larger of ``p`` and ``q`` factors out of ``M``: ``M = max(p, q) s`` with
    ``s = 1 + w_small expm1(-|d|)`` (``w_small`` the weight of the smaller one), so ``log s = log1p(...)`` is exactly
    0 where ``p == q`` and keeps its digits where they are close (no ``log`` of a sum, no epsilon). Both weights
    are given, as ``1 - w`` of a ``w`` near 1 would have lost its digits.
    """
    d = lq - lp
    w_small = torch.where(d <= 0, d.new_full((), w_q), w_p)  # in d's dtype (where() of two floats is float32)
    log_s = torch.log1p(w_small * torch.expm1(-d.abs()))
    return -d.clamp(min=0.0) - log_s, d.clamp(max=0.0) - log_s


def _baseline_terms(lq, lp, q, p, live, opts: KDOptions, with_loss: bool):
    """``(terms, g)`` of a baseline divergence (SPEC §2b), each ``(rows, V)`` and 0 where not ``live``: the row
    loss is ``sum terms`` and ``g = dL/dq``, so that ``dL/dz_j = q_j (g_j - sum q g) / T``. ``terms`` is None
    unless ``with_loss``. From the log-probabilities ``lq``, ``lp`` and probabilities ``q``, ``p``, all
    ``(rows, V)``; with ``l = skew_lambda``, ``b = jsd_beta`` and the mixtures in log space:

    - sfkl: ``lm = log(l p + (1 - l) q)``, terms ``p (lp - lm)``, ``g = -(1 - l) exp(lp - lm)``
    - srkl: ``lm = log((1 - l) p + l q)``, terms ``q (lq - lm)``, ``g = lq - lm + 1 - l exp(lq - lm)``
    - jsd:  ``lM = log(b p + (1 - b) q)``, terms ``b p (lp - lM) + (1 - b) q (lq - lM)``, ``g = (1 - b)(lq - lM)``
      (``0 < b < 1``: ``options.from_op`` runs fkl and rkl at the ends)
    - tvd:  terms ``|p - q| / 2``, ``g = sign(q - p) / 2`` (0 where ``p = q``)
    """
    divergence = opts.divergence
    # Finite stand-ins where masked, so no -inf - -inf (NaN) arises in the entries that where() drops.
    lq, lp = torch.where(live, lq, 0.0), torch.where(live, lp, 0.0)
    terms = None
    if divergence == "sfkl":
        # M / p = l + (1 - l) exp(lq - lp) >= l: one exp, a log and a division, where the log-space ratios cost
        # three transcendental functions. The exponent is capped at 80 (exp(80) is finite in float32): past it
        # p < q exp(-80) <= exp(-80), so the cap moves p log(p / M) by less than p (d - 80) ~ 1e-33.
        lam = opts.skew_lambda
        mix = lam + (1.0 - lam) * (lq - lp).clamp(max=80.0).exp()
        g = -(1.0 - lam) / mix
        if with_loss:
            terms = -p * mix.log()
    elif divergence == "srkl":
        lam = opts.skew_lambda
        _, log_ratio = _mixture_log_ratios(lp, lq, 1.0 - lam, lam)
        g = log_ratio + 1.0 - lam * log_ratio.exp()
        if with_loss:
            terms = q * log_ratio
    elif divergence == "jsd":
        beta = opts.jsd_beta
        p_ratio, q_ratio = _mixture_log_ratios(lp, lq, beta, 1.0 - beta)
        g = (1.0 - beta) * q_ratio
        if with_loss:
            terms = beta * p * p_ratio + (1.0 - beta) * q * q_ratio
    else:
        diff = q - p
        g = 0.5 * diff.sign() + 0.0 * diff  # sign() maps NaN to 0; the product keeps an invalid row's NaN
        if with_loss:
            terms = 0.5 * diff.abs()
    g = torch.where(live, g, 0.0)
    return (None if terms is None else torch.where(live, terms, 0.0)), g


def todi_sums(lq: torch.Tensor, lp: torch.Tensor, live: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ToDi's ``(S_a - S_b, loss)`` per row from the log-probabilities ``lq``, ``lp`` ``(rows, V)`` and the mask
    ``live``: ``S_a = sum_m w p``, ``S_b = sum_m c q (d + 1)``, loss ``sum_m (c q - w p) d``, ``d = lq - lp``."""
    d = torch.where(live, lq - lp, 0.0)
    w, c = _sigmoids(d, beta)
    w_p, c_q = w * lp.exp(), c * lq.exp()
    s_a = torch.where(live, w_p, 0.0).sum(-1)
    s_b = torch.where(live, c_q * (d + 1.0), 0.0).sum(-1)
    return s_a - s_b, ((c_q - w_p) * d).sum(-1)  # d = 0 where masked


def baseline_sums(lq: torch.Tensor, lp: torch.Tensor, live: torch.Tensor,
                  opts: KDOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """A baseline divergence's ``(Q_G, loss)`` per row (:func:`_baseline_terms`): ``Q_G = sum_m q dL/dq``."""
    q = lq.exp()
    terms, g = _baseline_terms(lq, lp, q, lp.exp(), live, opts, with_loss=True)
    return (q * g).sum(-1), terms.sum(-1)


def _kl_sums(e: torch.Tensor, s: torch.Tensor, centred_diff: torch.Tensor, live: torch.Tensor, log_ratio):
    """``(mass, kl)`` with ``mass = sum_m e / s`` and ``kl = sum_m (e/s) centred_diff - mass log_ratio``.

    For ``e = e_t``, ``centred_diff = b - a``, ``log_ratio = log s_t - log s_z`` this is ``(P, F)``; with the
    roles swapped, ``(Q, R)``. A row with no unmasked mass has ``kl = 0`` (a NaN row stays NaN).
    """
    raw = torch.where(live, e, 0.0).sum(-1)
    acc = torch.where(live, e * centred_diff, 0.0).sum(-1)
    mass = torch.where(raw == 0, 0.0, raw / s)
    return mass, torch.where(raw == 0, 0.0, acc / s - mass * log_ratio)


def _cross_entropy(c: torch.Tensor, s: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log s, ce)`` from the centred raw logits ``c = z - max`` and ``s = sum exp(c)``: ``ce = log s - c_label``,
    NaN for a label outside ``[0, V)`` and for a row of all ``-inf`` (as ``F.cross_entropy``)."""
    log_sum = s.log()
    valid = (labels >= 0) & (labels < c.shape[-1])
    picked = c.gather(-1, torch.where(valid, labels, 0)[:, None])[:, 0]
    return log_sum, torch.where(valid, log_sum - picked, float("nan"))


def _stat_cols(m_z, s_z, m_t, s_t) -> dict:
    """The columns ``MAX_*``, ``LOGS_*`` and ``FOUND_*`` of ``layout.py`` from the row maxima and sums ``(rows,)``."""
    return {layout.MAX_Z: m_z, layout.LOGS_Z: _log_sum(s_z), layout.MAX_T: m_t, layout.LOGS_T: _log_sum(s_t),
            layout.FOUND_Z: (s_z != 0).to(s_z.dtype), layout.FOUND_T: (s_t != 0).to(s_t.dtype)}


def forward_chunk(z, t, labels, opts: KDOptions):
    """Row losses ``(rows,)`` of one chunk and its statistics, as ``{column of layout.py: (rows,)}``.

    Separate outputs instead of one ``(rows, NUM_STATS)`` tensor: compiled, they come out of one loop over the
    rows, where a stacked tensor costs a loop (and a thread barrier) per column.
    """
    divergence, temperature, kd_weight, ce_weight = opts.divergence, opts.temperature, opts.kd_weight, opts.ce_weight
    dtype = compute_dtype(z, t)
    zf, tf = z.to(dtype), t.to(dtype)
    m_z, m_t = _row_max(zf), _row_max(tf)
    a, e_z, s_z = _centred(zf, m_z, temperature)
    b, e_t, s_t = _centred(tf, m_t, temperature)
    log_s_z, log_s_t = _log_sum(s_z), _log_sum(s_t)
    live = torch.minimum(a, b) != NEG_INF  # neither is -inf
    log_ratio = log_s_t - log_s_z
    cols = _stat_cols(m_z, s_z, m_t, s_t)
    if divergence in ("fkl", "akl"):
        cols[layout.MASS_P], cols[layout.FKL] = _kl_sums(e_t, s_t, b - a, live, log_ratio)
        div = cols[layout.FKL]
    if divergence in ("rkl", "akl"):
        cols[layout.MASS_Q], cols[layout.RKL] = _kl_sums(e_z, s_z, a - b, live, -log_ratio)
        div = cols[layout.RKL]
    if divergence == "akl":
        p = e_t / torch.where(s_t == 0, 1.0, s_t)[:, None]
        q = e_z / torch.where(s_z == 0, 1.0, s_z)[:, None]
        cols[layout.R_HEAD], cols[layout.R_TAIL] = akl_weights_select(t, p, q, opts.akl_alpha)
        div = cols[layout.R_HEAD] * cols[layout.FKL] + cols[layout.R_TAIL] * cols[layout.RKL]
    if divergence == "todi":
        cols[layout.TODI_S], div = todi_sums(a - log_s_z[:, None], b - log_s_t[:, None], live, opts.todi_beta)
    if divergence in BASELINES:
        cols[layout.Q_G], div = baseline_sums(a - log_s_z[:, None], b - log_s_t[:, None], live, opts)
    row_loss = kd_weight * div
    if labels is not None:
        if ce_weight != 0.0:
            c_raw, _, s_raw = (a, e_z, s_z) if temperature == 1.0 else _centred(zf, m_z, 1.0)
            cols[layout.MAX_CE] = m_z
            cols[layout.LOGS_CE], cols[layout.CE] = _cross_entropy(c_raw, s_raw, labels)
            row_loss = row_loss + ce_weight * cols[layout.CE]
        row_loss = torch.where(labels != opts.ignore_index, row_loss, 0.0)
    return row_loss, cols


def _soft_minus_onehot(lq: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``softmax(z) - onehot(label)`` ``(rows, V)``, the CE gradient, from the log-probabilities ``lq`` at ``T = 1``;
    all NaN in a row whose label is outside ``[0, V)``. Elementwise (no scatter), so compiled it keeps no buffer."""
    valid = (labels >= 0) & (labels < lq.shape[-1])
    onehot = torch.arange(lq.shape[-1], device=lq.device)[None, :] == labels[:, None]
    return torch.where(valid[:, None], lq.exp() - onehot.to(lq.dtype), float("nan"))


def backward_chunk(out, grad_rows, z, t, labels, stats, opts: KDOptions) -> None:
    """Write the gradient of one chunk of rows into ``out`` ``(rows, V)``: SPEC §2 / §2b times ``g kd_weight / T``
    (the baselines' ``q (dL/dq - Q_G)``), plus ``g ce_weight (softmax(z) - onehot)``, with ``g = grad_rows``
    ``(rows,)``."""
    divergence, temperature, kd_weight, ce_weight = opts.divergence, opts.temperature, opts.kd_weight, opts.ce_weight
    dtype = compute_dtype(z, t)
    st = stats.to(dtype)
    zf = z.to(dtype)
    lq = _log_probs(zf, st[:, layout.MAX_Z], st[:, layout.LOGS_Z], temperature)
    lp = _log_probs(t.to(dtype), st[:, layout.MAX_T], st[:, layout.LOGS_T], temperature)
    q, p = lq.exp(), lp.exp()
    live = torch.minimum(lq, lp) != NEG_INF  # neither is -inf
    if divergence in ("rkl", "akl", "todi"):
        d = torch.where(live, lq - lp, 0.0)
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
    elif divergence in BASELINES:
        _, g_q = _baseline_terms(lq, lp, q, p, live, opts, with_loss=False)
        g_div = q * (g_q - st[:, layout.Q_G, None])
    else:
        w, c = _sigmoids(d, opts.todi_beta)
        g_div = torch.where(live, c * q * (d + 1.0) - w * p, 0.0) + q * st[:, layout.TODI_S, None]
    g = grad_rows.to(dtype)[:, None]
    grad = (g * (kd_weight / temperature)) * g_div
    if labels is not None:
        if ce_weight != 0.0:
            lq_raw = _log_probs(zf, st[:, layout.MAX_CE], st[:, layout.LOGS_CE], 1.0)
            grad = grad + (g * ce_weight) * _soft_minus_onehot(lq_raw, labels)
        grad = torch.where((labels != opts.ignore_index)[:, None], grad, 0.0)
    out.copy_(grad)


@functools.cache
def _compiled(fn):
    """``fn`` through ``torch.compile`` with static shapes, except the rows that ``_run`` marks dynamic."""
    return torch.compile(fn, dynamic=False)


def _use_compiled(z: torch.Tensor, t: torch.Tensor) -> bool:
    """Compile for float32/16-bit CPU inputs of at least ``COMPILE_MIN_ELEMENTS`` entries, unless disabled."""
    return (
        z.device.type == "cpu"
        and compute_dtype(z, t) == torch.float32
        and z.numel() >= COMPILE_MIN_ELEMENTS
        and os.environ.get("KDKERNELS_COMPILE", "1") != "0"
        and not torch.compiler.is_compiling()
    )


def _run(fn, compiled: bool, *args):
    """``fn(*args)``, through ``torch.compile`` when ``compiled`` and its compilation has not failed before.

    The row count of the tensor arguments is marked dynamic (one compilation serves every chunk size but 1);
    ``V`` and the options stay static (a compilation each), so ``RECOMPILE_LIMIT`` lifts dynamo's default of 8
    compilations per function for these calls (four divergences at two vocabularies already make 8).
    """
    if compiled and fn.__name__ not in _FAILED:
        for x in args:
            if isinstance(x, torch.Tensor) and x.shape[0] > 1:
                torch._dynamo.mark_dynamic(x, 0)
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return _compiled(fn)(*args)
        except Exception as err:  # no C++ compiler, unsupported platform, or an inductor failure
            _FAILED.add(fn.__name__)
            warnings.warn(f"kdkernels: torch.compile of {fn.__name__} failed, running eagerly: {err!r}", stacklevel=2)
    return fn(*args)


def _row_ranges(n_rows: int, step: int, aligned: bool):
    """``[lo, hi)`` ranges of ``step`` rows covering ``n_rows``; ``aligned``: the last one ends at ``n_rows``
    with a full ``step`` rows when ``n_rows >= step`` (overlapping its predecessor), so the chunks have one
    shape."""
    for lo in range(0, n_rows, step):
        lo = max(0, min(lo, n_rows - step)) if aligned else lo
        yield lo, min(lo + step, n_rows)


def _chunks(z: torch.Tensor, t: torch.Tensor, akl_select: bool = False):
    """``(compiled, [lo, hi) row ranges)`` of a pass over ``z``, ``t`` ``(N, V)`` (:func:`_use_compiled`,
    :func:`chunk_rows`)."""
    compiled = _use_compiled(z, t)
    most = chunk_rows(z.shape[1], compiled, akl_select=akl_select)
    return compiled, _row_ranges(z.shape[0], _balanced(z.shape[0], most), compiled)


def _stats_buffer(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(N, NUM_STATS)`` of NaN in the compute dtype: columns a pass does not write stay NaN."""
    return torch.full((z.shape[0], layout.NUM_STATS), float("nan"), dtype=compute_dtype(z, t), device=z.device)


def _part(x: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor | None:
    return None if x is None else x[lo:hi]


def kd_forward(z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
               opts: KDOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Row losses ``(N,)`` and statistics ``(N, NUM_STATS)`` of ``z``, ``t`` ``(N, V)``; see ``layout.py`` and the
    module docstring (NaN in the columns this divergence does not use)."""
    loss = torch.empty(z.shape[0], dtype=compute_dtype(z, t), device=z.device)
    stats = _stats_buffer(z, t)
    compiled, ranges = _chunks(z, t, akl_select=opts.divergence == "akl")
    for lo, hi in ranges:
        loss[lo:hi], cols = _run(forward_chunk, compiled, z[lo:hi], t[lo:hi], _part(labels, lo, hi), opts)
        for col, value in cols.items():
            stats[lo:hi, col] = value
    return loss, stats


def kd_backward(grad_rows: torch.Tensor, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
                stats: torch.Tensor, opts: KDOptions) -> torch.Tensor:
    """Gradient ``(N, V)`` w.r.t. ``z`` in ``z``'s dtype, from the row-loss gradient ``grad_rows`` ``(N,)``."""
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    compiled, ranges = _chunks(z, t)
    for lo, hi in ranges:
        _run(backward_chunk, compiled, dz[lo:hi], grad_rows[lo:hi], z[lo:hi], t[lo:hi], _part(labels, lo, hi),
             stats[lo:hi], opts)
    return dz


# Vocabulary slices (``vocab_parallel.py``): the two passes of a slice, each on the slice alone.

def shard_stats_chunk(z, t, labels, opts: KDOptions) -> dict:
    """The slice's own statistics of one chunk of rows ``z``, ``t`` ``(rows, V_r)``: ``MAX_*``, ``LOGS_*``,
    ``FOUND_*``; for fkl ``MASS_P``, ``FKL`` and for rkl ``MASS_Q``, ``RKL`` of the slice's own softmaxes; with a
    hard-label term at ``T != 1`` the slice's ``LOGS_CE`` (centred on its ``MAX_Z``)."""
    divergence, temperature = opts.divergence, opts.temperature
    dtype = compute_dtype(z, t)
    zf, tf = z.to(dtype), t.to(dtype)
    m_z, m_t = _row_max(zf), _row_max(tf)
    a, e_z, s_z = _centred(zf, m_z, temperature)
    b, e_t, s_t = _centred(tf, m_t, temperature)
    cols = _stat_cols(m_z, s_z, m_t, s_t)
    live = torch.minimum(a, b) != NEG_INF
    log_ratio = cols[layout.LOGS_T] - cols[layout.LOGS_Z]
    if divergence == "fkl":
        cols[layout.MASS_P], cols[layout.FKL] = _kl_sums(e_t, s_t, b - a, live, log_ratio)
    if divergence == "rkl":
        cols[layout.MASS_Q], cols[layout.RKL] = _kl_sums(e_z, s_z, a - b, live, -log_ratio)
    if labels is not None and opts.ce_weight != 0.0 and temperature != 1.0:
        cols[layout.LOGS_CE] = _log_sum(_centred(zf, m_z, 1.0)[2])
    return cols


def shard_finish_chunk(z, t, stats, opts: KDOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """The slice's part of ToDi's or a baseline's row sums, ``(loss, S)`` ``(rows,)`` (``S``: ``TODI_S`` or
    ``Q_G``), from the rows' global ``MAX_*`` and ``LOGS_*`` in ``stats``."""
    dtype = compute_dtype(z, t)
    st = stats.to(dtype)
    lq = _log_probs(z.to(dtype), st[:, layout.MAX_Z], st[:, layout.LOGS_Z], opts.temperature)
    lp = _log_probs(t.to(dtype), st[:, layout.MAX_T], st[:, layout.LOGS_T], opts.temperature)
    live = torch.minimum(lq, lp) != NEG_INF
    if opts.divergence == "todi":
        s, div = todi_sums(lq, lp, live, opts.todi_beta)
    else:
        s, div = baseline_sums(lq, lp, live, opts)
    return div, s


def shard_stats(z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, opts: KDOptions) -> torch.Tensor:
    """``(N, NUM_STATS)``: :func:`shard_stats_chunk` of the slices ``z``, ``t`` ``(N, V_r)`` (NaN elsewhere)."""
    stats = _stats_buffer(z, t)
    compiled, ranges = _chunks(z, t)
    for lo, hi in ranges:
        for col, value in _run(shard_stats_chunk, compiled, z[lo:hi], t[lo:hi], _part(labels, lo, hi), opts).items():
            stats[lo:hi, col] = value
    return stats


def shard_finish(z: torch.Tensor, t: torch.Tensor, stats: torch.Tensor, opts: KDOptions) -> torch.Tensor:
    """``(N, 2)``: :func:`shard_finish_chunk`'s ``(loss, S)`` of the slices ``z``, ``t`` ``(N, V_r)``."""
    out = torch.empty((z.shape[0], 2), dtype=compute_dtype(z, t), device=z.device)
    compiled, ranges = _chunks(z, t)
    for lo, hi in ranges:
        out[lo:hi, 0], out[lo:hi, 1] = _run(shard_finish_chunk, compiled, z[lo:hi], t[lo:hi], stats[lo:hi], opts)
    return out
