"""Vocabulary-parallel (tensor-parallel) losses, SPEC §8: each rank of a group holds a slice of the vocabulary.

Rank ``r`` of the group holds the student and teacher logits ``z``, ``t`` of ids ``[offset_r, offset_r + V_r)``
(contiguous slices in rank order; ``V_r`` may differ between ranks), so the full ``(N, V)`` rows exist nowhere. The
ranks exchange per-row statistics only, by all-reduce on the group (never the logits), and every rank ends with
the same row losses as the unsharded op (to float32 rounding) and the gradient of its own slice.

The forward (torch ops on the shard, a chunk of rows at a time; the chunks are cut alike on every rank, from the
widest slice) makes, per chunk, with ``M`` the row maximum and ``s`` the row sum over the whole vocabulary:

1. the maxima of ``z`` and ``t`` (all-reduce MAX, 2 numbers per row);
2. ``s_z = sum exp((z - M_z) / T)``, ``s_t`` likewise, and ``s_ce = sum exp(z - M_z)`` for the hard-label term at
   ``T != 1`` (all-reduce SUM, 2 or 3 numbers per row), so that ``lq = (z - M_z) / T - log s_z`` and
   ``lp = (t - M_t) / T - log s_t`` are the global log-probabilities on every slice;
3. AKL only: the radix select of ``akl_select.akl_tail_select`` with its per-level mass histograms summed over the
   group (256 numbers per row per 8-bit level of the teacher's key: 2 levels for 16-bit teachers, 4 for float32, 8
   for float64), then each rank's count of entries equal to the cut's key (an ``(N, world)`` int32 table, each rank
   filling its column) so that the tie rank counts the equal keys of the lower ranks first;
4. the slice's partial row sums of the divergence, and the label's centred logit ``z_label - M_z`` from the rank
   whose slice holds it (0 elsewhere), in one all-reduce SUM (:data:`PARTIAL_SUMS` numbers per row, +1 with CE).

The row loss is then formed from the global sums alike on every rank. The statistics (``layout.py``) hold the
global values, so the backward is the backend's own gradient pass on the slice (``torch_backend.kd_backward``, or
the Triton ``grad_kernel`` with ``backend="triton"``) run with ``ce_weight = 0``; the hard-label gradient
``g ce_weight (softmax(z) - onehot(label))`` of the slice is added with torch ops (its label is global). The
backward sends nothing. Before the passes, one all-reduce of a ``(world, 4)`` int64 table (each rank's ``V_r``,
``N``, divergence and whether it has labels; 32 bytes per rank, whatever ``N``; :func:`shard_layout` takes further
columns) gives the offsets and refuses inconsistent shards with a ``ValueError`` on every rank.

``sparse_kd_loss`` (SPEC §7) takes the same path through :func:`sparse_stats` and ``sparse.forward_rows``, and
``fused_linear_kd_loss`` runs :func:`forward` and :func:`backward` on each chunk of its slice's logits.

The all-reduces go through :class:`GroupReducer` (``torch.distributed.all_reduce`` on the group given), on the
logits' device: gloo on CPU tensors, NCCL on CUDA tensors. Reading the shape table is a host synchronisation, and
the collectives are not traced by ``torch.compile`` (the vocabulary-parallel path runs eagerly).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from kdkernels.torch_ops import layout, sparse, torch_backend
from kdkernels.torch_ops.akl_select import akl_tail_select
from kdkernels.torch_ops.functional import reduce_rows
from kdkernels.torch_ops.op import SECOND_DERIVATIVE, _backend_module
from kdkernels.torch_ops.options import KDOptions, from_op, op_args
from kdkernels.torch_ops.reference import compute_dtype, head_tail_ratios
from kdkernels.torch_ops.torch_backend import (
    BASELINES,
    NEG_INF,
    _log_probs,
    _log_sum,
    _scaled,
    baseline_sums,
    todi_sums,
)

# Numbers per row of the last all-reduce (step 4), by divergence: fkl (P, F), rkl (Q, R), todi (S_a - S_b, loss),
# akl (P, F, Q, R, g_head, g_tail), the baselines (Q_G, loss); the hard-label term adds the label's logit.
PARTIAL_SUMS = {"fkl": 2, "rkl": 2, "todi": 2, "akl": 6, "sfkl": 2, "srkl": 2, "jsd": 2, "tvd": 2}


def bytes_per_row(divergence: str, world_size: int, *, teacher_bytes: int = 2, hard_label: bool = False,
                  temperature_one: bool = True, stat_bytes: int = 4) -> int:
    """Bytes of the tensors each rank all-reduces per row in a forward (the backward sends none).

    Two maxima and two sums, the :data:`PARTIAL_SUMS`, for a ``hard_label`` term (``ce_weight != 0``) the label's
    logit and, at ``T != 1`` (not ``temperature_one``), its own sum; for AKL 256 numbers per 8-bit level (one level
    per byte of the teacher's dtype, ``teacher_bytes``) and ``world_size`` int32 tie counts. ``stat_bytes``: 4
    (float32 statistics) or 8 (float64 inputs).
    """
    numbers = 4 + PARTIAL_SUMS[divergence] + (hard_label + (hard_label and not temperature_one))
    if divergence != "akl":
        return numbers * stat_bytes
    return (numbers + 256 * teacher_bytes) * stat_bytes + 4 * world_size


def sparse_bytes_per_row(k: int, *, hard_label: bool = False, temperature_one: bool = True,
                         stat_bytes: int = 4) -> int:
    """Bytes each rank all-reduces per row in a forward of ``sparse_kd_loss`` with ``K = k`` teacher ids: the
    maximum outside K and the K logits, the sum, and for a ``hard_label`` term the label's logit and, at ``T != 1``,
    its own sum (:func:`sparse_stats`)."""
    return (2 + k + hard_label + (hard_label and not temperature_one)) * stat_bytes


class GroupReducer:
    """The collectives of the vocabulary-parallel path: in-place all-reduces on ``group`` (its rank and size)."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def sum_(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the group, in place."""
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def max_(self, x: torch.Tensor) -> torch.Tensor:
        """``x``'s elementwise maximum over the group, in place."""
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def count_before(self, count: torch.Tensor) -> torch.Tensor:
        """``(rows,)`` int32: the sum of ``count`` ``(rows,)`` int32 over the lower ranks of the group, from an
        ``(rows, world)`` table where each rank fills its own column."""
        table = count.new_zeros(count.shape[0], self.world_size)
        table[:, self.rank] = count
        return self.sum_(table)[:, :self.rank].sum(1, dtype=torch.int32)


class Shard(NamedTuple):
    """This rank's slice: ids ``[offset, offset + width)`` of a vocabulary of ``vocab``; ``widest``: the largest
    ``V_r`` of the group (the chunks of rows are cut from it, alike on every rank)."""

    offset: int
    width: int
    vocab: int
    widest: int


def check_group(process_group: object, backend: str) -> None:
    """``process_group`` a ``torch.distributed.ProcessGroup`` of an initialised default group; not the reference."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group is given but torch.distributed is not initialized (init_process_group)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got {type(process_group).__name__}")
    if backend == "reference":
        raise ValueError("backend='reference' does not take process_group: it needs the full (N, V) logits")


def shard_layout(reducer: GroupReducer, rows: int, width: int, device: torch.device, divergence: str,
                 with_labels: bool, **agree: int) -> Shard:
    """The :class:`Shard` of this rank's ``(rows, width)`` slices, from one all-reduce of a ``(world, 4 + k)`` int64
    table of every rank's ``(width, rows, divergence code, with_labels, *agree.values())`` (``agree``: further
    integers that must be the same on every rank); a ``ValueError`` (on every rank) where the ranks disagree."""
    values = [width, rows, layout.DIVERGENCE_CODES[divergence], with_labels, *agree.values()]
    table = torch.zeros(reducer.world_size, len(values), dtype=torch.int64, device=device)
    table[reducer.rank] = torch.tensor(values, dtype=torch.int64)
    widths, *columns = reducer.sum_(table).cpu().T.tolist()
    names = ["student_logits rows (N)", "divergence", "labels (given or None)", *agree]
    for name, column in zip(names, columns):
        if len(set(column)) != 1:
            raise ValueError(f"process_group: every rank must pass the same {name}; got {column} by rank")
    return Shard(sum(widths[:reducer.rank]), width, sum(widths), max(widths))


def forward_chunk(z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, opts: KDOptions, shard: Shard,
                  reducer: GroupReducer):
    """Row losses ``(rows,)`` of a chunk of slices ``z``, ``t`` ``(rows, V_r)`` and their global statistics
    ``{column of layout.py: (rows,)}``; steps 1-4 of the module docstring, with the all-reduces on ``reducer``."""
    divergence, temperature, ce_weight = opts.divergence, opts.temperature, opts.ce_weight
    with_ce = labels is not None and ce_weight != 0.0
    dtype = compute_dtype(z, t)
    zf, tf = z.to(dtype), t.to(dtype)
    maxima = reducer.max_(torch.stack([zf.amax(-1), tf.amax(-1)], 1))
    m_z, m_t = torch.where(maxima == NEG_INF, 0.0, maxima).unbind(1)  # 0 for an all -inf row (as _row_max)
    a = _scaled(zf - m_z[:, None], temperature)
    b = _scaled(tf - m_t[:, None], temperature)
    raw = a if temperature == 1.0 else zf - m_z[:, None]  # z - M_z, for the hard-label term
    sums = [a.exp().sum(-1), b.exp().sum(-1)]
    if with_ce and temperature != 1.0:
        sums.append(raw.exp().sum(-1))
    sums = reducer.sum_(torch.stack(sums, 1))
    log_s_z, log_s_t = _log_sum(sums[:, 0]), _log_sum(sums[:, 1])
    lq, lp = a - log_s_z[:, None], b - log_s_t[:, None]
    live = torch.minimum(a, b) != NEG_INF  # neither is -inf
    parts = []
    if divergence in ("fkl", "rkl", "akl"):
        q, p = lq.exp(), lp.exp()
        d = torch.where(live, lq - lp, 0.0)
    if divergence in ("fkl", "akl"):
        parts += [torch.where(live, p, 0.0).sum(-1), -(p * d).sum(-1)]  # P, F
    if divergence in ("rkl", "akl"):
        parts += [torch.where(live, q, 0.0).sum(-1), (q * d).sum(-1)]  # Q, R
    if divergence == "akl":
        tail = akl_tail_select(t, p, opts.akl_alpha, reducer)
        gap = (p - q).abs()
        parts += [torch.where(tail, 0.0, gap).sum(-1), torch.where(tail, gap, 0.0).sum(-1)]
    if divergence == "todi":
        parts += todi_sums(lq, lp, live, opts.todi_beta)
    if divergence in BASELINES:
        parts += baseline_sums(lq, lp, live, opts)
    if with_ce:
        local = labels - shard.offset
        here = (local >= 0) & (local < shard.width)
        picked = raw.gather(-1, torch.where(here, local, 0)[:, None])[:, 0]
        parts.append(torch.where(here, picked, 0.0))
    totals = iter(reducer.sum_(torch.stack(parts, 1)).unbind(1))
    cols = {layout.MAX_Z: m_z, layout.LOGS_Z: log_s_z, layout.MAX_T: m_t, layout.LOGS_T: log_s_t}
    if divergence in ("fkl", "akl"):
        cols[layout.MASS_P] = next(totals)
        div = cols[layout.FKL] = next(totals)
    if divergence in ("rkl", "akl"):
        cols[layout.MASS_Q] = next(totals)
        div = cols[layout.RKL] = next(totals)
    if divergence == "akl":
        cols[layout.R_HEAD], cols[layout.R_TAIL] = head_tail_ratios(next(totals), next(totals))
        div = cols[layout.R_HEAD] * cols[layout.FKL] + cols[layout.R_TAIL] * cols[layout.RKL]
    if divergence == "todi":
        cols[layout.TODI_S] = next(totals)
        div = next(totals)
    if divergence in BASELINES:
        cols[layout.Q_G] = next(totals)
        div = next(totals)
    row_loss = opts.kd_weight * div
    if labels is not None:
        if with_ce:
            # s_z at T = 1; log 0 = -inf for a student row of all -inf: CE NaN there, as unsharded
            log_s_ce = sums[:, 0 if temperature == 1.0 else 2].log()
            valid = (labels >= 0) & (labels < shard.vocab)
            cols[layout.MAX_CE], cols[layout.LOGS_CE] = m_z, log_s_ce
            cols[layout.CE] = torch.where(valid, log_s_ce - next(totals), float("nan"))
            row_loss = row_loss + ce_weight * cols[layout.CE]
        row_loss = torch.where(labels != opts.ignore_index, row_loss, 0.0)
    return row_loss, cols


def _row_chunks(n_rows: int, shard: Shard, divergence: str):
    """``[lo, hi)`` chunks of rows, alike on every rank (sized by the widest slice, as the torch backend's)."""
    step = torch_backend.chunk_rows(shard.widest, akl_select=divergence == "akl")
    for lo in range(0, n_rows, step):
        yield lo, min(lo + step, n_rows)


def forward(z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, opts: KDOptions, shard: Shard,
            reducer: GroupReducer) -> tuple[torch.Tensor, torch.Tensor]:
    """Row losses ``(N,)`` and global statistics ``(N, NUM_STATS)`` (NaN in unused columns) of the slices ``z``,
    ``t`` ``(N, V_r)``, in float32 (float64 when an input is)."""
    dtype = compute_dtype(z, t)
    loss = torch.zeros(z.shape[0], dtype=dtype, device=z.device)
    stats = torch.full((z.shape[0], layout.NUM_STATS), float("nan"), dtype=dtype, device=z.device)
    for lo, hi in _row_chunks(z.shape[0], shard, opts.divergence):
        lab = None if labels is None else labels[lo:hi]
        loss[lo:hi], cols = forward_chunk(z[lo:hi], t[lo:hi], lab, opts, shard, reducer)
        for col, value in cols.items():
            stats[lo:hi, col] = value
    if labels is not None:  # ignored rows' padding may be NaN: the Triton backward scales their stats by 0
        stats = torch.where((labels != opts.ignore_index)[:, None], stats, 0.0)
    return loss, stats


def add_ce_grad(dz: torch.Tensor, grad_rows: torch.Tensor, z: torch.Tensor, labels: torch.Tensor,
                row_max: torch.Tensor, log_sum: torch.Tensor, opts: KDOptions, shard: Shard) -> None:
    """Add the hard-label gradient ``g ce_weight (softmax(z)_j - [offset + j == label])`` of the slice to ``dz``
    ``(N, V_r)`` in place, a chunk of rows at a time: ``softmax`` from the global row maximum ``row_max`` and
    ``log_sum = log sum exp(z - row_max)`` ``(N,)``; NaN rows where the label is outside ``[0, V)``, 0 at ignored
    rows."""
    dtype = compute_dtype(z, log_sum)
    ids = torch.arange(shard.offset, shard.offset + shard.width, device=z.device)
    for lo, hi in _row_chunks(z.shape[0], shard, opts.divergence):
        lab = labels[lo:hi]
        lq = _log_probs(z[lo:hi].to(dtype), row_max[lo:hi].to(dtype), log_sum[lo:hi].to(dtype), 1.0)
        valid = (lab >= 0) & (lab < shard.vocab)
        soft = torch.where(valid[:, None], lq.exp() - (ids[None, :] == lab[:, None]).to(dtype), float("nan"))
        g = grad_rows[lo:hi].to(dtype)[:, None] * opts.ce_weight
        ce = torch.where((lab != opts.ignore_index)[:, None], g * soft, 0.0)
        dz[lo:hi] = (dz[lo:hi].to(dtype) + ce).to(dz.dtype)


def backward(grad_rows: torch.Tensor, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
             stats: torch.Tensor, opts: KDOptions, shard: Shard, backend: str) -> torch.Tensor:
    """The gradient ``(N, V_r)`` of the slice ``z`` from ``grad_rows`` ``(N,)`` and the global ``stats`` of
    :func:`forward`: the backend's gradient pass without the hard-label term (its label is a global id), then
    :func:`add_ce_grad`. Sends nothing."""
    grad_rows = grad_rows.contiguous()
    dz = _backend_module(backend).kd_backward(grad_rows, z, t, labels, stats, opts._replace(ce_weight=0.0))
    if labels is not None and opts.ce_weight != 0.0:
        add_ce_grad(dz, grad_rows, z, labels, stats[:, layout.MAX_CE], stats[:, layout.LOGS_CE], opts, shard)
    return dz


class _VocabParallelRows(torch.autograd.Function):
    """Row losses ``(N,)`` of the slices; the backward writes the slice's gradient and sends nothing."""

    @staticmethod
    def forward(ctx, z, t, labels, opts: KDOptions, backend: str, shard: Shard, reducer: GroupReducer):
        loss, stats = forward(z, t, labels, opts, shard, reducer)
        ctx.save_for_backward(z, t, labels, stats)
        ctx.opts, ctx.backend, ctx.shard = opts, backend, shard
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        if torch.is_grad_enabled():
            raise RuntimeError(SECOND_DERIVATIVE)
        z, t, labels, stats = ctx.saved_tensors
        dz = backward(grad_rows, z, t, labels, stats, ctx.opts, ctx.shard, ctx.backend)
        return dz, None, None, None, None, None, None


def vocab_parallel_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                        opts: KDOptions, backend: str, process_group) -> torch.Tensor:
    """``kd_loss`` of the unsharded logits, from this rank's slices ``(..., V_r)`` (SPEC §8); arguments checked by
    the caller, ``labels`` ``(...)`` global ids. Returns the reduced loss, the same on every rank."""
    reducer = GroupReducer(process_group)
    width = student_logits.shape[-1]
    z = student_logits.reshape(-1, width)
    t = teacher_logits.reshape(-1, width)
    z = z if z.stride(-1) == 1 else z.contiguous()
    t = t if t.stride(-1) == 1 else t.contiguous()
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    shard = shard_layout(reducer, z.shape[0], width, z.device, opts.divergence, flat_labels is not None)
    rows = _VocabParallelRows.apply(z, t, flat_labels, from_op(*op_args(opts)), backend, shard, reducer)
    return reduce_rows(rows, flat_labels, opts.ignore_index, opts.reduction, student_logits.shape[:-1])


