"""Drop-in replacements for Liger-Kernel's fused linear distillation loss, computed by kdkernels.

``from kdkernels.integrations.liger import FusedLinearJSDLoss`` in place of
``from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss``: the same constructor arguments (in the same
order) and call, the same value (tested against liger-kernel 0.8.5). The other divergences come in the same shape:
:class:`FusedLinearForwardKLLoss`, :class:`FusedLinearReverseKLLoss`, :class:`FusedLinearAKLLoss`,
:class:`FusedLinearToDiLoss`, :class:`FusedLinearSkewedForwardKLLoss`, :class:`FusedLinearSkewedReverseKLLoss`,
:class:`FusedLinearTVDLoss`. This module does not import liger-kernel.

Conventions (Liger's, and kdkernels'): the teacher is the target; ``temperature`` divides both logits for the soft
loss, the hard loss is the cross-entropy of the raw student logits (``T = 1``), and nothing is multiplied by
``T**2``; ``loss = weight_hard_loss * hard + weight_soft_loss * soft`` where each is summed over the rows whose label
is not ``ignore_index`` and divided by their count (0 when every row is ignored). Liger's ``beta`` is kdkernels'
``jsd_beta``: 0 is forward KL(teacher || student), 1 reverse KL, in between ``beta KL(p || M) + (1 - beta)
KL(q || M)`` with ``M = beta p + (1 - beta) q`` (as TRL's ``generalized_jsd_loss``).
"""

from __future__ import annotations

import torch

from kdkernels.torch_ops.fused_linear import fused_linear_kd_loss
from kdkernels.torch_ops.options import loss_options


class FusedLinearDistillationLoss(torch.nn.Module):
    """Liger-shaped fused output layer + distillation loss for any kdkernels divergence.

    Args:
        divergence: ``"fkl"``, ``"rkl"``, ``"akl"``, ``"todi"``, ``"sfkl"``, ``"srkl"``, ``"jsd"`` or ``"tvd"``.
        weight_hard_loss: weight of the cross-entropy on ``true_labels`` (kdkernels' ``ce_weight``).
        weight_soft_loss: weight of the divergence (kdkernels' ``kd_weight``).
        ignore_index: label of rows that count 0 and are left out of the mean.
        temperature: divides student and teacher logits in the divergence (``> 0``).
        compiled: accepted for Liger's signature; kdkernels chooses itself whether its chunk functions compile.
        chunk_size: token rows per chunk; ``None`` (default) lets kdkernels choose from ``V`` and the hidden sizes.
        return_soft_hard_loss: also return the unweighted soft and hard losses, as Liger does (values without
            gradient; they cost two more forward passes of the output layers).
        vocab_size: for heads of different sizes over one tokenizer, use the first ``vocab_size`` rows of each.
            Liger instead pads the student's logits with zeros up to the teacher's size (giving the student mass on
            ids that do not exist); here different sizes without ``vocab_size`` raise a ``ValueError``.
        backend: ``"auto"`` (Triton on CUDA, torch on CPU), ``"torch"`` or ``"triton"``.
        **params: the divergence's parameter (``akl_alpha``, ``todi_beta``, ``skew_lambda``, ``jsd_beta``).
    """

    def __init__(self, divergence: str, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5,
                 ignore_index: int = -100, temperature: float = 1.0, compiled: bool = True,
                 chunk_size: int | None = None, return_soft_hard_loss: bool = False, *, vocab_size: int | None = None,
                 backend: str = "auto", **params: float):
        super().__init__()
        self.options = loss_options(divergence, temperature=temperature, kd_weight=weight_soft_loss,
                                    ce_weight=weight_hard_loss, ignore_index=ignore_index, **params)
        self.compiled = compiled
        self.chunk_size = chunk_size
        self.return_soft_hard_loss = return_soft_hard_loss
        self.vocab_size = vocab_size
        self.backend = backend

    def _loss(self, student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias,
              teacher_bias, **weights: float) -> torch.Tensor:
        options = self.options._replace(**weights)._asdict()
        divergence = options.pop("divergence")
        return fused_linear_kd_loss(
            student_input, student_weight, teacher_input.detach(), teacher_weight.detach(), divergence,
            student_bias=student_bias, teacher_bias=None if teacher_bias is None else teacher_bias.detach(),
            labels=true_labels, backend=self.backend, chunk_size=self.chunk_size, vocab_size=self.vocab_size,
            **options)

    def forward(self, student_input: torch.Tensor, student_weight: torch.Tensor, teacher_input: torch.Tensor,
                teacher_weight: torch.Tensor, true_labels: torch.Tensor | None = None,
                student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None):
        """The loss of ``student_input @ student_weight.T + student_bias`` against the teacher's logits.

        Shapes: ``student_input`` ``(BT, H_s)`` (or ``(..., H_s)``), ``student_weight`` ``(V, H_s)``,
        ``teacher_input`` ``(BT, H_t)``, ``teacher_weight`` ``(V, H_t)``, ``true_labels`` ``(BT,)`` int (``None``:
        every row counts, and ``weight_hard_loss`` must be 0), biases ``(V,)``. Teacher tensors are constants (they
        are detached). Returns the float32 scalar loss, or ``(loss, soft, hard)`` with ``return_soft_hard_loss``;
        gradients reach ``student_input``, ``student_weight`` and ``student_bias``.
        """
        s_vocab, t_vocab = student_weight.shape[0], teacher_weight.shape[0]
        if self.vocab_size is None and s_vocab != t_vocab:
            raise ValueError(f"student head of {s_vocab} rows, teacher head of {t_vocab}: pass vocab_size="
                             f"{min(s_vocab, t_vocab)} to compare the first rows of each (Liger pads the student's "
                             f"logits with zeros instead)")
        if true_labels is None and self.options.ce_weight != 0:
            raise ValueError("weight_hard_loss needs true_labels")
        tensors = (student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias,
                   teacher_bias)
        loss = self._loss(*tensors)
        if not self.return_soft_hard_loss:
            return loss
        with torch.no_grad():
            soft = self._loss(*tensors, kd_weight=1.0, ce_weight=0.0)
            hard = self._loss(*tensors, kd_weight=0.0, ce_weight=1.0) if true_labels is not None else soft.new_zeros(())
        return loss, soft, hard

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.options._asdict().items())


