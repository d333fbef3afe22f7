"""Vocabulary-parallel (tensor-parallel) losses, SPEC §8: each rank of a group holds a slice of the vocabulary.

Rank ``r`` of the group holds the student and teacher logits ``z``, ``t`` of ids ``[offset_r, offset_r + V_r)``
(contiguous slices in rank order; ``V_r`` may differ between ranks, and may be 0), so the full ``(N, V)`` rows exist
nowhere. The ranks exchange per-row statistics only (never the logits), and every rank ends with the same row
losses as the unsharded op (to float32 rounding) and the gradient of its own slice.

**Fused shards.** Each rank runs the backend's own passes on its slice (the Triton kernels, or the torch backend's
compiled chunk functions: ``op.shard_stats``, ``op.shard_finish``) and combines per-row statistics:

1. ``shard_stats``: the slice's own maxima ``m_r``, log-sums ``log s_r`` (``s_r = sum exp((x - m_r) / T)``), whether
   it holds an entry above ``-inf`` (``FOUND_*``: an empty slice is not a slice whose maximum is 0), and for fkl
   (rkl) its own ``P_r``, ``F_r`` (``Q_r``, ``R_r``) of the slice's softmaxes;
2. one all-reduce MAX of the two maxima ``M``; with ``u_r = (m_r - M) / T + log s_r`` (``-inf`` for an empty slice),
   one all-reduce SUM of ``s = sum_r exp(u_r)`` for ``z`` and ``t`` (and the student's at ``T = 1`` for the CE term
   at ``T != 1``), the label's raw logit from the rank that holds it, and fkl's
   ``sum_r e^{u_t,r} P_r`` and ``A = sum_r e^{u_t,r} (F_r + (u_t,r - u_z,r) P_r)``, so that
   ``P = sum_r e^{u_t,r} P_r / s_t`` and ``F = A / s_t - P (log s_t - log s_z)`` (rkl alike, ``z`` and ``t``
   swapped): the slice's ``p = e^{u_t,r} p_r / s_t`` and ``log p - log q`` moves by ``(u_t,r - log s_t) -
   (u_z,r - log s_z)``;
3. todi, sfkl, srkl, jsd, tvd: ``shard_finish``, the last pass on the slice with the global maxima and log-sums,
   gives the slice's part of the loss and of ``TODI_S`` / ``Q_G`` (sums over entries), summed by one all-reduce;
4. AKL: the global log-probabilities of the slice (torch ops, a chunk of rows at a time), its ``P``, ``F``, ``Q``,
   ``R``, the radix select of ``akl_select.akl_tail_select`` with its per-level mass histograms summed over the group
   (256 numbers per row per 8-bit level of the teacher's key: 2 levels for 16-bit teachers, 4 for float32, 8 for
   float64) and each rank's count of keys equal to the cut (an ``(N, world)`` int32 table), then the head and tail
   gaps: one all-reduce SUM of those six sums. On the CPU each chunk runs through ``torch.compile``, its
   collectives inside (``torch_backend._run``); on a GPU these are eager torch ops.

The statistics (``layout.py``) then hold the global values, so the backward is the backend's own gradient pass on
the slice (``op.kd_backward``) with ``ce_weight = 0``; the hard-label gradient ``g ce_weight (softmax(z) -
onehot(label))`` of the slice is added with torch ops (its label is global). The backward sends nothing.

**Ranges.** ``vocab_range=(start, end, V)`` gives the slice explicitly: nothing is read back to the host and the
collectives (``torch.distributed._functional_collectives``) are traced by ``torch.compile``, so a compiled step
captures the loss whole. Without it, one all-reduce of a ``(world, 4 + k)`` int64 table (each rank's ``V_r``,
``N``, divergence and whether it has labels, and further integers that must agree; 32 bytes per rank) finds the
offsets and refuses inconsistent shards with a ``ValueError`` on every rank: a validation mode, with one host
synchronisation. ``dtensor.py`` derives the group and range of a ``DTensor``.

``sparse_kd_loss`` (SPEC §7) takes the same layout through :func:`sparse_stats` (torch ops: the maximum outside
the top-k, the K logits from the ranks that hold them, one sum) and ``sparse_ops.forward_rows``;
``fused_linear_kd_loss`` runs :func:`forward` and :func:`backward` on each chunk of its slice's logits.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

from kdkernels.torch_ops import layout, sparse_ops, torch_backend
from kdkernels.torch_ops.akl_select import akl_tail_select
from kdkernels.torch_ops.op import SECOND_DERIVATIVE, kd_backward, shard_finish, shard_stats
from kdkernels.torch_ops.options import KDOptions, canonical, op_args
from kdkernels.torch_ops.reference import compute_dtype, head_tail_ratios
from kdkernels.torch_ops.rows import flat_labels, flat_rows, reduce_rows
from kdkernels.torch_ops.torch_backend import NEG_INF, _log_probs, _log_sum, _scaled

# Numbers per row of the sums that follow the maxima and the totals ``s_z``, ``s_t``, by divergence: fkl (P, F), rkl
# (Q, R), todi (S_a - S_b, loss), akl (P, F, Q, R, g_head, g_tail), the baselines (Q_G, loss); the hard-label term
# adds the label's logit.
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


def all_reduce(x: torch.Tensor, op: str, group) -> torch.Tensor:
    """``x`` reduced (``op``: ``"sum"`` or ``"max"``) over ``group``, as a new plain tensor (a functional
    collective, traced by ``torch.compile``, waited for at once: stream order on CUDA, no host synchronisation);
    every collective of this module goes through here."""
    return funcol.wait_tensor(funcol.all_reduce(x, op, group))


class GroupReducer:
    """The collectives of the vocabulary-parallel path on ``group`` (a ``ProcessGroup``), with its rank and size."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the group."""
        return all_reduce(x, "sum", self.group)

    def max(self, x: torch.Tensor) -> torch.Tensor:
        """``x``'s elementwise maximum over the group."""
        return all_reduce(x, "max", self.group)

    def count_before(self, count: torch.Tensor) -> torch.Tensor:
        """``(rows,)`` int32: the sum of ``count`` ``(rows,)`` int32 over the lower ranks of the group, from an
        ``(rows, world)`` table where each rank fills its own column."""
        mine = torch.arange(self.world_size, device=count.device) == self.rank
        table = self.sum(count[:, None] * mine.to(count.dtype))
        return table[:, :self.rank].sum(1, dtype=torch.int32)


