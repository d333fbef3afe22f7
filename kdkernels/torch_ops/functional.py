"""The public functional API: ``kd_loss`` and one shortcut per divergence (SPEC §3-4).

Every function takes student and teacher logits of shape ``(..., V)`` and returns a float32 loss
(a scalar, or the leading shape for ``reduction="none"``). The teacher distribution
``p = softmax(teacher_logits / T)`` is the target; the loss is not multiplied by ``T**2``.
"""

from __future__ import annotations

import torch

from kdkernels.torch_ops import dtensor, validate
from kdkernels.torch_ops.op import kd_forward
from kdkernels.torch_ops.options import KDOptions, loss_options, op_args
from kdkernels.torch_ops.reference import kd_loss_reference
from kdkernels.torch_ops.rows import flat_labels, flat_rows, reduce_rows


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "fkl",
    *,
    labels: torch.Tensor | None = None,
    backend: str = "auto",
    process_group: object = None,
    vocab_range: tuple[int, int, int] | None = None,
    **options: object,
) -> torch.Tensor:
    """Distillation loss between student and teacher logits, fused over the vocabulary.

    Args:
        student_logits: ``(..., V)`` float32/bfloat16/float16 (float64 on the torch/reference backends).
        teacher_logits: ``(..., V)``, same shape and device, any of those dtypes; must not require grad.
        divergence: ``"fkl"`` KL(p||q), ``"rkl"`` KL(q||p), ``"akl"`` adaptive KL, ``"todi"`` token-wise,
            ``"sfkl"`` / ``"srkl"`` skewed KLs, ``"jsd"`` generalized Jensen-Shannon, ``"tvd"`` total variation.
        labels: optional ``(...)`` integer tensor; rows equal to ``ignore_index`` count 0 and get no gradient.
        backend: ``"auto"`` (Triton on CUDA, torch on CPU), ``"triton"``, ``"torch"`` or ``"reference"``.
        process_group: ``None`` (the logits hold the whole vocabulary), or a ``torch.distributed`` process group
            over whose ranks the vocabulary is split (SPEC §8): the logits are then this rank's slice ``(..., V_r)``
            of ids ``[offset_r, offset_r + V_r)``, in rank order, ``labels`` are global ids (the same on every
            rank), every rank returns the loss of the unsharded logits and the gradient of its slice; ranks
            all-reduce per-row statistics only (``vocab_parallel.py``). Not the reference backend.
        vocab_range: with ``process_group``, this rank's slice as ``(start, end, V)`` (ids ``[start, end)`` of a
            vocabulary of ``V``): the path then reads no shape table, makes no host synchronisation and is traced
            whole by ``torch.compile``. Without it the ranks exchange their shapes first and check them.

    ``student_logits`` may be a ``DTensor`` sharded on the vocabulary (``Shard(-1)`` on one mesh dimension, e.g. a
    ``ColwiseParallel`` output layer's output; ``teacher_logits`` a DTensor of the same placements or the local
    shard, ``labels`` a plain or replicated tensor): the group and range come from its mesh (``dtensor.py``), the
    loss is a plain tensor and the gradient a DTensor of the student's placements.
        **options: the fields of :class:`~kdkernels.KDOptions` (``temperature=1.0``, ``reduction="mean"``,
            ``ignore_index=-100``, ``akl_alpha=0.5``, ``todi_beta=1.0``, ``skew_lambda=0.1``, ``jsd_beta=0.5``,
            ``kd_weight=1.0``, ``ce_weight=0.0``). ``temperature`` divides both logits; no ``T**2`` factor is
            applied. ``reduction="mean"`` averages over kept rows (0 if none), ``"sum"`` adds them, ``"none"``
            returns float32 of shape ``(...)``. ``row = kd_weight * divergence + ce_weight * CE(student, labels)``
            with the cross-entropy at temperature 1 (``ce_weight != 0`` needs labels). Float options take Python
            or NumPy numbers, or 0-dim CPU tensors outside ``torch.compile``; under ``torch.compile`` a value
            that changes between calls (a schedule) is a graph input, not a recompilation.

    Returns the loss; its gradient w.r.t. ``student_logits`` has the student's dtype.

    Example::

        loss = kd_loss(student(x), teacher(x).detach(), "todi", labels=y, temperature=2.0)
        loss.backward()
    """
    opts = loss_options(divergence, **options)
    return checked_loss(student_logits, teacher_logits, labels, opts, backend, process_group, vocab_range)


def checked_loss(student_logits, teacher_logits, labels, opts: KDOptions, backend: str, process_group: object = None,
                 vocab_range: tuple[int, int, int] | None = None) -> torch.Tensor:
    """:func:`kd_loss` with its options checked (``opts``): DTensors unwrapped, the tensors and backend checked."""
    if dtensor.is_dtensor(student_logits) or dtensor.is_dtensor(teacher_logits):
        student_logits, teacher_logits, labels, process_group, vocab_range = dtensor.unwrap_logits(
            student_logits, teacher_logits, labels, process_group, vocab_range)
    validate.check_pair(student_logits, teacher_logits, sliced=process_group is not None)
    validate.check_labels(labels, student_logits)
    validate.check_ce(opts.ce_weight, labels)
    backend = validate.resolve_backend(backend, student_logits, teacher_logits)
    return loss_with_options(student_logits, teacher_logits, labels, opts, backend, process_group, vocab_range)


def loss_with_options(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                      opts: KDOptions, backend: str, process_group: object = None,
                      vocab_range: tuple[int, int, int] | None = None) -> torch.Tensor:
    """:func:`kd_loss` on checked arguments and a resolved backend (its ``process_group`` not yet checked)."""
    validate.check_vocab_range(vocab_range, process_group)
    if process_group is not None:
        from kdkernels.torch_ops import vocab_parallel  # imported on first use, as the group's collectives

        return vocab_parallel.vocab_parallel_loss(student_logits, teacher_logits, labels, opts, backend, process_group,
                                                  vocab_range)
    if backend == "reference":
        return kd_loss_reference(student_logits, teacher_logits, labels=labels, **opts._asdict())
    # The kernels address rows by stride but need the vocabulary contiguous, and index labels by row.
    labels = flat_labels(labels)
    rows, _ = kd_forward(flat_rows(student_logits), flat_rows(teacher_logits), labels, *op_args(opts), backend)
    return reduce_rows(rows, labels, opts.ignore_index, opts.reduction, student_logits.shape[:-1])


SHORTCUTS = {"fkl": "forward_kl", "rkl": "reverse_kl", "akl": "adaptive_kl", "todi": "todi",
             "sfkl": "skewed_forward_kl", "srkl": "skewed_reverse_kl", "jsd": "jensen_shannon",
             "tvd": "total_variation"}


def _shortcut(divergence: str):
    def loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, **kwargs) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, divergence, **kwargs)

    loss.__name__ = SHORTCUTS[divergence]
    loss.__doc__ = f"``kd_loss(student_logits, teacher_logits, {divergence!r}, **kwargs)``; same keywords."
    return loss


forward_kl = _shortcut("fkl")
reverse_kl = _shortcut("rkl")
adaptive_kl = _shortcut("akl")
todi = _shortcut("todi")
skewed_forward_kl = _shortcut("sfkl")
skewed_reverse_kl = _shortcut("srkl")
jensen_shannon = _shortcut("jsd")
total_variation = _shortcut("tvd")
