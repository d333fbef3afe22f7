"""Property tests with hypothesis (issue 6, item 3), on the torch and Triton backends.

Hypothesis draws shapes, options and a seed; the logits come from a seeded torch generator (so they are
continuous and tie-free, as AKL's head/tail cut needs for the shift property). Example counts are small and
the search is derandomized, so the suite is fast and reproducible in CI.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import kdkernels as kd
from kdkernels.torch_ops.reference import DIVERGENCES
from tests.utils import BACKENDS, assert_near_reference_on_kl_scale, divergence_backend, loss_and_grad

# The Triton backend's divergences in the quick run: AKL's many examples cost minutes under the interpreter; its
# Triton path is checked on fixed inputs elsewhere (test_matrix, test_edge_cases, test_akl_todi).
QUICK = ("fkl", "todi", "jsd")

# Error allowed against the float64 reference on the scale of FKL's, by student dtype: (loss, gradient) (see
# tests/utils.assert_near_reference_on_kl_scale). Looser than tests/utils.TOLERANCE for float32 because random
# cases include log-ratios of ~50 that the analytic gradients cancel (q (d + 1) against q (R + Q)); a wrong
# formula or mask is off by far more (~1).
PROPERTY_TOLERANCE = {torch.float32: (2e-4, 2e-4), torch.bfloat16: (2e-4, 1e-2), torch.float16: (2e-4, 1e-2)}
# Absolute error allowed on top: random cases include losses near 0 (near-equal distributions, down to ~1e-6),
# which float32 evaluates to ~eps |log p| ~ 1e-7 absolute whatever the divergence, FKL included.
ABSOLUTE_FLOOR = 1e-6
# No shrinking: on the Triton interpreter it can take minutes; a failure prints the (unshrunk) example.
PROPERTY_SETTINGS = settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)


@st.composite
def cases(draw, *, dtypes=(torch.float32, torch.bfloat16, torch.float16), neg_inf=True):
    """A random problem: logits ``(N, V)`` and kd_loss keywords (temperature, the divergences' parameters, labels,
    weights)."""
    n_rows = draw(st.integers(1, 4))
    vocab = draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0, 20.0]))
    student_dtype = draw(st.sampled_from(dtypes))
    teacher_dtype = draw(st.sampled_from(dtypes))
    gen = torch.Generator().manual_seed(seed)
    z = (scale * torch.randn(n_rows, vocab, generator=gen)).to(student_dtype)
    t = (scale * torch.randn(n_rows, vocab, generator=gen)).to(teacher_dtype)
    if neg_inf and vocab > 2 and draw(st.booleans()):
        # Mask a few entries in the student, the teacher or both (each row keeps a live entry).
        banned = torch.rand(n_rows, vocab, generator=gen) < 0.2
        banned[:, 0] = False
        where = draw(st.sampled_from(["student", "teacher", "both"]))
        if where in ("student", "both"):
            z = z.masked_fill(banned, float("-inf"))
        if where in ("teacher", "both"):
            t = t.masked_fill(banned, float("-inf"))
    kwargs = dict(
        temperature=draw(st.sampled_from([0.5, 1.0, 2.0, 4.0])),
        akl_alpha=draw(st.sampled_from([0.1, 0.5, 0.9])),
        todi_beta=draw(st.sampled_from([0.5, 1.0, 3.0])),
        skew_lambda=draw(st.sampled_from([1e-6, 0.1, 0.5, 0.9])),
        jsd_beta=draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0])),
    )
    if draw(st.booleans()):
        labels = torch.randint(0, vocab, (n_rows,), generator=gen)
        labels[torch.rand(n_rows, generator=gen) < 0.3] = -100
        labels = torch.where(z.gather(1, labels.clamp(min=0)[:, None])[:, 0] == float("-inf"), -100, labels)
        kwargs.update(labels=labels, ce_weight=draw(st.sampled_from([0.0, 0.5])),
                      kd_weight=draw(st.sampled_from([1.0, 0.5])))
    return z, t, kwargs


def loss_fn(teacher, divergence, backend, **kwargs):
    return lambda z: kd.kd_loss(z, teacher, divergence, backend=backend, **kwargs)


@pytest.mark.parametrize("divergence, backend", divergence_backend(DIVERGENCES, BACKENDS, QUICK))
@PROPERTY_SETTINGS
@given(case=cases(), reduction=st.sampled_from(["mean", "sum", "none"]))
def test_matches_reference(divergence, backend, case, reduction):
    """Random shapes, dtypes, masks, labels and options: loss and gradient agree with the float64 reference."""
    z, t, kwargs = case
    loss, grad = loss_and_grad(loss_fn(t, divergence, backend, reduction=reduction, **kwargs), z)
    assert loss.dtype == torch.float32 and grad.dtype == z.dtype
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_near_reference_on_kl_scale(loss, grad, z, t, divergence, PROPERTY_TOLERANCE[z.dtype], ABSOLUTE_FLOOR,
                                      reduction=reduction, **kwargs)


@pytest.mark.parametrize("divergence, backend", divergence_backend(DIVERGENCES, BACKENDS, QUICK))
@PROPERTY_SETTINGS
@given(case=cases(neg_inf=False))
def test_non_negative(divergence, backend, case):
    """Every row of every divergence (any parameters) is >= 0 on finite logits.

    (todi: each term ``(c q - w p)(lq - lp)`` is >= 0 because ``c > w`` exactly when ``lq > lp``; sfkl, srkl and jsd
    are KL divergences to a mixture. With ``-inf`` masks the masked sums are no longer divergences of full
    distributions and can dip below 0, except tvd's.)
    """
    z, t, kwargs = case
    kwargs.update(labels=None, ce_weight=0.0)
    rows = kd.kd_loss(z, t, divergence, reduction="none", backend=backend, **kwargs)
    assert (rows >= -1e-6).all(), rows


@pytest.mark.parametrize("divergence, backend", divergence_backend(DIVERGENCES, BACKENDS, QUICK))
@PROPERTY_SETTINGS
@given(case=cases(dtypes=(torch.float32, torch.bfloat16)))
def test_zero_when_student_equals_teacher(divergence, backend, case):
    """Student equal to teacher (same dtype, same ``-inf`` entries): loss and gradient are 0 (to rounding)."""
    z, _, kwargs = case
    kwargs.update(labels=None, ce_weight=0.0)
    loss, grad = loss_and_grad(loss_fn(z.clone(), divergence, backend, reduction="none", **kwargs), z)
    assert loss.abs().max() <= 1e-6, loss
    assert grad.float().abs().max() <= 1e-6, grad


@pytest.mark.parametrize("divergence, backend", divergence_backend(DIVERGENCES, BACKENDS, QUICK))
@PROPERTY_SETTINGS
@given(case=cases(dtypes=(torch.float32,)), shift=st.integers(-64, 64), which=st.sampled_from(["student", "teacher"]))
def test_shift_invariance(divergence, backend, case, shift, which):
    """Adding a constant to every logit of one row of the student or the teacher changes neither the loss nor
    the gradient (beyond float32 rounding of the shifted logits); the cross-entropy term is invariant too."""
    z, t, kwargs = case
    loss, grad = loss_and_grad(loss_fn(t, divergence, backend, reduction="none", **kwargs), z)
    if which == "student":
        z = z.clone()
        z[0] += shift
    else:
        t = t.clone()
        t[0] += shift
    shifted_loss, shifted_grad = loss_and_grad(loss_fn(t, divergence, backend, reduction="none", **kwargs), z)
    scale = 1e-4 * max(1.0, float(z.abs().max()), float(t.abs().max()))
    torch.testing.assert_close(shifted_loss, loss, rtol=1e-4, atol=scale)
    torch.testing.assert_close(shifted_grad, grad, rtol=1e-4, atol=scale)


@pytest.mark.parametrize("divergence, backend", divergence_backend(DIVERGENCES, BACKENDS, QUICK))
@PROPERTY_SETTINGS
@given(case=cases(dtypes=(torch.float32,)))
def test_gradient_rows_sum_to_zero(divergence, backend, case):
    """Each row's gradient sums to 0 over the vocabulary (softmax is invariant to a shift of the row), with
    ``-inf`` masks, labels and the cross-entropy term included."""
    z, t, kwargs = case
    _, grad = loss_and_grad(loss_fn(t, divergence, backend, reduction="sum", **kwargs), z)
    # Rounding grows with the log-ratios that the gradient cancels, at most (|z| + |t|) / T.
    finite = lambda x: x[torch.isfinite(x)].abs().max() if torch.isfinite(x).any() else torch.tensor(0.0)
    spread = 1.0 + (finite(z) + finite(t)).item() / kwargs["temperature"]
    bound = 1e-6 * spread * grad.abs().sum(-1).clamp(min=1.0)
    assert (grad.sum(-1).abs() <= bound).all(), (grad.sum(-1), bound)