def sparse_stats(z: torch.Tensor, ids: torch.Tensor, use: torch.Tensor, labels: torch.Tensor | None,
                 opts: KDOptions, rest: bool, shard: Shard, reducer: GroupReducer):
    """The sparse op's streaming statistics (``sparse.R_MAX``, ``R_LOGS``, ``R_LOGS_CE``: ``(N, 3)``) of the whole
    vocabulary, the ``K`` gathered logits ``(N, K)`` (``-inf`` where not ``use``) and, with a hard-label term, the
    label's raw logit ``(N,)``, from this rank's slice ``z`` ``(N, V_r)`` and the global ``ids`` ``(N, K)``.

    Per chunk of rows: one all-reduce MAX of ``(1 + K)`` numbers per row (the maximum over the entries outside K,
    or over all entries without ``rest``, and the K logits, each from the rank that holds it), then one all-reduce
    SUM of ``sum exp((x - max) / T)``, its ``T = 1`` twin at ``T != 1`` and the label's logit (1 to 3 numbers).
    """
    dtype, temperature = compute_dtype(z), opts.temperature
    with_ce = labels is not None and opts.ce_weight != 0.0
    local = ids - shard.offset
    here = use & (local >= 0) & (local < shard.width)
    local = torch.where(here, local, 0)
    streamed = torch.zeros((z.shape[0], sparse.NUM_STREAM_STATS), dtype=dtype, device=z.device)
    z_k = torch.empty(ids.shape, dtype=dtype, device=z.device)
    label_logit = torch.empty(z.shape[0], dtype=dtype, device=z.device) if with_ce else None
    for lo, hi in _row_chunks(z.shape[0], shard, "fkl"):
        x = z[lo:hi].to(dtype)
        x_rest = torch.where(sparse._in_k(local[lo:hi], here[lo:hi], shard.width), NEG_INF, x) if rest else x
        gathered = torch.where(here[lo:hi], x.gather(1, local[lo:hi]), NEG_INF)
        maxima = reducer.max_(torch.cat([x_rest.amax(-1)[:, None], gathered], 1))
        z_k[lo:hi] = maxima[:, 1:]
        m = torch.where(maxima[:, 0] == NEG_INF, 0.0, maxima[:, 0])
        centred = x_rest - m[:, None]
        sums = [_scaled(centred, temperature).exp().sum(-1)]
        if with_ce:
            if temperature != 1.0:
                sums.append(centred.exp().sum(-1))
            lab = labels[lo:hi] - shard.offset
            held = (lab >= 0) & (lab < shard.width)
            sums.append(torch.where(held, x.gather(1, torch.where(held, lab, 0)[:, None])[:, 0], 0.0))
        sums = reducer.sum_(torch.stack(sums, 1))
        streamed[lo:hi, sparse.R_MAX] = m
        streamed[lo:hi, sparse.R_LOGS] = sums[:, 0].log()
        if with_ce:
            label_logit[lo:hi] = sums[:, -1]
            if temperature != 1.0:
                streamed[lo:hi, sparse.R_LOGS_CE] = sums[:, 1].log()
    return streamed, z_k, label_logit