class Shard(NamedTuple):
    """This rank's slice: ids ``[offset, offset + width)`` of a vocabulary of ``vocab``, over ``world`` ranks."""

    offset: int
    width: int
    vocab: int
    world: int


def check_group(process_group: object, backend: str) -> None:
    """``process_group`` a ``torch.distributed.ProcessGroup`` of an initialised default group; not the reference."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group is given but torch.distributed is not initialized (init_process_group)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got {type(process_group).__name__}")
    if backend == "reference":
        raise ValueError("backend='reference' does not take process_group: it needs the full (N, V) logits")


def range_shard(vocab_range: object, width: int, world: int) -> Shard:
    """The :class:`Shard` of ``vocab_range = (start, end, V)`` for a slice of ``width`` entries; checked locally,
    nothing is sent."""
    if not isinstance(vocab_range, (tuple, list)) or len(vocab_range) != 3 or any(
            isinstance(x, bool) or not isinstance(x, int) for x in vocab_range):
        raise TypeError(f"vocab_range must be a tuple of three ints (start, end, vocab_size), got {vocab_range!r}")
    start, end, vocab = vocab_range
    if not 0 <= start <= end <= vocab:
        raise ValueError(f"vocab_range must satisfy 0 <= start <= end <= vocab_size, got {tuple(vocab_range)}")
    if end - start != width:
        raise ValueError(f"vocab_range {tuple(vocab_range)} spans {end - start} ids but the logits' last dimension "
                         f"is {width}")
    return Shard(start, width, vocab, world)


def table_shard(reducer: GroupReducer, rows: int, width: int, device: torch.device, divergence: str,
                with_labels: bool, **agree: int) -> Shard:
    """The :class:`Shard` of this rank's ``(rows, width)`` slices, from one all-reduce of a ``(world, 4 + k)`` int64
    table of every rank's ``(width, rows, divergence code, with_labels, *agree.values())`` (``agree``: further
    integers that must be the same on every rank); a ``ValueError`` (on every rank) where the ranks disagree. Reads
    the table back to the host: a synchronisation (``vocab_range`` avoids it)."""
    values = [width, rows, layout.DIVERGENCE_CODES[divergence], with_labels, *agree.values()]
    mine = torch.arange(reducer.world_size, device=device)[:, None] == reducer.rank
    table = reducer.sum(mine * torch.tensor(values, dtype=torch.int64, device=device))
    widths, *columns = table.cpu().T.tolist()
    names = ["student_logits rows (N)", "divergence", "labels (given or None)", *agree]
    for name, column in zip(names, columns):
        if len(set(column)) != 1:
            raise ValueError(f"process_group: every rank must pass the same {name}; got {column} by rank")
    return Shard(sum(widths[:reducer.rank]), width, sum(widths), reducer.world_size)


def layout_of(process_group, vocab_range, backend: str, rows: int, width: int, device: torch.device,
              divergence: str, with_labels: bool, **agree: int) -> tuple[Shard, GroupReducer]:
    """``(Shard, GroupReducer)`` of this rank's ``(rows, width)`` slices: from ``vocab_range`` when given
    (:func:`range_shard`), else from the shape table (:func:`table_shard`, checking ``agree`` too)."""
    check_group(process_group, backend)
    reducer = GroupReducer(process_group)
    if vocab_range is not None:
        return range_shard(vocab_range, width, reducer.world_size), reducer
    return table_shard(reducer, rows, width, device, divergence, with_labels, **agree), reducer


def _row_chunks(n_rows: int, shard: Shard):
    """``[lo, hi)`` chunks of rows for the passes with collectives inside (AKL's select, the sparse statistics):
    alike on every rank, as they are sized by the vocabulary and the group's size only."""
    step = torch_backend.chunk_rows(-(-shard.vocab // shard.world), akl_select=True)
    for lo in range(0, n_rows, step):
        yield lo, min(lo + step, n_rows)


def _label_logit(x: torch.Tensor, labels: torch.Tensor, shard: Shard) -> torch.Tensor:
    """``(rows,)``: the raw logit ``x[label]`` where this rank holds the (global) label, 0 elsewhere."""
    local = labels - shard.offset
    here = (local >= 0) & (local < shard.width)
    if shard.width == 0:
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    return torch.where(here, x.gather(1, torch.where(here, local, 0)[:, None])[:, 0], 0.0)


def _combine(local: torch.Tensor, extra: list[torch.Tensor], opts: KDOptions, with_ce: bool, reducer: GroupReducer):
    """Step 2 of the module docstring: ``(cols, ce_sum, extra)`` with ``cols`` the global ``MAX_*``, ``LOGS_*``,
    ``FOUND_*``, ``MASS_*``, ``FKL`` / ``RKL`` (``{column: (rows,)}``), ``ce_sum`` the student's sum at ``T = 1``
    (``with_ce``; else None) and ``extra`` the ``extra`` per-row values ``(rows,)`` summed alongside, in order."""
    divergence, temperature = opts.divergence, opts.temperature
    found_z, found_t = local[:, layout.FOUND_Z] != 0, local[:, layout.FOUND_T] != 0
    m_z, m_t = local[:, layout.MAX_Z], local[:, layout.MAX_T]
    maxima = reducer.max(torch.stack([torch.where(found_z, m_z, NEG_INF), torch.where(found_t, m_t, NEG_INF)], 1))
    maxima = torch.where(maxima == NEG_INF, 0.0, maxima)  # 0 for a row with no entry above -inf anywhere
    big_z, big_t = maxima.unbind(1)
    u_z = torch.where(found_z, _scaled(m_z - big_z, temperature) + local[:, layout.LOGS_Z], NEG_INF)
    u_t = torch.where(found_t, _scaled(m_t - big_t, temperature) + local[:, layout.LOGS_T], NEG_INF)
    e_z, e_t = u_z.exp(), u_t.exp()
    both = found_z & found_t  # where either is empty, the slice has no live entry: its P_r, F_r, ... are 0
    parts = [e_z, e_t]
    if divergence == "fkl":
        mass = local[:, layout.MASS_P]
        parts += [e_t * mass, torch.where(both, e_t * (local[:, layout.FKL] + (u_t - u_z) * mass), 0.0)]
    if divergence == "rkl":
        mass = local[:, layout.MASS_Q]
        parts += [e_z * mass, torch.where(both, e_z * (local[:, layout.RKL] + (u_z - u_t) * mass), 0.0)]
    if with_ce and temperature != 1.0:
        parts.append(torch.where(found_z, m_z - big_z + local[:, layout.LOGS_CE], NEG_INF).exp())
    totals = iter(reducer.sum(torch.stack(parts + extra, 1)).unbind(1))
    s_z, s_t = next(totals), next(totals)
    log_s_z, log_s_t = _log_sum(s_z), _log_sum(s_t)
    cols = {layout.MAX_Z: big_z, layout.LOGS_Z: log_s_z, layout.MAX_T: big_t, layout.LOGS_T: log_s_t,
            layout.FOUND_Z: (s_z != 0).to(s_z.dtype), layout.FOUND_T: (s_t != 0).to(s_t.dtype)}
    if divergence in ("fkl", "rkl"):
        own, other = (s_t, log_s_t - log_s_z) if divergence == "fkl" else (s_z, log_s_z - log_s_t)
        raw, moved = next(totals), next(totals)
        mass = torch.where(raw == 0, 0.0, raw / own)
        cols[layout.MASS_P if divergence == "fkl" else layout.MASS_Q] = mass
        cols[layout.FKL if divergence == "fkl" else layout.RKL] = torch.where(raw == 0, 0.0, moved / own - mass * other)
    ce_sum = (s_z if temperature == 1.0 else next(totals)) if with_ce else None
    return cols, ce_sum, list(totals)


def _akl_chunk(z, t, stats, opts: KDOptions, reducer: GroupReducer) -> torch.Tensor:
    """``(rows, 6)``: the slice's part of AKL's ``P``, ``F``, ``Q``, ``R``, head gap and tail gap for a chunk of rows,
    from the global statistics; its cut by the radix select over the group (collectives inside)."""
    dtype = stats.dtype
    lq = _log_probs(z.to(dtype), stats[:, layout.MAX_Z], stats[:, layout.LOGS_Z], opts.temperature)
    lp = _log_probs(t.to(dtype), stats[:, layout.MAX_T], stats[:, layout.LOGS_T], opts.temperature)
    q, p = lq.exp(), lp.exp()
    live = torch.minimum(lq, lp) != NEG_INF
    d = torch.where(live, lq - lp, 0.0)
    tail = akl_tail_select(t, p, opts.akl_alpha, reducer)
    gap = (p - q).abs()
    return torch.stack([torch.where(live, p, 0.0).sum(-1), -(p * d).sum(-1), torch.where(live, q, 0.0).sum(-1),
                        (q * d).sum(-1), torch.where(tail, 0.0, gap).sum(-1), torch.where(tail, gap, 0.0).sum(-1)], 1)


def _akl_sums(z, t, stats: torch.Tensor, opts: KDOptions, shard: Shard, reducer: GroupReducer) -> torch.Tensor:
    """``(rows, 6)``: AKL's global ``P``, ``F``, ``Q``, ``R``, head gap and tail gap (step 4 of the module
    docstring), from the slices and the global statistics, a chunk of rows at a time (through ``torch.compile`` on
    the CPU, as the torch backend's chunks, ``torch_backend._run``)."""
    compiled = torch_backend._use_compiled(z, t)
    parts = [torch_backend._run(_akl_chunk, compiled, z[lo:hi], t[lo:hi], stats[lo:hi], opts, reducer)
             for lo, hi in _row_chunks(z.shape[0], shard)]
    return reducer.sum(torch.cat(parts) if parts else stats.new_zeros((0, 6)))


def forward(z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, opts: KDOptions, shard: Shard,
            reducer: GroupReducer, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Row losses ``(N,)`` and global statistics ``(N, NUM_STATS)`` (NaN in unused columns) of the slices ``z``,
    ``t`` ``(N, V_r)``, in float32 (float64 when an input is); steps 1-4 of the module docstring."""
    divergence, ce_weight = opts.divergence, opts.ce_weight
    with_ce = labels is not None and ce_weight != 0.0
    dtype = compute_dtype(z, t)
    if shard.width:
        local = shard_stats(z, t, labels, *op_args(opts), backend).to(dtype)
    else:  # an empty slice: nothing found, its sums 0
        local = torch.zeros((z.shape[0], layout.NUM_STATS), dtype=dtype, device=z.device)
    extra = [_label_logit(z.to(dtype), labels, shard)] if with_ce else []
    cols, ce_sum, extra = _combine(local, extra, opts, with_ce, reducer)
    stats = torch.full((z.shape[0], layout.NUM_STATS), float("nan"), dtype=dtype, device=z.device)
    for col, value in cols.items():
        stats[:, col] = value
    if divergence in ("fkl", "rkl"):
        div = cols[layout.FKL if divergence == "fkl" else layout.RKL]
    elif divergence == "akl":
        p_mass, fkl, q_mass, rkl, g_head, g_tail = _akl_sums(z, t, stats, opts, shard, reducer).unbind(1)
        stats[:, layout.MASS_P], stats[:, layout.FKL], stats[:, layout.MASS_Q], stats[:, layout.RKL] = (
            p_mass, fkl, q_mass, rkl)
        r_head, r_tail = head_tail_ratios(g_head, g_tail)
        stats[:, layout.R_HEAD], stats[:, layout.R_TAIL] = r_head, r_tail
        div = r_head * fkl + r_tail * rkl
    else:
        if shard.width:
            parts = shard_finish(z, t, stats, *op_args(opts), backend).to(dtype)
        else:
            parts = torch.zeros((z.shape[0], 2), dtype=dtype, device=z.device)
        div, s = reducer.sum(parts).unbind(1)
        stats[:, layout.TODI_S if divergence == "todi" else layout.Q_G] = s
    row_loss = opts.kd_weight * div
    if labels is not None:
        if with_ce:
            # log 0 = -inf for a student row of all -inf: CE NaN there, as unsharded
            log_s_ce = ce_sum.log()
            label_logit = extra[0]
            valid = (labels >= 0) & (labels < shard.vocab)
            ce = torch.where(valid, log_s_ce - (label_logit - cols[layout.MAX_Z]), float("nan"))
            stats[:, layout.MAX_CE], stats[:, layout.LOGS_CE], stats[:, layout.CE] = cols[layout.MAX_Z], log_s_ce, ce
            row_loss = row_loss + ce_weight * ce
        keep = labels != opts.ignore_index
        row_loss = torch.where(keep, row_loss, 0.0)
        # ignored rows' padding may be NaN: the Triton backward scales their stats by 0
        stats = torch.where(keep[:, None], stats, 0.0)
    return row_loss, stats


def add_ce_grad(dz: torch.Tensor, grad_rows: torch.Tensor, z: torch.Tensor, labels: torch.Tensor,
                row_max: torch.Tensor, log_sum: torch.Tensor, opts: KDOptions, shard: Shard) -> torch.Tensor:
    """``dz`` ``(N, V_r)`` plus the hard-label gradient ``g ce_weight (softmax(z)_j - [offset + j == label])`` of the
    slice, a chunk of rows at a time: ``softmax`` from the global row maximum ``row_max`` and
    ``log_sum = log sum exp(z - row_max)`` ``(N,)``; NaN rows where the label is outside ``[0, V)``, 0 at ignored
    rows."""
    dtype = compute_dtype(z, log_sum)
    ids = torch.arange(shard.offset, shard.offset + shard.width, device=z.device)
    parts = []
    for lo, hi in _row_chunks(z.shape[0], shard):
        lab = labels[lo:hi]
        lq = _log_probs(z[lo:hi].to(dtype), row_max[lo:hi].to(dtype), log_sum[lo:hi].to(dtype), 1.0)
        valid = (lab >= 0) & (lab < shard.vocab)
        soft = torch.where(valid[:, None], lq.exp() - (ids[None, :] == lab[:, None]).to(dtype), float("nan"))
        g = grad_rows[lo:hi].to(dtype)[:, None] * opts.ce_weight
        ce = torch.where((lab != opts.ignore_index)[:, None], g * soft, 0.0)
        parts.append((dz[lo:hi].to(dtype) + ce).to(dz.dtype))
    return torch.cat(parts) if parts else dz


def backward(grad_rows: torch.Tensor, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
             stats: torch.Tensor, opts: KDOptions, shard: Shard, backend: str) -> torch.Tensor:
    """The gradient ``(N, V_r)`` of the slice ``z`` from ``grad_rows`` ``(N,)`` and the global ``stats`` of
    :func:`forward`: the backend's gradient pass without the hard-label term (its label is a global id), then
    :func:`add_ce_grad`. Sends nothing."""
    if shard.width == 0:
        return torch.zeros_like(z)
    grad_rows = grad_rows.contiguous()
    dz = kd_backward(grad_rows, z, t, labels, stats, *op_args(opts._replace(ce_weight=0.0)), backend)
    if labels is not None and opts.ce_weight != 0.0:
        dz = add_ce_grad(dz, grad_rows, z, labels, stats[:, layout.MAX_CE], stats[:, layout.LOGS_CE], opts, shard)
    return dz


class _VocabParallelRows(torch.autograd.Function):
    """Row losses ``(N,)`` of the slices; the backward writes the slice's gradient and sends nothing."""

    @staticmethod
    def forward(ctx, z, t, labels, opts: KDOptions, backend: str, shard: Shard, reducer: GroupReducer):
        loss, stats = forward(z, t, labels, opts, shard, reducer, backend)
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
                        opts: KDOptions, backend: str, process_group, vocab_range=None) -> torch.Tensor:
    """``kd_loss`` of the unsharded logits, from this rank's slices ``(..., V_r)`` (SPEC §8); arguments checked by
    the caller, ``labels`` ``(...)`` global ids; ``vocab_range``: ``(start, end, V)`` or None (the shape table).
    Returns the reduced loss, the same on every rank."""
    z, t = flat_rows(student_logits), flat_rows(teacher_logits)
    labels = flat_labels(labels)
    shard, reducer = layout_of(process_group, vocab_range, backend, z.shape[0], z.shape[1], z.device,
                               opts.divergence, labels is not None)
    rows = _VocabParallelRows.apply(z, t, labels, canonical(opts), backend, shard, reducer)
    return reduce_rows(rows, labels, opts.ignore_index, opts.reduction, student_logits.shape[:-1])


def sparse_stats(z: torch.Tensor, ids: torch.Tensor, use: torch.Tensor, labels: torch.Tensor | None,
                 opts: KDOptions, rest: bool, shard: Shard, reducer: GroupReducer):
    """The sparse op's streaming statistics (``layout.R_MAX``, ``R_LOGS``, ``R_LOGS_CE``: ``(N, 3)``) of the whole
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
    streamed, z_k, label_logit = [], [], []
    for lo, hi in _row_chunks(z.shape[0], shard):
        x = z[lo:hi].to(dtype)
        if shard.width == 0:
            x = torch.full((hi - lo, 1), NEG_INF, dtype=dtype, device=z.device)  # one -inf entry: nothing held
        x_rest = torch.where(sparse_ops._in_k(local[lo:hi], here[lo:hi], x.shape[1]), NEG_INF, x) if rest else x
        gathered = torch.where(here[lo:hi], x.gather(1, local[lo:hi]), NEG_INF)
        maxima = reducer.max(torch.cat([x_rest.amax(-1)[:, None], gathered], 1))
        z_k.append(maxima[:, 1:])
        m = torch.where(maxima[:, 0] == NEG_INF, 0.0, maxima[:, 0])
        centred = x_rest - m[:, None]
        sums = [_scaled(centred, temperature).exp().sum(-1)]
        if with_ce:
            if temperature != 1.0:
                sums.append(centred.exp().sum(-1))
            sums.append(_label_logit(x, labels[lo:hi], shard))
        sums = reducer.sum(torch.stack(sums, 1))
        log_ce = sums[:, 1].log() if with_ce and temperature != 1.0 else torch.zeros_like(m)
        streamed.append(torch.stack([m, sums[:, 0].log(), log_ce], 1))
        label_logit.append(sums[:, -1])
    streamed = torch.cat(streamed) if streamed else z.new_zeros((0, layout.NUM_STREAM_STATS), dtype=dtype)
    z_k = torch.cat(z_k) if z_k else z.new_zeros(ids.shape, dtype=dtype)
    return streamed, z_k, (torch.cat(label_logit) if with_ce and label_logit else None)


class _VocabParallelSparseRows(torch.autograd.Function):
    """Row losses ``(N,)`` of a sparse teacher against this rank's student slice; the backward is the sparse
    backend's gradient pass on the slice (ids shifted to the slice: those outside are never written) without the
    hard-label term, then :func:`add_ce_grad`. Sends nothing."""

    @staticmethod
    def forward(ctx, z, ids, lp, labels, opts: KDOptions, tail: str, backend: str, shard: Shard,
                reducer: GroupReducer, rest_lp):
        gather = functools.partial(sparse_stats, shard=shard, reducer=reducer)
        rows, stats, grad_k = sparse_ops.forward_rows(z, ids, lp, labels, opts, tail, backend, rest_lp=rest_lp,
                                                      shard_stats=gather, vocab=shard.vocab)
        ctx.save_for_backward(z, ids, lp, labels, stats, grad_k)
        ctx.opts, ctx.tail, ctx.backend, ctx.shard = opts, tail, backend, shard
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        if torch.is_grad_enabled():
            raise RuntimeError(SECOND_DERIVATIVE)
        z, ids, lp, labels, stats, grad_k = ctx.saved_tensors
        opts, shard, grad_rows = ctx.opts, ctx.shard, grad_rows.contiguous()
        if shard.width == 0:
            return torch.zeros_like(z), None, None, None, None, None, None, None, None, None
        _, backward_fn = sparse_ops._stats_fn(ctx.backend)
        dz = backward_fn(grad_rows, z, ids - shard.offset, lp, labels, stats, grad_k, opts._replace(ce_weight=0.0),
                         ctx.tail == "bucket")
        if labels is not None and opts.ce_weight != 0.0:
            dz = add_ce_grad(dz, grad_rows, z, labels, stats[:, layout.S_MAX], stats[:, layout.S_LOGS_CE], opts,
                             shard)
        return dz, None, None, None, None, None, None, None, None, None


def vocab_parallel_sparse_loss(student_logits: torch.Tensor, teacher_indices: torch.Tensor,
                               teacher_logprobs: torch.Tensor, labels: torch.Tensor | None, opts: KDOptions,
                               tail: str, backend: str, process_group,
                               teacher_rest_logprob: torch.Tensor | None = None, vocab_range=None) -> torch.Tensor:
    """``sparse_kd_loss`` of the unsharded student from this rank's slice ``(..., V_r)`` and the global top-k
    teacher ``(..., K)`` (SPEC §7-8), with the teacher's log-mass outside K ``(...)`` when given (bucket tail);
    arguments checked by the caller. The same loss on every rank."""
    k = teacher_indices.shape[-1]
    z = flat_rows(student_logits)
    ids = teacher_indices.reshape(-1, k).to(torch.int64).contiguous()
    lp = teacher_logprobs.reshape(-1, k).contiguous()
    labels = flat_labels(labels)
    shard, reducer = layout_of(process_group, vocab_range, backend, z.shape[0], z.shape[1], z.device,
                               opts.divergence, labels is not None, teacher_k=k, tail=sparse_ops.TAILS.index(tail))
    rest = None if teacher_rest_logprob is None or tail != "bucket" else teacher_rest_logprob.reshape(-1)
    rows = _VocabParallelSparseRows.apply(z, ids, lp, labels, canonical(opts), tail, backend, shard, reducer,
                                          rest)
    return reduce_rows(rows, labels, opts.ignore_index, opts.reduction, student_logits.shape[:-1])
