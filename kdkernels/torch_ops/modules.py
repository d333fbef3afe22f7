"""``KDLoss``: the functional API as an ``nn.Module`` that holds its options."""

from __future__ import annotations

import torch

from kdkernels.torch_ops import validate
from kdkernels.torch_ops.functional import checked_loss
from kdkernels.torch_ops.options import loss_options


class KDLoss(torch.nn.Module):
    """``KDLoss(divergence="todi", temperature=2.0)(student_logits, teacher_logits, labels=None)``.

    Takes the keywords of :func:`kdkernels.kd_loss`, checked here once and held as a
    :class:`~kdkernels.KDOptions` (``.loss_options``), and applies them on each call. With ``process_group`` the
    logits of each call are this rank's vocabulary slice (SPEC §8; ``vocab_range`` as in :func:`kdkernels.kd_loss`);
    DTensor logits sharded on the vocabulary need neither.
    """

    def __init__(self, divergence: str = "fkl", *, backend: str = "auto", process_group: object = None,
                 vocab_range: tuple[int, int, int] | None = None, **options: object):
        super().__init__()
        self.loss_options = loss_options(divergence, **options)
        validate.check_choice("backend", backend, validate.BACKENDS)
        validate.check_vocab_range(vocab_range, process_group)
        self.backend = backend
        self.process_group = process_group
        self.vocab_range = vocab_range

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        return checked_loss(student_logits, teacher_logits, labels, self.loss_options, self.backend,
                            self.process_group, self.vocab_range)

    @property
    def divergence(self) -> str:
        return self.loss_options.divergence

    def extra_repr(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.loss_options._asdict().items())
        return f"{fields}, backend={self.backend!r}"
