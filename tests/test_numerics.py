"""Exact at any logit magnitude, no silent NaN (issue 10, items 1-4), on every production backend.

Each case compares with the float64 reference on the same (already rounded) inputs:

1. logits shifted by +1e3 and +1e4 (a float32 log-sum-exp of such rows has lost the digits that matter unless
   the row maximum and the log of the sum are kept apart), teacher rows of -1e9 (a common mask value) and the
   CE term on a student row of -1e9 (log V);
2. rows filled with ``finfo.min`` (float32 and bfloat16): ordinary finite (uniform) rows, not empty ones;
3. AKL with ``akl_alpha`` near 1 on wide teachers, where the cut sits at the top token;
4. labels outside ``[0, V)`` with ``ce_weight > 0``: that row's loss and gradient are NaN (not a finite
   gradient under a NaN loss), the other rows are untouched;
5. ``finfo.min`` entries in ordinary rows (a vocabulary padded or masked by value), whose scaled distance to the
   maximum overflows float32: on both sides every divergence is exact, on one side the bounded ones are.
"""

from __future__ import annotations

import math

import pytest
import torch

import kdkernels as kd
from kdkernels.torch_ops import layout
from kdkernels.torch_ops.op import kd_forward
from kdkernels.torch_ops.options import KDOptions, op_args
from kdkernels.torch_ops.reference import akl_weights, log_probs
from tests.utils import (
    BACKENDS,
    TOLERANCE,
    assert_matches_reference,
    divergence_backend,
    full_only,
    loss_and_grad,
    reference_loss_and_grad,
    rel_err,
)

DIVERGENCES = ["fkl", "rkl", "akl", "todi", "sfkl", "srkl", "jsd", "tvd"]


