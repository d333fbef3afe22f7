"""``KDLoss``: the functional API as an ``nn.Module`` that holds its options."""

from __future__ import annotations

import torch

from kdkernels.torch_ops import validate
from kdkernels.torch_ops.functional import loss_with_options
from kdkernels.torch_ops.options import loss_options


class KDLoss(torch.nn.Module):
    """``KDLoss(divergence="todi", temperature=2.0)(student_logits, teacher_logits, labels=None)``.

    Takes the keywords of :func:`kdkernels.kd_loss`, checked here once and held as a
    :class:`~kdkernels.KDOptions` (``.loss_options``), and applies them on each call. With ``process_group`` the
    logits of each call are this rank's vocabulary slice (SPEC §8; see :func:`kdkernels.kd_loss`).
    """

    def __init__(self, divergence: str = "fkl", *, backend: str = "auto", process_group: object = None,
                 **options: object):
        super().__init__()
        self.loss_options = loss_options(divergence, **options)
        validate.check_choice("backend", backend, validate.BACKENDS)
        self.backend = backend
        self.process_group = process_group

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        validate.check_pair(student_logits, teacher_logits)
        validate.check_labels(labels, student_logits)
        validate.check_ce(self.loss_options.ce_weight, labels)
        backend = validate.resolve_backend(self.backend, student_logits, teacher_logits)
        return loss_with_options(student_logits, teacher_logits, labels, self.loss_options, backend,
                                 self.process_group)

    @property
    def divergence(self) -> str:
        return self.loss_options.divergence

    def extra_repr(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.loss_options._asdict().items())
        return f"{fields}, backend={self.backend!r}"
