"""Shared test helpers: backends under test, tolerances and comparison with the float64 reference."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kdkernels.torch_ops.reference import kd_loss_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
# Production backends compared with the reference; "triton" runs through the interpreter without a GPU.
BACKENDS = ["torch", "triton"] if HAS_TRITON else ["torch"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def full_only(*values) -> list:
    """Parametrize values that only the exhaustive run takes (``KDKERNELS_FULL=1``, CI; see ``conftest.py``)."""
    return [pytest.param(value, marks=pytest.mark.full) for value in values]


# One divergence per kernel path (fkl: the KL pair's two passes; todi and jsd: the finish pass without and with the
# mixture; akl: its own passes): those the quick run gives the Triton backend, where each call costs seconds.
QUICK_DIVERGENCES = ("fkl", "akl", "todi", "jsd")


def divergence_backend(divergences, backends, quick=QUICK_DIVERGENCES) -> list:
    """``("divergence, backend")`` parameters: every pair; the Triton backend's outside ``quick`` are marked ``full``
    (the other backends are cheap)."""
    return [pytest.param(d, b, marks=pytest.mark.full) if b == "triton" and d not in quick else (d, b)
            for b in backends for d in divergences]


# Relative norm error allowed against the float64 reference, by student dtype: (loss, gradient).
TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
    torch.bfloat16: (1e-4, 1e-2),
    torch.float16: (1e-4, 1e-2),
}


# An expected norm below this is a float64 rounding of an exact 0 (at V = 1 the baselines' mixture
# log(l p + (1 - l) q) is ~1e-17, not 0): the error is then taken as absolute.
ZERO_NORM = 1e-12


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (absolute error when ``||expected|| <= ZERO_NORM``)."""
    actual, expected = actual.double(), expected.double()
    diff = (actual - expected).norm().item()
    scale = expected.norm().item()
    return diff / scale if scale > ZERO_NORM else diff


def loss_and_grad(fn, student: torch.Tensor, grad_seed: int = 0):
    """Loss ``fn(student)`` and the gradient of ``sum(loss * w)`` for a fixed random weight ``w``."""
    z = student.detach().clone().requires_grad_(True)
    loss = fn(z)
    weight = torch.rand(loss.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    (loss * weight.to(loss.dtype).to(loss.device)).sum().backward()
    return loss.detach(), z.grad


def reference_loss_and_grad(student, teacher, divergence, **kwargs):
    """The float64 reference on the same (already rounded) inputs."""
    t64 = teacher.detach().double()
    return loss_and_grad(lambda z: kd_loss_reference(z, t64, divergence, **kwargs), student.double())


def assert_matches_reference(loss_fn, student, teacher, divergence, **kwargs):
    """Loss and gradient of ``loss_fn(z)`` match the float64 reference within the dtype's tolerance."""
    loss, grad = loss_and_grad(loss_fn, student)
    ref_loss, ref_grad = reference_loss_and_grad(student, teacher, divergence, **kwargs)
    assert grad.dtype == student.dtype
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    tol_loss, tol_grad = TOLERANCE[student.dtype]
    assert rel_err(loss, ref_loss) <= tol_loss, (rel_err(loss, ref_loss), tol_loss)
    assert rel_err(grad, ref_grad) <= tol_grad, (rel_err(grad, ref_grad), tol_grad)


def assert_near_reference_on_kl_scale(loss, grad, student, teacher, divergence, tolerance, floor=0.0, **kwargs):
    """``loss`` and ``grad`` (of ``student``) against the float64 reference on the same rounded inputs:
    ``||ours - reference|| <= tol * max(||reference||, ||FKL reference||) + floor`` for each, with
    ``tolerance = (tol_loss, tol_grad)``.

    Why the scale of FKL on the same inputs: float32 log-probabilities err by ~eps |log p|, so a loss or gradient
    formed from them errs on the scale of a KL and its gradient, however small it is itself. It is far smaller where
    a mixture nearly equals one of its arguments (``skew_lambda -> 1``, ``jsd_beta -> 0`` or ``1``) or where the
    bounded baselines saturate (a student probability near 1: their gradient vanishes, while rounding leaves
    ~eps of it); elsewhere the divergences are of the KL's size and this is a relative tolerance. ``floor`` is an
    absolute allowance for losses near 0 (near-equal distributions), where even FKL's own error is ~eps.
    """
    ref_loss, ref_grad = reference_loss_and_grad(student, teacher, divergence, **kwargs)
    kl_loss, kl_grad = reference_loss_and_grad(student, teacher, "fkl", **kwargs)
    for name, ours, ref, kl, tol in (("loss", loss, ref_loss, kl_loss, tolerance[0]),
                                     ("grad", grad, ref_grad, kl_grad, tolerance[1])):
        error = (ours.double() - ref).norm().item()
        scale = max(ref.norm().item(), kl.norm().item())
        assert error <= tol * scale + floor, (name, error, scale, tol, floor)
