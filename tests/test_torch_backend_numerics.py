"""The torch backend's float32 numerics against the float64 reference (issue 10, items 1, 2 and 4).

1. Large magnitudes: log-probabilities are ``(x/T - max) - log s``, never ``x/T - lse`` with ``lse`` rounded to
   one float32 number, so logits shifted by 1e3 or 1e4 keep the precision of unshifted ones, a teacher row of
   -1e9 (a common mask value) has the uniform distribution, and the CE of a student row of -1e9 is ``log V``.
2. Rows at the bottom of the float32 range (``finfo.min`` of float32 or bfloat16, -3e38) are ordinary finite
   rows.
4. A label outside ``[0, V)`` with ``ce_weight > 0`` makes that row's loss NaN and its gradient NaN too, with
   no host synchronisation.

Every input is rounded to its dtype first and the reference runs in float64 on the rounded values, so the
errors measured are the backend's own.
"""

from __future__ import annotations

import math

import pytest
import torch

import kdkernels as kd
from tests.test_host_sync import ScalarReads
from tests.utils import assert_matches_reference, loss_and_grad, reference_loss_and_grad

DIVERGENCES = ["fkl", "rkl", "akl", "todi"]


def randn(*shape, seed=0, scale=2.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def torch_loss(teacher, divergence, **kwargs):
    return lambda z: kd.kd_loss(z, teacher, divergence, backend="torch", **kwargs)


def check(student, teacher, divergence, **kwargs):
    """Finite loss and gradient within ``tests.utils.TOLERANCE`` of the float64 reference."""
    assert_matches_reference(torch_loss(teacher, divergence, **kwargs), student, teacher, divergence, **kwargs)


# ---------------------------------------------------------------- 1. large magnitudes


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])  # exact divisions: the scaled logits are not rounded again
@pytest.mark.parametrize("shifts", [(1e3, 1e3), (1e4, 1e4), (1e4, -1e3)], ids=["1e3", "1e4", "1e4,-1e3"])
def test_shifted_logits_keep_float32_precision(shifts, temperature, divergence):
    """Logits around 1e3 or 1e4 (ulp 6e-5 and 1e-3): loss and gradient, with the hard-label term, as accurate
    as for logits around 0 (a float32 ``lse`` would move every probability by up to ``|lse| * 6e-8``)."""
    z = randn(6, 301, seed=1) + shifts[0]
    t = randn(6, 301, seed=2) + shifts[1]
    labels = torch.tensor([0, 17, -100, 300, 5, 150])
    check(z, t, divergence, labels=labels, ce_weight=0.5, temperature=temperature, reduction="none")


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_teacher_row_of_mask_value(divergence, temperature):
    """A teacher row of -1e9 is the uniform distribution (``fl(-1e9 + log V) = -1e9`` would make every ``p``
    1), and so is a student row of -1e9; fkl also with -1e9 on part of a teacher row."""
    z, t = randn(4, 257, seed=3), randn(4, 257, seed=4)
    t[1] = -1e9
    z[2] = -1e9
    if divergence == "fkl":
        t[3, :100] = -1e9
    check(z, t, divergence, temperature=temperature, reduction="none")


def test_cross_entropy_of_student_row_of_mask_value():
    """CE of a student row of -1e9 is ``log V`` with gradient ``1/V - onehot`` (``fl(-1e9 + log V) = -1e9``
    would give CE 0)."""
    vocab = 64
    z, t = randn(3, vocab, seed=5), randn(3, vocab, seed=6)
    z[1] = -1e9
    labels = torch.tensor([2, 9, 40])
    options = dict(labels=labels, kd_weight=0.0, ce_weight=1.0, reduction="none")
    loss, grad = loss_and_grad(torch_loss(t, "fkl", **options), z, grad_seed=0)
    ref_loss, ref_grad = reference_loss_and_grad(z, t, "fkl", **options)
    assert loss[1].item() == pytest.approx(math.log(vocab), rel=1e-6)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- 2. rows at the bottom of the range

BOTTOM = {
    "-3e38": -3e38,
    "float32_min": torch.finfo(torch.float32).min,
    "bfloat16_min": torch.finfo(torch.bfloat16).min,
}


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("fill", BOTTOM.values(), ids=BOTTOM.keys())
def test_rows_at_the_bottom_of_the_range_are_finite_rows(fill, teacher_dtype, divergence):
    """A teacher row, a student row and both rows of one token filled with a value at or below -3e38: ordinary
    finite rows (uniform distributions), not ``-inf`` masks, not NaN."""
    if teacher_dtype == torch.bfloat16 and fill < torch.finfo(torch.bfloat16).min:
        pytest.skip("rounds to -inf in bfloat16")
    z, t = randn(4, 101, seed=7), randn(4, 101, seed=8)  # odd V: no flat-row cumulative sum lands on alpha
    t[1] = fill
    z[2] = fill
    z[3] = t[3] = fill
    check(z, t.to(teacher_dtype), divergence, temperature=2.0, reduction="none")


# ---------------------------------------------------------------- 4. labels outside [0, V)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_out_of_range_label_gives_nan_row_gradient(divergence):
    """Labels ``V`` and ``-7`` (not the ignore index) with ``ce_weight > 0``: NaN loss and an all-NaN gradient
    for those rows, the other rows untouched, an ignored row still 0, and no host synchronisation."""
    vocab = 50
    z, t = randn(5, vocab, seed=9), randn(5, vocab, seed=10)
    labels = torch.tensor([3, vocab, -7, -100, 49])
    options = dict(labels=labels, ce_weight=0.5, reduction="none")
    with ScalarReads() as mode:
        loss, grad = loss_and_grad(torch_loss(t, divergence, **options), z)
    assert not mode.seen, mode.seen
    assert torch.isnan(loss[[1, 2]]).all() and torch.isnan(grad[[1, 2]]).all()
    assert loss[3] == 0 and torch.equal(grad[3], torch.zeros(vocab))
    good = [0, 4]
    clean_loss, clean_grad = loss_and_grad(
        lambda x: kd.kd_loss(x, t[good], divergence, backend="torch", **{**options, "labels": labels[good]}), z[good]
    )
    torch.testing.assert_close(loss[good], clean_loss, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(grad[good]).all()
    assert torch.isnan(kd.kd_loss(z, t, divergence, labels=labels, ce_weight=0.5, backend="torch"))
