"""The ops of sparse (top-k) teachers (SPEC §7): the registered ``sparse_forward``/``sparse_backward``,
``topk_teacher`` and ``topk_rest`` ops, their torch backend, the shared forward :func:`forward_rows` and the checks of
sparse teacher arguments. The public functions (``sparse_kd_loss``, ``topk_teacher``, ...) are ``sparse.py``'s.

The teacher is given as ``K`` vocabulary ids per row with their log-probs (``-inf``: padding). Per row, with
``lq = log_softmax(z / T)`` of the student over the whole vocabulary:

- ``tail="bucket"`` (default): categories are the valid ids (ascending id order) and a rest category. Student
  category log-probs ``c_k = lq_k`` and ``c_rest = log q_rest``, ``q_rest = sum_{j not in K} q_j`` (summed over those
  entries: never ``1 - sum_K q``); teacher category logits ``lp_k`` and ``log p_rest``: the caller's
  ``teacher_rest_logprob`` when given (``topk_teacher(..., return_rest=True)`` computes it from the full logits),
  else ``log max(1 - sum_K p, REST_FLOOR)`` summed in float64 (``sparse_reference.REST_FLOOR = 2**-126``), so the
  rest category is never dropped for a confident teacher.
- ``tail="renormalize"``: the valid categories only.
- ``tail="truncate"`` (fkl only): ``sum_K p_k (lp_k - lq_k)``, ``p_k = exp(lp_k)`` as given; not a divergence.

For bucket and renormalize the dense op of ``op.py`` (either backend) evaluates the divergence on the
``(N, K [+1])`` category log-probs at temperature 1 and gives ``G = dL/dc`` (per unit row gradient). As ``c_k =
z_k / T - LSE(z / T)`` and ``c_rest = log sum_{j not in K} exp(z_j / T) - LSE(z / T)``, the chain rule gives::

    dL/dz_j = (1/T) (G_j [j in K] + G_rest [j not in K] q_j / q_rest - S q_j),   S = sum_c G_c

and ``S = 0``, since the dense loss depends on category logits only through their softmax. Truncate has
``G_k = -p_k`` and ``S = -sum_K p`` (its ``c_k`` are not category logits), hence ``q_j sum_K p - p_j [j in K]``.
So the backward is one pass over ``z`` writing ``dz`` (``kernels/sparse.py``), with ``q_j / q_rest`` formed as
``exp((z_j - m_r) / T) / s_r`` from the rest's own maximum and sum, which cannot overflow.

A row whose valid ids repeat or leave ``[0, V)`` is invalid: its loss and gradient are NaN (tensor ops, no host
synchronisation). ``topk_teacher`` gives the ``k`` largest ``log_softmax(t / T)`` and their ids, by a streaming
Triton kernel on CUDA tensors and a row-chunked torch path on CPU tensors (and for ``k > 256``), and on request the
log of the mass outside them: the streaming statistics of the entries outside the ids (the bucket tail's
``q_rest``, applied to the teacher), ``(m_r - M) / T + log s_r - log s``, exact where ``1 - sum_K p`` is not.

The column numbers of the statistics (``R_*`` of the streaming pass, ``S_*`` of the op) are ``layout.py``'s. The
vocabulary-parallel path (``vocab_parallel.py``) runs :func:`forward_rows` with its own streaming statistics,
injected as ``shard_stats``, so nothing here imports a path module.
"""

from __future__ import annotations

import torch

from kdkernels.torch_ops import validate
from kdkernels.torch_ops.layout import (
    NUM_SPARSE_STATS,
    NUM_STREAM_STATS,
    R_LOGS,
    R_LOGS_CE,
    R_MAX,
    S_G_REST,
    S_LOGS,
    S_LOGS_CE,
    S_LOGS_R,
    S_MAX,
    S_MAX_R,
    S_S,
)
from kdkernels.torch_ops.op import SECOND_DERIVATIVE, _backend_module
from kdkernels.torch_ops.options import KDOptions, from_op, op_args
from kdkernels.torch_ops.reference import compute_dtype
from kdkernels.torch_ops.sparse_reference import invalid_rows, rest_log_prob
from kdkernels.torch_ops.torch_backend import CHUNK_ELEMENTS, _floored, _log_sum, _row_max

TAILS = ("bucket", "renormalize", "truncate")
NEG_INF = float("-inf")
INDEX_DTYPES = (torch.int32, torch.int64)


