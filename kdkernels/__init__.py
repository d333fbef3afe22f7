"""kdkernels: fused knowledge-distillation losses (forward/reverse KL, AKL, ToDi) for LLM training.

``import kdkernels as kd``; see :func:`kd.kd_loss`. Importing has no side effects: the backend is chosen
per call from the tensors' device, and triton is imported only when the Triton backend first runs.
"""

from kdkernels.torch_ops.functional import (
    adaptive_kl,
    forward_kl,
    jensen_shannon,
    kd_loss,
    reverse_kl,
    skewed_forward_kl,
    skewed_reverse_kl,
    todi,
    total_variation,
)
from kdkernels.torch_ops.fused_linear import FusedLinearKDLoss, fused_linear_kd_loss
from kdkernels.torch_ops.modules import KDLoss
from kdkernels.torch_ops.options import KDOptions
from kdkernels.torch_ops.sparse import sparse_kd_loss, topk_teacher, topk_teacher_from_hidden

__all__ = [
    "FusedLinearKDLoss",
    "KDLoss",
    "KDOptions",
    "adaptive_kl",
    "forward_kl",
    "fused_linear_kd_loss",
    "jensen_shannon",
    "kd_loss",
    "reverse_kl",
    "skewed_forward_kl",
    "skewed_reverse_kl",
    "sparse_kd_loss",
    "todi",
    "topk_teacher",
    "topk_teacher_from_hidden",
    "total_variation",
]
__version__ = "0.1.0"
