"""torchtune's knowledge-distillation loss interface (chunked model outputs), computed by kdkernels.

torchtune's KD recipes (``knowledge_distillation_single_device`` / ``_distributed``) call the KD loss as
``kd_loss_fn(student_logits_chunks, teacher_logits_chunks, labels)`` and read its ``num_output_chunks``. In a recipe
config, ``_component_: kdkernels.integrations.torchtune.ForwardKLWithChunkedOutputLoss`` replaces torchtune's class
of that name (``ReverseKLWithChunkedOutputLoss`` likewise), and :class:`KDWithChunkedOutputLoss` takes any
kdkernels divergence (``divergence: todi``, its parameter, ``temperature``). This module does not import torchtune.

Each chunk goes through :func:`kdkernels.kd_loss` (``reduction="sum"``), which keeps no float32 copies of the chunk's
probabilities (the Triton kernels stream the vocabulary; on the CPU the torch backend works a block of rows at a
time); the logits themselves are the model's, as in torchtune.

Conventions: torchtune's ``ForwardKLLoss`` returns the cross-entropy ``-sum p log q`` of the student under the
teacher, which is forward KL plus the teacher's entropy; here ``"fkl"`` is the KL itself. The two differ by the
mean entropy of the teacher (a constant for the student): the gradients are the same, the logged value is lower by
that entropy. Reverse KL is the same in both. The reduction is torchtune's: the sum over the tokens whose label is
not ``ignore_index`` divided by their count (0 when there are none). No ``T**2`` factor.
"""

from __future__ import annotations

import torch

from kdkernels.torch_ops.functional import kd_loss
from kdkernels.torch_ops.options import loss_options


class KDWithChunkedOutputLoss(torch.nn.Module):
    """A kdkernels divergence between chunked student and teacher logits, torchtune's KD loss interface.

    Args:
        divergence: ``"fkl"``, ``"rkl"``, ``"akl"``, ``"todi"``, ``"sfkl"``, ``"srkl"``, ``"jsd"`` or ``"tvd"``.
        num_output_chunks: how many chunks the model's output is cut into (torchtune's recipes set the model's
            ``num_output_chunks`` from it); the labels are cut the same way.
        ignore_index: label of tokens left out.
        **options: the other loss options of :func:`kdkernels.kd_loss` (``temperature``, ``akl_alpha``,
            ``todi_beta``, ``skew_lambda``, ``jsd_beta``, ``kd_weight``, ``ce_weight``; not ``reduction``).
            torchtune's recipes add the hard-label loss themselves (``kd_ratio``), so ``ce_weight`` stays 0 there.
    """

    def __init__(self, divergence: str = "fkl", num_output_chunks: int = 8, ignore_index: int = -100, **options):
        super().__init__()
        if "reduction" in options:
            raise TypeError("reduction: the chunked loss is the mean over the labelled tokens, as torchtune's")
        self.num_output_chunks = num_output_chunks
        self.ignore_index = ignore_index
        self.options = loss_options(divergence, ignore_index=ignore_index, reduction="sum", **options)

    def forward(self, student_logits: list[torch.Tensor], teacher_logits: list[torch.Tensor],
                labels: torch.Tensor) -> torch.Tensor:
        """The mean loss over the labelled tokens.

        Args:
            student_logits: ``num_output_chunks`` tensors ``(B, S_c, V)``, the model's output cut along the
                sequence (``S_c`` summing to ``S``); gradients flow to them.
            teacher_logits: the teacher's, cut the same way (a constant: detach it, or compute it under
                ``torch.no_grad()``, as torchtune's recipes do).
            labels: ``(B, S)`` next-token labels (``ignore_index`` where none), cut into chunks like the logits.

        Returns the float32 scalar loss.
        """
        label_chunks = labels.chunk(self.num_output_chunks, dim=1)
        if not len(student_logits) == len(teacher_logits) == len(label_chunks):
            raise ValueError(f"{len(student_logits)} student and {len(teacher_logits)} teacher logit chunks for "
                             f"{len(label_chunks)} label chunks (num_output_chunks={self.num_output_chunks})")
        options = self.options._asdict()
        divergence = options.pop("divergence")
        total = sum(kd_loss(z, t, divergence, labels=y, **options)
                    for z, t, y in zip(student_logits, teacher_logits, label_chunks))
        return total / (labels != self.ignore_index).sum().clamp(min=1)

    def extra_repr(self) -> str:
        return f"num_output_chunks={self.num_output_chunks}, " + ", ".join(
            f"{name}={value!r}" for name, value in self.options._asdict().items() if name != "reduction")


class ForwardKLWithChunkedOutputLoss(KDWithChunkedOutputLoss):
    """torchtune's ``ForwardKLWithChunkedOutputLoss(num_output_chunks=8, ignore_index=-100)``: forward
    KL(teacher || student) (the KL itself: torchtune's value is higher by the teacher's entropy, same gradient)."""

    def __init__(self, num_output_chunks: int = 8, ignore_index: int = -100, **options):
        super().__init__("fkl", num_output_chunks, ignore_index, **options)


class ReverseKLWithChunkedOutputLoss(KDWithChunkedOutputLoss):
    """torchtune's ``ReverseKLWithChunkedOutputLoss(num_output_chunks=8, ignore_index=-100)``: reverse
    KL(student || teacher)."""

    def __init__(self, num_output_chunks: int = 8, ignore_index: int = -100, **options):
        super().__init__("rkl", num_output_chunks, ignore_index, **options)
