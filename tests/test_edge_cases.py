"""Edge cases on every backend (issue 6, item 2).

Empty batches, V = 1, all-ignored batches, ``-inf`` masks, NaN/``+inf`` rows, extreme logits and
temperatures, non-contiguous inputs and mixed dtypes. The conventions checked here (SPEC §1-3):

- an entry where the student or the teacher logit is ``-inf`` is masked: it adds nothing to the sums and has
  probability 0; a row whose logits are all ``-inf`` has probabilities 0, divergence 0 and gradient 0;
- NaN or ``+inf`` anywhere in a row makes that row's loss NaN and leaves the other rows untouched;
- an ignored row has loss 0 and gradient 0; ``"mean"`` over a batch with no kept row is 0;
- the gradient has the student's dtype; the loss is float32 (float64 when an input is float64).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import kdkernels as kd
from tests.utils import (
    BACKENDS,
    assert_matches_reference,
    divergence_backend,
    loss_and_grad,
    reference_loss_and_grad,
    rel_err,
)

ALL_BACKENDS = [*BACKENDS, "reference"]
DIVERGENCES = ["fkl", "rkl", "akl", "todi", "sfkl", "srkl", "jsd", "tvd"]
NEG_INF = float("-inf")


def randn(*shape, seed=0, scale=2.0, dtype=torch.float32):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


def run(backend, student, teacher, divergence, **kwargs):
    """Loss and gradient (of ``sum(loss * random weight)``) of ``kd_loss`` on one backend."""
    return loss_and_grad(lambda z: kd.kd_loss(z, teacher, divergence, backend=backend, **kwargs), student)


def check_reference(backend, student, teacher, divergence, **kwargs):
    """Loss and gradient match the float64 reference (finite, student-dtype gradient)."""
    fn = lambda z: kd.kd_loss(z, teacher, divergence, backend=backend, **kwargs)
    assert_matches_reference(fn, student, teacher, divergence, **kwargs)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("divergence, backend", divergence_backend(DIVERGENCES, ALL_BACKENDS))
def test_no_rows(divergence, backend):
    """N = 0 (also as a (2, 0, V) batch): loss 0 (or an empty tensor), an empty gradient, no error."""
    for shape, reduction in itertools.product([(0, 16), (2, 0, 16)], ["mean", "sum", "none"]):
        z = torch.zeros(shape, requires_grad=True)
        labels = torch.zeros(shape[:-1], dtype=torch.long)
        loss = kd.kd_loss(z, torch.zeros(shape), divergence, labels=labels, ce_weight=0.5, reduction=reduction,
                          backend=backend)
        assert loss.dtype == torch.float32
        if reduction == "none":
            assert loss.shape == shape[:-1]
        else:
            assert loss.shape == () and loss.item() == 0.0
        loss.sum().backward()
        assert z.grad.shape == shape


@pytest.mark.parametrize("divergence, backend", divergence_backend(DIVERGENCES, ALL_BACKENDS))
def test_single_entry_vocabulary(divergence, backend):
    """V = 1: both distributions are [1], so every divergence, the CE and the gradient are exactly 0 (the
    reference's mixtures within a rounding: its ``logaddexp(log l, log1p(-l))`` is an ulp from 0)."""
    z, t = randn(4, 1, seed=1), randn(4, 1, seed=2)
    labels = torch.zeros(4, dtype=torch.long)
    loss, grad = run(backend, z, t, divergence, labels=labels, ce_weight=0.5, reduction="none")
    if backend == "reference" and divergence in ("sfkl", "srkl", "jsd"):
        torch.testing.assert_close(loss, torch.zeros(4), rtol=0, atol=1e-7)
    else:
        assert torch.equal(loss, torch.zeros(4))
    assert torch.equal(grad, torch.zeros(4, 1))


# ---------------------------------------------------------------- ignored rows


@pytest.mark.parametrize("divergence, backend", divergence_backend(DIVERGENCES, ALL_BACKENDS))
def test_every_row_ignored(divergence, backend):
    """All labels equal ignore_index: loss 0 (mean included, no 0/0), gradient exactly 0, no NaN."""
    z, t = randn(2, 2, 24, seed=3), randn(2, 2, 24, seed=4)
    labels = torch.full((2, 2), -1, dtype=torch.long)
    for reduction in ["mean", "sum", "none"]:
        loss, grad = run(backend, z, t, divergence, labels=labels, ignore_index=-1, ce_weight=0.5,
                         reduction=reduction)
        assert torch.equal(loss, torch.zeros(loss.shape)), reduction
        assert torch.equal(grad, torch.zeros_like(grad)), reduction


@pytest.mark.parametrize("divergence, backend", divergence_backend(DIVERGENCES, BACKENDS))
def test_ignored_rows_may_hold_garbage(divergence, backend):
    """Ignored rows are not read: NaN/inf logits there (e.g. padding) leave the loss and gradient finite.

    Production backends only; the reference computes every row and masks afterwards.
    """
    z, t = randn(4, 24, seed=5), randn(4, 24, seed=6)
    z[1], t[1, 3], t[3, 0] = float("nan"), float("inf"), float("nan")
    labels = torch.tensor([2, -100, 5, -100])
    loss, grad = run(backend, z, t, divergence, labels=labels, ce_weight=0.5, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert loss[1] == 0 and loss[3] == 0
    assert torch.equal(grad[[1, 3]], torch.zeros(2, 24))
    clean, clean_grad = run(backend, z[[0, 2]], t[[0, 2]], divergence, labels=labels[[0, 2]], ce_weight=0.5,
                            reduction="none")
    torch.testing.assert_close(loss[[0, 2]], clean)


# ---------------------------------------------------------------- -inf masks


def inf_batch(dtype=torch.float32):
    """Logits (10, 24) with ``-inf`` in every pattern; returns ``(z, t, dead_rows)``.

    Rows: 0 student entries, 1 teacher entries, 2 both at the same entries, 3 both at different entries,
    4 a student row of all ``-inf``, 5 a teacher row of all ``-inf``, 6 both rows all ``-inf``,
    7 a student row with one live entry, 8 a teacher row with one live entry, 9 clean.
    """
    z, t = randn(10, 24, seed=7, dtype=dtype), randn(10, 24, seed=8, dtype=dtype)
    z[0, [0, 7, 23]] = NEG_INF
    t[1, [1, 7, 22]] = NEG_INF
    z[2, [2, 9]] = NEG_INF
    t[2, [2, 9]] = NEG_INF
    z[3, [0, 4]] = NEG_INF
    t[3, [4, 11, 12]] = NEG_INF
    z[4] = NEG_INF
    t[5] = NEG_INF
    z[6] = NEG_INF
    t[6] = NEG_INF
    z[7, 1:] = NEG_INF
    t[8, :-1] = NEG_INF
    return z, t, [4, 5, 6]


@pytest.mark.parametrize("divergence, backend", divergence_backend(DIVERGENCES, ALL_BACKENDS))
def test_neg_inf_masks(divergence, backend):
    """``-inf`` in the student, the teacher or both (entries or whole rows): the loss and gradient are finite
    and match the reference, a student ``-inf`` entry gets gradient exactly 0, and a row of all ``-inf``
    (student or teacher) has divergence 0 and gradient 0."""
    z, t, dead = inf_batch()
    labels = torch.tensor([3, 5, 8, 10, 13, -100, 20, 0, 2, 6])  # never at a student -inf entry
    kwargs = dict(labels=labels, reduction="none", temperature=1.5)
    check_reference(backend, z, t, divergence, **kwargs)
    loss, grad = run(backend, z, t, divergence, **kwargs)
    assert torch.equal(grad[z == NEG_INF], torch.zeros_like(grad[z == NEG_INF]))
    assert torch.equal(loss[dead], torch.zeros(len(dead)))
    assert torch.equal(grad[dead], torch.zeros(len(dead), 24))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_label_on_masked_student_entry_is_infinite(backend):
    """With ce_weight > 0, a label pointing at a student ``-inf`` entry gives CE = +inf (not a finite lie)."""
    z, t = randn(2, 16, seed=9), randn(2, 16, seed=10)
    z[0, 4] = NEG_INF
    loss = kd.kd_loss(z, t, "fkl", labels=torch.tensor([4, 4]), ce_weight=0.5, reduction="none", backend=backend)
    assert loss[0] == float("inf") and torch.isfinite(loss[1])


# ---------------------------------------------------------------- NaN and +inf

BAD_ROWS = {1: ("student", float("nan")), 3: ("teacher", float("nan")), 4: ("student", float("inf")),
            6: ("teacher", float("inf"))}


@pytest.mark.parametrize("divergence, backend", divergence_backend(DIVERGENCES, ALL_BACKENDS))
def test_invalid_values_poison_only_their_row(divergence, backend):
    """NaN or ``+inf`` in the student or the teacher: that row's loss is NaN (never a finite number) and its
    gradient not finite, the mean is NaN, and the other rows' losses equal those of the batch without the
    bad rows, with finite gradients."""
    z, t = randn(8, 24, seed=11), randn(8, 24, seed=12)
    for row, (where, bad) in BAD_ROWS.items():
        (z if where == "student" else t)[row, 5] = bad
    loss, grad = run(backend, z, t, divergence, reduction="none")
    for row, (where, bad) in BAD_ROWS.items():
        assert torch.isnan(loss[row]), f"row with {bad} in the {where} gave loss {loss[row].item()}"
        assert not torch.isfinite(grad[row]).all(), f"row with {bad} in the {where} gave a finite gradient"
    good = [0, 2, 5, 7]
    clean, _ = run(backend, z[good], t[good], divergence, reduction="none")
    torch.testing.assert_close(loss[good], clean, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(grad[good]).all()
    assert torch.isnan(kd.kd_loss(z, t, divergence, backend=backend))


# ---------------------------------------------------------------- extreme values

# Extreme inputs make float32 log-ratios d = lq - lp of size |z| / T, and the gradients cancel terms of that
# size (q (d + 1) against q R), so they lose about |d| * eps of relative precision: looser bounds than
# tests/utils.TOLERANCE, still far below what a wrong formula or a mishandled overflow gives (O(1)).
EXTREME_TOLERANCE = {
    torch.float32: (1e-4, 3e-3),
    torch.bfloat16: (1e-3, 3e-2),
    torch.float16: (1e-3, 5e-2),
}


def check_extreme(backend, student, teacher, divergence, **kwargs):
    """Finite, student-dtype gradient; loss and gradient within EXTREME_TOLERANCE of the float64 reference."""
    loss, grad = run(backend, student, teacher, divergence, **kwargs)
    ref_loss, ref_grad = reference_loss_and_grad(student, teacher, divergence, **kwargs)
    assert grad.dtype == student.dtype
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    tol_loss, tol_grad = EXTREME_TOLERANCE[student.dtype]
    assert rel_err(loss, ref_loss) <= tol_loss, (rel_err(loss, ref_loss), tol_loss)
    assert rel_err(grad, ref_grad) <= tol_grad, (rel_err(grad, ref_grad), tol_grad)


@pytest.mark.parametrize("divergence, backend", divergence_backend(DIVERGENCES, ALL_BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_huge_logits(dtype, divergence, backend):
    """Logits of size 1e4 (nearly one-hot distributions, log-ratios of 1e4): finite and matching the reference."""
    z = randn(3, 40, seed=13, scale=1e4, dtype=dtype)
    t = randn(3, 40, seed=14, scale=1e4, dtype=dtype)
    z[0, :3] = 1e4
    t[0, :3] = -1e4
    z[1] = t[1]  # equal rows: loss 0
    check_extreme(backend, z, t, divergence, reduction="none")


@pytest.mark.parametrize("divergence, backend", divergence_backend(DIVERGENCES, ALL_BACKENDS))
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_float16_extremes(temperature, divergence, backend):
    """float16 logits at the format's extremes (+-65504, subnormals, 0, -0.0): no overflow, finite results
    matching the reference, at T = 1 and T = 0.05 (scaled logits of 1.3e6)."""
    info = torch.finfo(torch.float16)
    z = randn(4, 32, seed=15, scale=4.0, dtype=torch.float16)
    t = randn(4, 32, seed=16, scale=4.0, dtype=torch.float16)
    z[0, :4] = torch.tensor([info.max, -info.max, info.smallest_normal, 0.0])
    t[0, :4] = torch.tensor([-info.max, info.max, -0.0, info.smallest_normal / 4])
    z[1, :] = -info.max
    z[1, 7] = info.max
    t[2, :] = info.max  # a flat teacher row at the top of the range
    t[3, ::2] = -info.max
    check_extreme(backend, z, t, divergence, reduction="none", temperature=temperature)


@pytest.mark.parametrize("divergence, backend", divergence_backend(DIVERGENCES, ALL_BACKENDS))
@pytest.mark.parametrize("temperature", [0.05, 100.0])
def test_extreme_temperatures(temperature, divergence, backend):
    """T = 0.05 (logits scaled by 20, near one-hot) and T = 100 (near uniform): match the reference."""
    z, t = randn(4, 48, seed=17, scale=3.0), randn(4, 48, seed=18, scale=3.0)
    labels = torch.tensor([1, 2, -100, 47])
    check_extreme(backend, z, t, divergence, labels=labels, ce_weight=0.5, temperature=temperature,
                  reduction="sum")


# ---------------------------------------------------------------- layouts and dtypes


def _views():
    """Non-contiguous views of shape (..., V): name -> (student view, teacher view)."""
    base_z, base_t = randn(3, 24, seed=19), randn(3, 24, seed=20)
    wide_z, wide_t = randn(3, 30, seed=21), randn(3, 30, seed=22)
    cube_z, cube_t = randn(2, 2, 12, seed=23), randn(2, 2, 12, seed=24)
    return {
        "transposed": (base_z[:, :12].t(), base_t[:, :12].t().contiguous()),  # (12, 3): vocabulary stride 24
        "vocab_stride_2": (base_z[..., ::2], base_t[..., ::2]),  # (3, 12): vocabulary stride 2
        "row_slice": (wide_z[:, 5:21], wide_t[:, 5:21]),  # (3, 16): row stride 30, offset 5
        "permuted_3d": (cube_z.transpose(0, 1), cube_t.transpose(0, 1)),  # (2, 2, 12)
        "broadcast_teacher": (base_z, base_t[0].expand(3, 24)),  # teacher row stride 0
    }


@pytest.mark.parametrize("divergence, backend", divergence_backend(DIVERGENCES, ALL_BACKENDS))
def test_non_contiguous_inputs(divergence, backend):
    """Transposed, strided, sliced, permuted and broadcast views (and strided labels) give the loss and
    gradient of their contiguous copies (handled or copied, never read wrongly); the gradient has the view's
    shape."""
    for name, (z, t) in _views().items():
        labels = torch.arange(z[..., 0].numel()).reshape(z.shape[:-1]) % z.shape[-1]
        labels.view(-1)[1] = -100
        labels = labels.t().contiguous().t() if labels.dim() == 2 else labels  # column-major labels
        kwargs = dict(labels=labels, ce_weight=0.25, reduction="none", temperature=2.0)
        student = z.detach().requires_grad_(True)  # a leaf with the view's strides
        loss = kd.kd_loss(student, t, divergence, backend=backend, **kwargs)
        (grad,) = torch.autograd.grad(loss.sum(), student)
        z_c = z.contiguous().requires_grad_(True)
        expected = kd.kd_loss(z_c, t.contiguous(), divergence, backend="reference",
                              **{**kwargs, "labels": labels.contiguous()})
        (expected_grad,) = torch.autograd.grad(expected.sum(), z_c)
        assert grad.shape == z.shape, name
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_labels(backend):
    """A strided labels view (every other element of a longer tensor) is read correctly."""
    z, t = randn(4, 16, seed=25), randn(4, 16, seed=26)
    labels = torch.tensor([3, 0, -100, 0, 7, 0, 15, 0])[::2]
    loss = kd.kd_loss(z, t, "fkl", labels=labels, ce_weight=1.0, reduction="none", backend=backend)
    expected = kd.kd_loss(z, t, "fkl", labels=labels.contiguous(), ce_weight=1.0, reduction="none",
                          backend="reference")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


MIXED = [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("divergence, backend", divergence_backend(DIVERGENCES, ALL_BACKENDS))
@pytest.mark.parametrize(("student_dtype", "teacher_dtype"), MIXED, ids=lambda d: str(d).split(".")[-1])
def test_mixed_dtypes(student_dtype, teacher_dtype, divergence, backend):
    """Student and teacher of different dtypes: a float32 loss, a gradient in the student's dtype, and both
    matching the float64 reference on the same rounded inputs."""
    z = randn(3, 40, seed=27, dtype=student_dtype)
    t = randn(3, 40, seed=28, dtype=teacher_dtype)
    labels = torch.tensor([0, 39, -100])
    kwargs = dict(labels=labels, ce_weight=0.5, temperature=2.0)
    loss, grad = run(backend, z, t, divergence, **kwargs)
    assert loss.dtype == torch.float32 and grad.dtype == student_dtype
    check_reference(backend, z, t, divergence, **kwargs)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("other", [torch.float32, torch.bfloat16])
def test_float64_gives_float64_loss(other, backend):
    """On the torch and reference backends a float64 input gives a float64 loss; the gradient keeps the
    student's dtype."""
    z, t = randn(3, 20, seed=29, dtype=torch.float64), randn(3, 20, seed=30, dtype=other)
    loss, grad = run(backend, z, t, "todi")
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64
    loss, grad = run(backend, t, z, "todi")
    assert loss.dtype == torch.float64 and grad.dtype == other