# ----------------------------------------------------------------------------------------------- torch backend


def _chunks(n_rows: int, vocab: int):
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return (slice(lo, lo + step) for lo in range(0, n_rows, step))


def _in_k(ids: torch.Tensor, use: torch.Tensor, vocab: int) -> torch.Tensor:
    """``(rows, V)`` bool: True at the ids where ``use`` (the others scatter into a dropped extra column)."""
    mask = torch.zeros((ids.shape[0], vocab + 1), dtype=torch.bool, device=ids.device)
    return mask.scatter_(1, torch.where(use, ids, vocab), True)[:, :vocab]


def torch_stats(z, ids, use, labels, opts: KDOptions, rest: bool) -> torch.Tensor:
    """The torch backend's ``kernels.sparse.sparse_stats``: ``(N, NUM_STREAM_STATS)`` over the entries outside the
    ids where ``use`` (``rest``) or over all entries, a chunk of rows at a time."""
    n_rows, vocab = z.shape
    dtype, temperature = compute_dtype(z), opts.temperature
    out = torch.zeros((n_rows, NUM_STREAM_STATS), dtype=dtype, device=z.device)
    for part in _chunks(n_rows, vocab):
        x = z[part].to(dtype)
        if rest:
            x = torch.where(_in_k(ids[part], use[part], vocab), NEG_INF, x)
        m = _row_max(x)
        out[part, R_MAX] = m
        out[part, R_LOGS] = ((x - m[:, None]) / temperature).exp().sum(-1).log()
        if opts.ce_weight != 0.0 and temperature != 1.0:
            out[part, R_LOGS_CE] = (x - m[:, None]).exp().sum(-1).log()
    return out


def torch_backward(grad_rows, z, ids, lp, labels, stats, grad_k, opts: KDOptions, rest: bool) -> torch.Tensor:
    """The torch backend's ``kernels.sparse.sparse_backward``: ``dz`` ``(N, V)``, a chunk of rows at a time."""
    n_rows, vocab = z.shape
    dtype, temperature = compute_dtype(z), opts.temperature
    dz = torch.empty_like(z, memory_format=torch.contiguous_format)
    write = (lp != NEG_INF) & (ids >= 0) & (ids < vocab)
    safe = torch.where(write, ids, 0)
    for part in _chunks(n_rows, vocab):
        x = z[part].to(dtype)
        st = stats[part]
        g = grad_rows[part].to(dtype)
        q = ((x - st[:, S_MAX, None]) / temperature - st[:, S_LOGS, None]).exp()
        out = -st[:, S_S, None] * q
        if rest:
            log_r = st[:, S_LOGS_R, None]
            ratio = ((x - st[:, S_MAX_R, None]) / temperature - torch.where(log_r == NEG_INF, 0.0, log_r)).exp()
            out = out + torch.where(_in_k(safe[part], write[part], vocab), 0.0, st[:, S_G_REST, None] * ratio)
        out = out.scatter_add(1, safe[part], torch.where(write[part], grad_k[part].to(dtype), 0.0))
        out = out * (g / temperature)[:, None]
        if opts.ce_weight != 0.0:
            soft = (x - st[:, S_MAX, None] - st[:, S_LOGS_CE, None]).exp()
            label = labels[part]
            valid = (label >= 0) & (label < vocab)
            onehot = torch.arange(vocab, device=z.device) == label[:, None]
            out = out + (torch.where(valid, opts.ce_weight * g, float("nan"))[:, None] * (soft - onehot.to(dtype)))
        keep = torch.ones_like(g, dtype=torch.bool) if labels is None else labels[part] != opts.ignore_index
        dz[part] = torch.where(keep[:, None], out, 0.0).to(z.dtype)
    return dz


