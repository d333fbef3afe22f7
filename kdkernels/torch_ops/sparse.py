"""Sparse (top-k) teachers (SPEC §7), the public functions: ``sparse_kd_loss``, ``topk_teacher`` and
``topk_teacher_from_hidden``.

They check their arguments, flatten them to rows (``rows.py``) and call the registered ops of ``sparse_ops.py``,
which defines the tails (``"bucket"``, ``"renormalize"``, ``"truncate"``), derives their gradient and holds the
torch backend; the Triton kernels are ``kernels/sparse.py``'s. With a ``process_group`` the loss takes the
vocabulary-parallel path (``vocab_parallel.py``, imported on first use).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkernels.torch_ops import dtensor, validate
from kdkernels.torch_ops.fused_linear import auto_chunk_size
from kdkernels.torch_ops.options import loss_options
from kdkernels.torch_ops.rows import flat_labels, flat_rows, reduce_rows
from kdkernels.torch_ops.sparse_ops import check_rest, check_sparse_teacher, check_tail, rest_op, sparse_rows, topk_op
from kdkernels.torch_ops.sparse_reference import sparse_kd_loss_reference


def sparse_kd_loss(
    student_logits: torch.Tensor,
    teacher_indices: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    divergence: str = "fkl",
    *,
    tail: str = "bucket",
    teacher_rest_logprob: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    backend: str = "auto",
    process_group: object = None,
    vocab_range: tuple[int, int, int] | None = None,
    **options: object,
) -> torch.Tensor:
    """Distillation loss against a sparse (top-k) teacher: ``K`` ids and their log-probs per token (SPEC §7).

    Args:
        student_logits: ``(..., V)`` float32/bfloat16/float16 (float64 on the torch/reference backends).
        teacher_indices: ``(..., K)`` int32/int64 vocabulary ids, ``K >= 1``; the valid ids of a row must be
            distinct and in ``[0, V)``, otherwise the row's loss and gradient are NaN (no error: no host sync).
        teacher_logprobs: ``(..., K)`` float, ``log p`` of the target at those ids, **as given** (the teacher's
            temperature is whatever produced them); ``-inf`` marks padding (its id is ignored). A constant.
        divergence: any of :func:`kdkernels.kd_loss`'s, evaluated on categories (see ``tail``).
        tail: ``"bucket"`` (default): the K entries plus one rest category, ``p_rest`` (see
            ``teacher_rest_logprob``) and ``q_rest = sum_{j not in K} q_j``; every student entry gets a gradient.
            ``"renormalize"``: the K entries only, both distributions renormalised; zero gradient outside K.
            ``"truncate"`` (fkl only): ``sum_K p (lp - lq)`` with the full-vocabulary ``lq``: not a divergence, it
            can be negative. The teacher's category probabilities are the softmax of its category log-probs, i.e.
            the given ones whenever they sum to at most 1 (bucket), renormalised otherwise.
        teacher_rest_logprob: ``(...)`` float, ``log p_rest``: the log of the teacher's mass outside its K entries,
            used exactly as given (``kd.topk_teacher(..., return_rest=True)`` and the top-k dump compute it from the
            full logits; ``-inf`` means no mass outside K). None (default): ``p_rest = max(1 - sum_K p, 2**-126)``,
            summed in float64. The floor (float32's smallest normal number,
            ``kdkernels.torch_ops.sparse_reference.REST_FLOOR``) keeps the rest category of a confident teacher,
            whose top-k sum to 1 in float32: a student's mass outside K is still penalised by every divergence, its
            gradient still raises the teacher's top entries, and every value stays finite. A constant. Used by the
            bucket tail only (the other tails have no rest category).
        labels, backend, **options: as in :func:`kdkernels.kd_loss`. ``temperature`` divides the student's logits
            only; no ``T**2`` factor. The CE term (``ce_weight``) is the cross-entropy of the raw student logits.
        process_group: ``None``, or the ``torch.distributed`` group over which the student's vocabulary is split
            (SPEC §8, as in :func:`kdkernels.kd_loss`): ``student_logits`` is this rank's slice ``(..., V_r)``;
            ``teacher_indices``, ``teacher_logprobs`` and ``labels`` are the same on every rank, with global ids
            (each rank handles the ids in its slice). Every rank returns the unsharded loss.
        vocab_range: with ``process_group``, this rank's slice ``(start, end, V)``, as in :func:`kdkernels.kd_loss`
            (no shape table, no host synchronisation). A ``DTensor`` student sharded on the vocabulary needs neither
            (its mesh gives both; the teacher's tensors and labels may be plain or replicated DTensors).

    Returns the float32 loss (``(...)`` for ``reduction="none"``); the gradient has the student's dtype.

    Example::

        ids, lp, rest = kd.topk_teacher(teacher_logits, 64, return_rest=True)   # or read from a dump
        loss = kd.sparse_kd_loss(student_logits, ids, lp, "fkl", teacher_rest_logprob=rest, temperature=1.0)
    """
    if dtensor.is_dtensor(student_logits):
        dtensor.check_no_group(process_group, vocab_range, "student_logits")
        student_logits, process_group, vocab_range = dtensor.vocab_split(student_logits, "student_logits", -1)
    teacher_indices, teacher_logprobs, teacher_rest_logprob, labels = (
        dtensor.local(x, name) for x, name in ((teacher_indices, "teacher_indices"),
                                               (teacher_logprobs, "teacher_logprobs"),
                                               (teacher_rest_logprob, "teacher_rest_logprob"), (labels, "labels")))
    validate.check_logits("student_logits", student_logits, least=0 if process_group is not None else 1)
    check_sparse_teacher(student_logits, teacher_indices, teacher_logprobs)
    check_rest(student_logits, teacher_rest_logprob)
    opts = loss_options(divergence, **options)
    check_tail(tail, opts.divergence)
    validate.check_labels(labels, student_logits)
    validate.check_ce(opts.ce_weight, labels)
    backend = validate.resolve_backend(backend, student_logits, student_logits)
    validate.check_vocab_range(vocab_range, process_group)
    if process_group is not None:
        from kdkernels.torch_ops import vocab_parallel  # imported on first use, as the group's collectives

        return vocab_parallel.vocab_parallel_sparse_loss(student_logits, teacher_indices, teacher_logprobs, labels,
                                                         opts, tail, backend, process_group, teacher_rest_logprob,
                                                         vocab_range)
    if backend == "reference":
        kwargs = opts._asdict()
        del kwargs["divergence"]
        return sparse_kd_loss_reference(student_logits, teacher_indices, teacher_logprobs, divergence, tail=tail,
                                        labels=labels, teacher_rest_logprob=teacher_rest_logprob, **kwargs)
    k = teacher_indices.shape[-1]
    labels = flat_labels(labels)
    rest = None if teacher_rest_logprob is None or tail != "bucket" else teacher_rest_logprob.reshape(-1)
    rows = sparse_rows(flat_rows(student_logits), teacher_indices.reshape(-1, k), teacher_logprobs.reshape(-1, k),
                       labels, opts, tail, backend, rest)
    return reduce_rows(rows, labels, opts.ignore_index, opts.reduction, student_logits.shape[:-1])


def _check_k(k: object, vocab: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, V] = [1, {vocab}], got {k}")


def topk_teacher(teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0, return_rest: bool = False,
                 backend: str = "auto") -> tuple[torch.Tensor, ...]:
    """The ``k`` largest entries of ``log_softmax(teacher_logits / T)`` per row, and their ids (SPEC §7).

    Args:
        teacher_logits: ``(..., V)`` float32/bfloat16/float16 (float64 on CPU); not differentiated.
        k: ``1 <= k <= V``.
        temperature: ``T > 0``; the returned log-probs are those of ``softmax(t / T)``.
        return_rest: also return ``rest_logprob`` ``(...)`` float32, ``log sum_{j not in ids} softmax(t / T)_j``,
            the log of the mass outside the k entries (``-inf`` for ``k = V``), for ``sparse_kd_loss``'s
            ``teacher_rest_logprob``. It is summed over those entries from the logits (one more streaming pass),
            never formed as ``1 - sum``, so it is exact to float32 rounding however small (1e-30 included).
        backend: ``"auto"`` (Triton on CUDA, torch on CPU), ``"triton"`` or ``"torch"``.

    Returns ``(ids, logprobs)`` (with ``return_rest``: ``(ids, logprobs, rest_logprob)``), ``(..., k)`` int64 and
    float32, in descending order; equal values in ascending id order. The Triton kernel streams each row once with a
    running top-k (``k <= 256``; larger ``k`` runs the torch path, ``topk`` of int64 order keys a chunk of rows at a
    time); neither makes an ``(N, V)`` float32 copy.
    """
    validate.check_logits("teacher_logits", teacher_logits)
    vocab = teacher_logits.shape[-1]
    _check_k(k, vocab)
    temperature = validate.check_number("temperature", temperature, low=0.0)
    if not isinstance(return_rest, bool):
        raise TypeError(f"return_rest must be a bool, got {type(return_rest).__name__}")
    validate.check_choice("backend", backend, ("auto", "triton", "torch"))
    backend = validate.resolve_backend(backend, teacher_logits, teacher_logits)
    t = flat_rows(teacher_logits.detach())
    ids, lp = topk_op(t, k, temperature, backend)
    lead = teacher_logits.shape[:-1]
    if return_rest:
        return ids.reshape(*lead, k), lp.reshape(*lead, k), rest_op(t, ids, temperature, backend).reshape(lead)
    return ids.reshape(*lead, k), lp.reshape(*lead, k)


@torch.no_grad()
def topk_teacher_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, k: int, *,
                             bias: torch.Tensor | None = None, temperature: float = 1.0,
                             return_rest: bool = False, chunk_size: int | None = None,
                             backend: str = "auto") -> tuple[torch.Tensor, ...]:
    """:func:`topk_teacher` of ``hidden @ weight.T + bias``, ``chunk_size`` tokens at a time: a dump of a teacher's
    top-k never holds its full ``(N, V)`` logits.

    Args:
        hidden: ``(..., H)`` last hidden states; ``weight`` ``(V, H)`` and ``bias`` ``(V,)`` the output layer.
        k, temperature, return_rest, backend: as in :func:`topk_teacher` (``rest_logprob`` has shape ``(...)``).
        chunk_size: tokens per chunk; default as :func:`kdkernels.fused_linear_kd_loss` chooses it.
    """
    validate.check_weight("weight", weight, "bias", bias)
    validate.check_hidden("hidden", hidden, "weight", weight)
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    vocab = weight.shape[0]
    _check_k(k, vocab)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    step = chunk_size or auto_chunk_size(vocab, weight.shape[1])
    flat = hidden.reshape(-1, hidden.shape[-1])
    ids = torch.empty((flat.shape[0], k), dtype=torch.int64, device=hidden.device)
    lp = torch.empty((flat.shape[0], k), dtype=torch.float32, device=hidden.device)
    rest = torch.empty((flat.shape[0] if return_rest else 0,), dtype=torch.float32, device=hidden.device)
    for lo in range(0, flat.shape[0], step):
        part = slice(lo, lo + step)
        out = topk_teacher(F.linear(flat[part], weight, bias), k, temperature=temperature, return_rest=return_rest,
                           backend=backend)
        ids[part], lp[part] = out[:2]
        if return_rest:
            rest[part] = out[2]
    lead = hidden.shape[:-1]
    if return_rest:
        return ids.reshape(*lead, k), lp.reshape(*lead, k), rest.reshape(lead)
    return ids.reshape(*lead, k), lp.reshape(*lead, k)