class FusedLinearJSDLoss(FusedLinearDistillationLoss):
    """``LigerFusedLinearJSDLoss``'s arguments, in its order: ``beta`` is the generalized JSD's weight (0 forward
    KL, 1 reverse KL); ``jsd_beta=`` (the name of Liger's ``LigerFusedLinearJSD`` and of kdkernels) sets it too.
    See :class:`FusedLinearDistillationLoss` for the rest."""

    def __init__(self, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5, beta: float = 0.5,
                 ignore_index: int = -100, temperature: float = 1.0, compiled: bool = True,
                 chunk_size: int | None = None, return_soft_hard_loss: bool = False, *, jsd_beta: float | None = None,
                 vocab_size: int | None = None, backend: str = "auto"):
        super().__init__("jsd", weight_hard_loss, weight_soft_loss, ignore_index, temperature, compiled, chunk_size,
                         return_soft_hard_loss, vocab_size=vocab_size, backend=backend,
                         jsd_beta=beta if jsd_beta is None else jsd_beta)


def _liger_shaped(name: str, divergence: str, what: str) -> type:
    """A :class:`FusedLinearDistillationLoss` with ``divergence`` fixed (its parameter, if any, by keyword)."""

    def __init__(self, weight_hard_loss=0.5, weight_soft_loss=0.5, ignore_index=-100, temperature=1.0,
                 compiled=True, chunk_size=None, return_soft_hard_loss=False, **keywords):
        FusedLinearDistillationLoss.__init__(self, divergence, weight_hard_loss, weight_soft_loss, ignore_index,
                                             temperature, compiled, chunk_size, return_soft_hard_loss, **keywords)

    doc = (f"{what} (``divergence={divergence!r}``) in the shape of ``LigerFusedLinearJSDLoss``: ``weight_hard_loss``, "
           "``weight_soft_loss``, ``ignore_index``, ``temperature``, ``compiled``, ``chunk_size``, "
           "``return_soft_hard_loss``, then by keyword the divergence's parameter, ``vocab_size`` and ``backend``. "
           "See :class:`FusedLinearDistillationLoss`.")
    return type(name, (FusedLinearDistillationLoss,),
                {"__init__": __init__, "__doc__": doc, "__module__": __name__, "__qualname__": name})


FusedLinearForwardKLLoss = _liger_shaped("FusedLinearForwardKLLoss", "fkl", "Forward KL(teacher || student)")
FusedLinearReverseKLLoss = _liger_shaped("FusedLinearReverseKLLoss", "rkl", "Reverse KL(student || teacher)")
FusedLinearAKLLoss = _liger_shaped("FusedLinearAKLLoss", "akl", "Adaptive KL (``akl_alpha=``)")
FusedLinearToDiLoss = _liger_shaped("FusedLinearToDiLoss", "todi", "Token-wise ToDi (``todi_beta=``)")
FusedLinearSkewedForwardKLLoss = _liger_shaped("FusedLinearSkewedForwardKLLoss", "sfkl",
                                               "Skewed forward KL (``skew_lambda=``)")
FusedLinearSkewedReverseKLLoss = _liger_shaped("FusedLinearSkewedReverseKLLoss", "srkl",
                                               "Skewed reverse KL (``skew_lambda=``)")
FusedLinearTVDLoss = _liger_shaped("FusedLinearTVDLoss", "tvd", "Total variation")