def _order_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys ``(order key of float32 x) * 2**32 + (2**32 - 1 - j)``: distinct, ordered like ``(x, -j)``."""
    bits = torch.where(x == 0, 0.0, x).to(torch.float32).view(torch.int32)
    key32 = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    ids = torch.arange(x.shape[-1], device=x.device, dtype=torch.int64)
    return key32 * 2**32 + (2**32 - 1 - ids)


def torch_topk(t: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (N, k) int64, lp (N, k) float32)``, a chunk of rows at a time: ``topk`` of :func:`_order_keys` (ties to
    the lower id), a stable descending sort for float64 teachers (whose order float32 keys could lose)."""
    n_rows, vocab = t.shape
    ids = torch.empty((n_rows, k), dtype=torch.int64, device=t.device)
    lp = torch.empty((n_rows, k), dtype=torch.float32, device=t.device)
    dtype = compute_dtype(t)
    for part in _chunks(n_rows, vocab):
        x = t[part]
        if x.dtype == torch.float64:
            top = torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k]
        else:
            top = _order_keys(x).topk(k, dim=-1).indices
        x = x.to(dtype)
        m = _row_max(x)
        log_s = _log_sum(((x - m[:, None]) / temperature).exp().sum(-1))
        ids[part] = top
        lp[part] = ((x.gather(1, top) - m[:, None]) / temperature - log_s[:, None]).to(torch.float32)
    return ids, lp


# ------------------------------------------------------------------------------------------------ shared forward


def _stats_fn(backend: str):
    if backend == "triton":
        from kdkernels.kernels import sparse as kernels  # imported on first use: importing kdkernels needs no triton

        return kernels.sparse_stats, kernels.sparse_backward
    return torch_stats, torch_backward


def _row_stats(streamed: torch.Tensor, z_k: torch.Tensor, temperature: float, rest: bool) -> torch.Tensor:
    """The op's ``(N, NUM_SPARSE_STATS)`` statistics (the last two columns 0) from the streaming pass's and, for the
    bucket tail (which streams only the rest), the K gathered logits ``z_k`` (``-inf`` at padding): the whole row's
    maximum ``M`` and ``log(exp((m_r - M) / T + log s_r) + sum_K exp((z_k - M) / T))``, and the same at T = 1."""
    stats = torch.zeros((streamed.shape[0], NUM_SPARSE_STATS), dtype=streamed.dtype, device=streamed.device)
    m_r, log_r, log_ce = streamed[:, R_MAX], streamed[:, R_LOGS], streamed[:, R_LOGS_CE]
    stats[:, S_MAX_R], stats[:, S_LOGS_R] = m_r, log_r
    if rest:
        top = torch.maximum(torch.where(log_r == NEG_INF, NEG_INF, m_r), z_k.amax(-1))
        top = torch.where(top == NEG_INF, 0.0, top)
        shift = (m_r - top)[:, None]
        gap = (z_k - top[:, None])
        log_s = torch.cat([shift / temperature + log_r[:, None], gap / temperature], -1).logsumexp(-1)
        log_ce = torch.cat([shift + log_ce[:, None], gap], -1).logsumexp(-1)
        m_r, log_r = top, log_s
    stats[:, S_MAX], stats[:, S_LOGS] = m_r, torch.where(log_r == NEG_INF, 0.0, log_r)
    stats[:, S_LOGS_CE] = stats[:, S_LOGS] if temperature == 1.0 else torch.where(log_ce == NEG_INF, 0.0, log_ce)
    return stats