class _VocabParallelSparseRows(torch.autograd.Function):
    """Row losses ``(N,)`` of a sparse teacher against this rank's student slice; the backward is the sparse
    backend's gradient pass on the slice (ids shifted to the slice: those outside are never written) without the
    hard-label term, then :func:`add_ce_grad`. Sends nothing."""

    @staticmethod
    def forward(ctx, z, ids, lp, labels, opts: KDOptions, tail: str, backend: str, shard: Shard,
                reducer: GroupReducer, rest_lp):
        rows, stats, grad_k = sparse.forward_rows(z, ids, lp, labels, opts, tail, backend, (shard, reducer), rest_lp)
        ctx.save_for_backward(z, ids, lp, labels, stats, grad_k)
        ctx.opts, ctx.tail, ctx.backend, ctx.shard = opts, tail, backend, shard
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        if torch.is_grad_enabled():
            raise RuntimeError(SECOND_DERIVATIVE)
        z, ids, lp, labels, stats, grad_k = ctx.saved_tensors
        opts, shard, grad_rows = ctx.opts, ctx.shard, grad_rows.contiguous()
        _, backward_fn = sparse._stats_fn(ctx.backend)
        dz = backward_fn(grad_rows, z, ids - shard.offset, lp, labels, stats, grad_k, opts._replace(ce_weight=0.0),
                         ctx.tail == "bucket")
        if labels is not None and opts.ce_weight != 0.0:
            add_ce_grad(dz, grad_rows, z, labels, stats[:, sparse.S_MAX], stats[:, sparse.S_LOGS_CE], opts, shard)
        return dz, None, None, None, None, None, None, None, None, None


