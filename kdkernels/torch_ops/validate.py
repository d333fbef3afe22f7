"""Argument checks of the public API: each raises ``TypeError``/``ValueError`` naming the argument.

They read only Python-level metadata (shapes, dtypes, devices, flags) and Python numbers, never the values of
the logits or labels, so they cost no host synchronisation and are traced away by ``torch.compile``. The one
tensor they may read is a 0-dim CPU tensor given for a float option (see :func:`check_number`).
"""

from __future__ import annotations

import numbers
import os
import sys

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
BACKENDS = ("auto", "triton", "torch", "reference")


def check_logits(name: str, x: object, least: int = 1) -> None:
    """A float tensor of shape ``(..., V)`` with ``V >= least`` (0: a vocabulary slice may be empty)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < least:
        raise ValueError(f"{name} must have shape (..., V) with V >= {least}, got {tuple(x.shape)}")


def check_number(name: str, value: object, *, low: float | None = None, high: float | None = None,
                 closed: bool = False) -> float:
    """``value`` as a float, checked finite and, when bounds are given, inside (low, high) ([low, high] if closed).

    Takes a Python int or float, a NumPy scalar, or a 0-dim CPU tensor (read here: no device is involved). A CUDA
    tensor is refused, as reading it would be a host synchronisation. Under ``torch.compile`` only Python numbers
    are taken: Dynamo traces NumPy scalars and tensors as tensors, whose value cannot be read without a graph break.

    The checks are comparisons, not ``math.isfinite``, so they also run on the symbolic float that
    ``torch.compile`` makes of a value that changes between calls (a temperature schedule, ``dynamic=True``).
    """
    if isinstance(value, torch.Tensor) and not torch.compiler.is_compiling():
        value = _tensor_number(name, value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a float (a Python or NumPy number or a 0-dim CPU tensor; a Python number under "
            f"torch.compile), got {type(value).__name__}"
        )
    value = torch.sym_float(value)
    if not -sys.float_info.max <= value <= sys.float_info.max:  # False for NaN and +-inf
        raise ValueError(f"{name} must be finite, got {value}")
    inside = (lambda a, b: a <= b) if closed else (lambda a, b: a < b)
    if (low is not None and not inside(low, value)) or (high is not None and not inside(value, high)):
        bounds = f"> {low}" if high is None else (f"in [{low}, {high}]" if closed else f"in ({low}, {high})")
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def _tensor_number(name: str, value: torch.Tensor) -> object:
    """The Python number held by a 0-dim CPU tensor given for a float option (see :func:`check_number`)."""
    if value.dim() != 0:
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got a tensor of shape {tuple(value.shape)}")
    if value.device.type != "cpu":
        raise TypeError(
            f"{name} is a tensor on {value.device}: reading it would synchronise with the device; pass a Python float"
        )
    if value.requires_grad:
        raise ValueError(f"{name} requires grad, but the loss has no gradient for it: pass a float or .detach()")
    if value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor")
    return float(value)  # a CPU tensor: a memory read, no device synchronisation


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if isinstance(value, torch.Tensor):  # most likely labels given positionally, as in kd_loss(z, t, labels)
        raise ValueError(f"{name} must be one of {choices}, got a tensor of shape {tuple(value.shape)}: labels and "
                         f"the options are keyword-only, pass labels=...")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_labels(labels: object, student_logits: torch.Tensor) -> None:
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    if tuple(labels.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(
            f"labels must have the leading shape of the logits {tuple(student_logits.shape[:-1])}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != student_logits.device:
        raise ValueError(f"labels is on {labels.device} but student_logits is on {student_logits.device}")


def check_pair(student_logits: object, teacher_logits: object, sliced: bool = False) -> None:
    """Both logits valid, same shape and device; the teacher a constant. ``sliced``: this rank's slices of a
    vocabulary split over a group, which may be empty."""
    check_logits("student_logits", student_logits, least=0 if sliced else 1)
    check_logits("teacher_logits", teacher_logits, least=0 if sliced else 1)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} must match student_logits shape "
            f"{tuple(student_logits.shape)}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"teacher_logits is on {teacher_logits.device} but student_logits is on {student_logits.device}"
        )
    if teacher_logits.requires_grad:
        raise ValueError("teacher_logits requires grad; the teacher is a constant target: pass .detach()")


def check_weight(name: str, weight: object, bias_name: str, bias: object) -> None:
    """An output layer: ``weight`` ``(V, hidden)`` float, ``bias`` None or ``(V,)`` of the weight's dtype."""
    check_logits(name, weight)
    if weight.dim() != 2:
        raise ValueError(f"{name} must have shape (V, hidden), got {tuple(weight.shape)}")
    if bias is None:
        return
    check_logits(bias_name, bias)
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{bias_name} must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"{bias_name} dtype {bias.dtype} must match {name} dtype {weight.dtype}")


def check_hidden(name: str, hidden: object, weight_name: str, weight: torch.Tensor) -> None:
    """Hidden states ``(..., hidden)`` for a checked ``weight`` ``(V, hidden)``: same hidden size and dtype."""
    check_logits(name, hidden)
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{name} hidden size {hidden.shape[-1]} must match {weight_name} shape {tuple(weight.shape)}[1]"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{name} dtype {hidden.dtype} must match {weight_name} dtype {weight.dtype}")


def check_ce(ce_weight: float, labels: torch.Tensor | None) -> None:
    if ce_weight != 0.0 and labels is None:
        raise ValueError("ce_weight != 0 needs labels for the hard-label cross-entropy term")


def resolve_backend(backend: object, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> str:
    """``"auto"`` becomes ``"triton"`` on CUDA tensors and ``"torch"`` elsewhere; ``"triton"`` is checked."""
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "triton" if student_logits.is_cuda else "torch"
    if backend == "triton":
        if not (student_logits.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run the kernels on the CPU "
                "through Triton's interpreter"
            )
        try:
            import triton  # noqa: F401
        except ImportError as err:
            raise ValueError("backend='triton' needs the triton package, which is not installed") from err
        for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
            if x.dtype == torch.float64:
                raise TypeError(f"{name}: the triton backend takes float32, bfloat16 or float16, not float64")
    return backend


def check_vocab_range(vocab_range: object, process_group: object) -> None:
    """``vocab_range`` only with ``process_group`` (its values are checked against the logits where they are
    used, ``vocab_parallel.range_shard``)."""
    if vocab_range is not None and process_group is None:
        raise ValueError("vocab_range gives this rank's slice of a vocabulary split over process_group: pass "
                         "process_group too (or a DTensor, whose mesh gives both)")