def _rest_log_mass(stats: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log sum_{j not in K} softmax(z / T)_j`` ``(N,)`` from :func:`_row_stats`'s bucket statistics:
    ``(m_r - M) / T + log s_r - log s`` (``-inf`` when no entry lies outside K)."""
    return (stats[:, S_MAX_R] - stats[:, S_MAX]) / temperature + stats[:, S_LOGS_R] - stats[:, S_LOGS]


def forward_rows(z, ids, lp, labels, opts: KDOptions, tail: str, backend: str, rest_lp=None, shard_stats=None,
                 vocab=None):
    """``(rows (N,), stats (N, NUM_SPARSE_STATS), grad_k (N, K))`` of ``z`` ``(N, V)``, ``ids``/``lp`` ``(N, K)``.

    ``rest_lp`` ``(N,)``: the teacher's log-mass outside K (bucket tail), used as given; None: ``log max(1 - sum_K p,
    REST_FLOOR)`` from ``lp`` in float64.

    ``grad_k`` and the ``S_G_REST``, ``S_S`` columns are ``G`` and ``S`` per unit row gradient (NaN on invalid
    rows). The category divergence runs through the dense op's backend module.

    ``shard_stats``: None, or the streaming statistics of a layout of the vocabulary in which ``z`` is only a part
    of each row (SPEC §8: ``vocab_parallel.sparse_stats`` bound to its shard and group), called as
    ``shard_stats(z, safe, use, labels, opts, rest)`` with the ids made safe (``0`` where not ``use``) and returning
    ``(streamed (N, NUM_STREAM_STATS), z_k (N, K), label_logit (N,))`` of the whole rows: the statistics, the
    logits at the ids (``-inf`` where not ``use``) and at the labels (None without a CE term). ``vocab``: the
    whole vocabulary's size, which the ids and labels index (default ``z.shape[1]``). The ids are global, and the
    category op, the same on every part, runs on every part.
    """
    n_rows = z.shape[0]
    vocab = z.shape[1] if vocab is None else vocab
    k = ids.shape[1]
    dtype, temperature = compute_dtype(z), opts.temperature
    valid = lp != NEG_INF
    bad = invalid_rows(ids, valid, vocab)
    use = valid & ~bad[:, None]
    safe = torch.where(use, ids, 0)
    if shard_stats is None:
        stats_fn, _ = _stats_fn(backend)
        streamed = stats_fn(z, safe, use, labels, opts, tail == "bucket").to(dtype)
        z_k = torch.where(use, z.gather(1, safe).to(dtype), NEG_INF)
    else:
        streamed, z_k, label_logit = shard_stats(z, safe, use, labels, opts, tail == "bucket")
    stats = _row_stats(streamed, z_k, temperature, tail == "bucket")
    keep = torch.ones(n_rows, dtype=torch.bool, device=z.device) if labels is None else labels != opts.ignore_index
    lq = _floored((z_k - stats[:, S_MAX, None]) / temperature, z_k) - stats[:, S_LOGS, None]
    if tail == "bucket" and rest_lp is None:
        # 1 - sum_K p cancels: summed in float64 from the log-probs as given, a (N, K) op, then floored
        rest_lp = rest_log_prob(torch.where(use, lp.to(torch.float64), NEG_INF))
    lp = torch.where(use, lp.to(dtype), NEG_INF)
    zero = torch.zeros(n_rows, dtype=dtype, device=z.device)
    if tail == "truncate":
        live = use & (lq != NEG_INF)
        p = torch.where(live, lp.exp(), 0.0)
        div = (p * torch.where(live, lp - lq, 0.0)).sum(-1)
        rows = torch.where(keep, opts.kd_weight * div, 0.0)
        grad_k = -opts.kd_weight * p
        g_rest, s_sum = zero, grad_k.sum(-1)
    else:
        # categories in ascending id order (AKL's tie order), padding last
        order = torch.where(use, safe, vocab).argsort(dim=-1, stable=True)
        student, teacher = lq.gather(1, order), lp.gather(1, order)
        if tail == "bucket":
            student = torch.cat([student, _rest_log_mass(stats, temperature)[:, None]], dim=1)
            teacher = torch.cat([teacher, rest_lp.to(dtype)[:, None]], dim=1)
        dense = _backend_module(backend)
        cat_opts = opts._replace(temperature=1.0, ce_weight=0.0)
        rows, cat_stats = dense.kd_forward(student, teacher, labels, cat_opts)
        cat_grad = dense.kd_backward(torch.ones_like(rows), student, teacher, labels, cat_stats, cat_opts)
        grad_k = torch.empty_like(lq).scatter_(1, order, cat_grad[:, :k].to(dtype))
        g_rest = cat_grad[:, k].to(dtype) if tail == "bucket" else zero
        s_sum = zero
    rows = rows.to(dtype)
    if opts.ce_weight != 0.0:
        label_ok = (labels >= 0) & (labels < vocab)
        if shard_stats is None:
            picked = z.gather(1, torch.where(label_ok, labels, 0)[:, None])[:, 0].to(dtype)
        else:
            picked = label_logit
        ce = torch.where(label_ok, stats[:, S_MAX] + stats[:, S_LOGS_CE] - picked, float("nan"))
        rows = rows + torch.where(keep, opts.ce_weight * ce, 0.0)
    nan = float("nan")
    rows = torch.where(bad & keep, nan, rows)
    stats[:, S_G_REST] = torch.where(bad, nan, g_rest)
    stats[:, S_S] = torch.where(bad, nan, s_sum)
    return rows, stats, torch.where(bad[:, None], nan, grad_k)


# ------------------------------------------------------------------------------------------------ registered ops


@torch.library.custom_op("kdkernels::sparse_forward", mutates_args=())
def sparse_forward(
    z: torch.Tensor,
    ids: torch.Tensor,
    lp: torch.Tensor,
    rest: torch.Tensor | None,
    labels: torch.Tensor | None,
    params: torch.Tensor,
    divergence: str,
    ignore_index: int,
    tail: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows (N,), stats (N, NUM_SPARSE_STATS), grad_k (N, K))``; ``rest`` ``(N,)`` or None: the teacher's
    log-mass outside K; see :func:`forward_rows`."""
    return forward_rows(z, ids, lp, labels, from_op(params, divergence, ignore_index), tail, backend, rest_lp=rest)


