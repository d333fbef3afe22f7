"""``KDLoss``: the functional API as an ``nn.Module`` that holds its options."""

from __future__ import annotations

import torch

from kdkernels.torch_ops import validate
from kdkernels.torch_ops.functional import kd_loss


class KDLoss(torch.nn.Module):
    """``KDLoss(divergence="todi", temperature=2.0)(student_logits, teacher_logits, labels=None)``.

    Takes the keywords of :func:`kdkernels.kd_loss` (checked here, once, and the float options stored as Python
    floats) and applies them on each call.
    """

    def __init__(
        self,
        divergence: str = "fkl",
        *,
        ignore_index: int = -100,
        temperature: float = 1.0,
        reduction: str = "mean",
        akl_alpha: float = 0.5,
        todi_beta: float = 1.0,
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        temperature, akl_alpha, todi_beta, kd_weight, ce_weight = validate.check_loss_options(
            divergence, reduction, temperature, akl_alpha, todi_beta, kd_weight, ce_weight
        )
        validate.check_choice("backend", backend, validate.BACKENDS)
        self.divergence = divergence
        self.options = dict(ignore_index=ignore_index, temperature=temperature, reduction=reduction,
                            akl_alpha=akl_alpha, todi_beta=todi_beta, kd_weight=kd_weight,
                            ce_weight=ce_weight, backend=backend)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, self.divergence, labels=labels, **self.options)

    def extra_repr(self) -> str:
        return f"divergence={self.divergence!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())