def randn(*shape, seed=0, scale=3.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def check(backend, z, t, divergence, **options):
    options.setdefault("reduction", "none")
    fn = lambda s: kd.kd_loss(s, t, divergence, backend=backend, **options)
    assert_matches_reference(fn, z, t, divergence, **options)


@pytest.mark.parametrize("offset", [1e3, 1e4, -1e4])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_offsets(backend, divergence, offset):
    z = randn(4, 300, seed=1) + offset
    t = randn(4, 300, seed=2) + offset
    labels = torch.tensor([0, 5, 299, -100])
    check(backend, z, t, divergence, labels=labels, ce_weight=0.3, temperature=1.5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_rows_of_minus_1e9(backend, divergence):
    """A teacher row of -1e9 is uniform; a student row of -1e9 too, and its CE is log V."""
    vocab = 64
    z = randn(3, vocab, seed=3)
    t = randn(3, vocab, seed=4)
    t[0] = -1e9
    z[1] = -1e9
    t[2, ::2] = -1e9  # half the vocabulary masked by value, not by -inf
    check(backend, z, t, divergence, temperature=2.0)
    labels = torch.tensor([3, 7, 9])
    check(backend, z, t, divergence, labels=labels, ce_weight=1.0, kd_weight=0.0)
    ce = kd.kd_loss(z[1:2], t[1:2], divergence, labels=labels[1:2], ce_weight=1.0, kd_weight=0.0, backend=backend)
    assert abs(ce.item() - math.log(vocab)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_of_finfo_min(backend, divergence, dtype):
    lowest = torch.finfo(dtype).min
    z = randn(3, 51, seed=5).to(dtype)  # odd V: no flat row's cumulative mass lands exactly on alpha
    t = randn(3, 51, seed=6).to(dtype)
    t[0] = lowest
    z[1] = lowest
    z[2] = t[2] = lowest  # both: every divergence is 0
    loss, _ = loss_and_grad(lambda s: kd.kd_loss(s, t, divergence, reduction="none", backend=backend), z)
    assert torch.isfinite(loss).all() and (loss[0] > 0) and (loss[1] > 0), loss
    check(backend, z, t, divergence)


@pytest.mark.parametrize("temperature", [0.5, 2.0, *full_only(1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence, backend", divergence_backend(DIVERGENCES, BACKENDS))
def test_finfo_min_entries_in_ordinary_rows(backend, divergence, dtype, temperature):
    """Rows of V = 4112 (the Triton stats pass's whole tiles and a partial one) holding ``finfo.min`` entries next to
    ordinary ones, where ``(x - max) log2(e) / T`` overflows: at the same entries of both sides (padding, a range
    inside a tile, all but two entries, a student offset by 1e4) every divergence matches the reference, loss and
    gradient, with the CE term; on the teacher's side only or the student's only, the bounded divergences do, and
    an unbounded one either matches or, where the reference is ~1e37 (``q = 0`` under ``p > 0`` or the reverse), is at
    least 1e30 or +inf: never NaN."""
    lowest = torch.finfo(dtype).min
    vocab = 4112
    z = randn(6, vocab, seed=11, scale=2.0)
    t = randn(6, vocab, seed=12)
    z[0, 4100:] = t[0, 4100:] = lowest
    z[0, 100:300] = t[0, 100:300] = lowest
    z[1] += 1e4
    z[1, -12:] = t[1, -12:] = lowest
    z[2, :] = t[2, :] = lowest
    z[2, [5, 4000]], t[2, [5, 4000]] = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0])
    z[3, 10:20] = t[3, 10:20] = lowest
    t[4, 1000:1500] = lowest
    z[5, 2000:2600] = lowest
    z, t = z.to(dtype), t.to(dtype)
    options = dict(labels=torch.tensor([1, 5, 4000, 3, 7, 9]), temperature=temperature, ce_weight=0.5,
                   reduction="none")
    loss, grad = loss_and_grad(lambda s: kd.kd_loss(s, t, divergence, backend=backend, **options), z)
    ref_loss, ref_grad = reference_loss_and_grad(z, t, divergence, **options)
    assert not loss.isnan().any(), loss
    huge = ref_loss.abs() >= 1e30
    assert not huge[:4].any() and (divergence in ("fkl", "rkl", "akl", "todi") or not huge.any()), ref_loss
    assert (loss[huge] >= 1e30).all(), loss
    tol_loss, tol_grad = TOLERANCE[dtype]
    assert rel_err(loss[~huge], ref_loss[~huge]) <= tol_loss, rel_err(loss[~huge], ref_loss[~huge])
    assert rel_err(grad[~huge], ref_grad[~huge]) <= tol_grad, rel_err(grad[~huge], ref_grad[~huge])


@pytest.mark.parametrize("backend, alpha", [
    (b, a) if b == "torch" or a == 0.999999 else pytest.param(b, a, marks=pytest.mark.full)
    for b in BACKENDS for a in (0.999999, 0.99, 1e-6)
])
def test_akl_alpha_near_its_bounds(backend, alpha):
    z = randn(64, 500, seed=7)
    t = randn(64, 500, seed=8, scale=30.0)
    _, stats = kd_forward(z, t, None, *op_args(KDOptions("akl", akl_alpha=alpha)), backend)
    _, q = log_probs(z.double(), 1.0, torch.float64)
    _, p = log_probs(t.double(), 1.0, torch.float64)
    ref_h, ref_t = akl_weights(p, q, alpha)
    assert torch.allclose(stats[:, layout.R_HEAD].double(), ref_h, atol=2e-6, rtol=0)
    assert torch.allclose(stats[:, layout.R_TAIL].double(), ref_t, atol=2e-6, rtol=0)
    check(backend, z, t, "akl", akl_alpha=alpha)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_label_gives_nan_row(backend, divergence):
    z = randn(4, 40, seed=9)
    t = randn(4, 40, seed=10)
    labels = torch.tensor([1, 40, -5, -100])  # valid, too large, negative (not ignore_index), ignored
    loss, grad = loss_and_grad(lambda s: kd.kd_loss(s, t, divergence, labels=labels, ce_weight=0.5,
                                                    reduction="none", backend=backend), z)
    assert torch.isfinite(loss[0]) and loss[3] == 0
    assert torch.isnan(loss[1:3]).all()
    assert torch.isfinite(grad[0]).all() and (grad[3] == 0).all()
    assert torch.isnan(grad[1:3]).all()