@sparse_forward.register_fake
def _(z, ids, lp, rest, labels, params, divergence, ignore_index, tail, backend):
    dtype = compute_dtype(z)
    n_rows = z.shape[0]
    return (z.new_empty((n_rows,), dtype=dtype), z.new_empty((n_rows, NUM_SPARSE_STATS), dtype=dtype),
            z.new_empty(ids.shape, dtype=dtype))


@torch.library.custom_op("kdkernels::sparse_backward", mutates_args=())
def sparse_backward(
    grad_rows: torch.Tensor,
    z: torch.Tensor,
    ids: torch.Tensor,
    lp: torch.Tensor,
    labels: torch.Tensor | None,
    stats: torch.Tensor,
    grad_k: torch.Tensor,
    params: torch.Tensor,
    divergence: str,
    ignore_index: int,
    tail: str,
    backend: str,
) -> torch.Tensor:
    """``dz`` ``(N, V)`` in ``z``'s dtype from the row-loss gradient ``grad_rows`` ``(N,)``."""
    _, backward_fn = _stats_fn(backend)
    opts = from_op(params, divergence, ignore_index)
    return backward_fn(grad_rows, z, ids, lp, labels, stats, grad_k, opts, tail == "bucket")


@sparse_backward.register_fake
def _(grad_rows, z, ids, lp, labels, stats, grad_k, params, divergence, ignore_index, tail, backend):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    z, ids, lp, _, labels, params, divergence, ignore_index, tail, backend = inputs
    ctx.save_for_backward(z, ids, lp, labels, output[1], output[2], params)
    ctx.options = (divergence, ignore_index, tail, backend)


def _backward(ctx, grad_rows, grad_stats, grad_grad_k):
    if torch.is_grad_enabled():
        raise RuntimeError(SECOND_DERIVATIVE)
    z, ids, lp, labels, stats, grad_k, params = ctx.saved_tensors
    dz = sparse_backward(grad_rows, z, ids, lp, labels, stats, grad_k, params, *ctx.options)
    return dz, None, None, None, None, None, None, None, None, None