def vocab_parallel_sparse_loss(student_logits: torch.Tensor, teacher_indices: torch.Tensor,
                               teacher_logprobs: torch.Tensor, labels: torch.Tensor | None, opts: KDOptions,
                               tail: str, backend: str, process_group,
                               teacher_rest_logprob: torch.Tensor | None = None) -> torch.Tensor:
    """``sparse_kd_loss`` of the unsharded student from this rank's slice ``(..., V_r)`` and the global top-k
    teacher ``(..., K)`` (SPEC §7-8), with the teacher's log-mass outside K ``(...)`` when given (bucket tail);
    arguments checked by the caller. The same loss on every rank."""
    reducer = GroupReducer(process_group)
    width, k = student_logits.shape[-1], teacher_indices.shape[-1]
    z = student_logits.reshape(-1, width)
    z = z if z.stride(-1) == 1 else z.contiguous()
    ids = teacher_indices.reshape(-1, k).to(torch.int64).contiguous()
    lp = teacher_logprobs.reshape(-1, k).contiguous()
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    shard = shard_layout(reducer, z.shape[0], width, z.device, opts.divergence, flat_labels is not None,
                         teacher_k=k, tail=sparse.TAILS.index(tail))
    rest = None if teacher_rest_logprob is None or tail != "bucket" else teacher_rest_logprob.reshape(-1)
    rows = _VocabParallelSparseRows.apply(z, ids, lp, flat_labels, from_op(*op_args(opts)), tail, backend, shard,
                                          reducer, rest)
    return reduce_rows(rows, flat_labels, opts.ignore_index, opts.reduction, student_logits.shape[:-1])