sparse_forward.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("kdkernels::topk_teacher", mutates_args=())
def topk_op(t: torch.Tensor, k: int, temperature: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (N, k) int64, lp (N, k) float32)`` of teacher logits ``t`` ``(N, V)``."""
    if backend == "triton":
        from kdkernels.kernels import sparse as kernels

        if k <= kernels.TOPK_KERNEL_MAX_K:
            return kernels.topk(t, k, temperature)
    return torch_topk(t, k, temperature)


@topk_op.register_fake
def _(t, k, temperature, backend):
    return t.new_empty((t.shape[0], k), dtype=torch.int64), t.new_empty((t.shape[0], k), dtype=torch.float32)


def rest_rows(t: torch.Tensor, ids: torch.Tensor, temperature: float, backend: str) -> torch.Tensor:
    """``(N,)`` float32 ``log sum_{j not in ids} softmax(t / T)_j`` of teacher logits ``t`` ``(N, V)`` and distinct ids
    ``(N, k)`` in ``[0, V)``: one streaming pass over the entries outside the ids (the sparse loss's own statistics
    pass: the Triton bitmask kernel or the torch backend's row chunks), then their log-sum against the whole row's,
    which adds the k gathered entries. Exact however small the mass (no ``1 - sum``); ``-inf`` when ``k = V``."""
    dtype = compute_dtype(t)
    stats_fn, _ = _stats_fn(backend)
    use = torch.ones_like(ids, dtype=torch.bool)
    streamed = stats_fn(t, ids, use, None, KDOptions(temperature=temperature), True).to(dtype)
    stats = _row_stats(streamed, t.gather(1, ids).to(dtype), temperature, True)
    return _rest_log_mass(stats, temperature).to(torch.float32)


@torch.library.custom_op("kdkernels::topk_rest", mutates_args=())
def rest_op(t: torch.Tensor, ids: torch.Tensor, temperature: float, backend: str) -> torch.Tensor:
    """:func:`rest_rows` as a registered op."""
    return rest_rows(t, ids, temperature, backend)


@rest_op.register_fake
def _(t, ids, temperature, backend):
    return t.new_empty((t.shape[0],), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ checks


def check_sparse_teacher(student: torch.Tensor, teacher_indices: object, teacher_logprobs: object) -> None:
    """``teacher_indices`` ``(..., K)`` int32/int64 and ``teacher_logprobs`` ``(..., K)`` float, ``K >= 1``, with the
    student's leading shape and device; the log-probs a constant."""
    if not isinstance(teacher_indices, torch.Tensor):
        raise TypeError(f"teacher_indices must be a torch.Tensor, got {type(teacher_indices).__name__}")
    if teacher_indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"teacher_indices must be int32 or int64, got {teacher_indices.dtype}")
    lead = tuple(student.shape[:-1])
    if teacher_indices.dim() < 1 or tuple(teacher_indices.shape[:-1]) != lead or teacher_indices.shape[-1] < 1:
        raise ValueError(f"teacher_indices must have shape (..., K) with K >= 1 and the leading shape {lead} of the "
                         f"student, got {tuple(teacher_indices.shape)}")
    validate.check_logits("teacher_logprobs", teacher_logprobs)
    if teacher_logprobs.shape != teacher_indices.shape:
        raise ValueError(f"teacher_logprobs shape {tuple(teacher_logprobs.shape)} must match teacher_indices shape "
                         f"{tuple(teacher_indices.shape)}")
    for name, x in (("teacher_indices", teacher_indices), ("teacher_logprobs", teacher_logprobs)):
        if x.device != student.device:
            raise ValueError(f"{name} is on {x.device} but the student is on {student.device}")
    if teacher_logprobs.requires_grad:
        raise ValueError("teacher_logprobs requires grad; the teacher is a constant target: pass .detach()")


def check_rest(student: torch.Tensor, teacher_rest_logprob: object) -> None:
    """``teacher_rest_logprob``: None, or a float tensor of the student's leading shape ``(...)`` on its device, a
    constant."""
    if teacher_rest_logprob is None:
        return
    if not isinstance(teacher_rest_logprob, torch.Tensor):
        raise TypeError(f"teacher_rest_logprob must be a torch.Tensor or None, got "
                        f"{type(teacher_rest_logprob).__name__}")
    if teacher_rest_logprob.dtype not in validate.FLOAT_DTYPES:
        raise TypeError(f"teacher_rest_logprob must be a float tensor, got {teacher_rest_logprob.dtype}")
    lead = tuple(student.shape[:-1])
    if tuple(teacher_rest_logprob.shape) != lead:
        raise ValueError(f"teacher_rest_logprob must have the student's leading shape {lead}, got "
                         f"{tuple(teacher_rest_logprob.shape)}")
    if teacher_rest_logprob.device != student.device:
        raise ValueError(f"teacher_rest_logprob is on {teacher_rest_logprob.device} but the student is on "
                         f"{student.device}")
    if teacher_rest_logprob.requires_grad:
        raise ValueError("teacher_rest_logprob requires grad; the teacher is a constant target: pass .detach()")


def check_tail(tail: object, divergence: str) -> None:
    validate.check_choice("tail", tail, TAILS)
    if tail == "truncate" and divergence != "fkl":
        raise ValueError(f"tail='truncate' is defined for divergence='fkl' only, got {divergence!r}")


def sparse_rows(z, ids, lp, labels, opts: KDOptions, tail: str, backend: str, rest=None) -> torch.Tensor:
    """Row losses ``(N,)`` through the registered op, on flat checked inputs (``z`` ``(N, V)``, ``ids``/``lp``
    ``(N, K)``, ``labels`` and ``rest`` ``(N,)`` or None); differentiable w.r.t. ``z``."""
    z = z if z.stride(-1) == 1 else z.contiguous()
    rest = None if rest is None else rest.contiguous()
    rows, _, _ = sparse_forward(z, ids.to(torch.int64).contiguous(), lp.contiguous(), rest, labels, *op_args(opts),
                                tail, backend)
    return rows
