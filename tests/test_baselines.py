"""The baseline divergences of SPEC §2b (issue 11): ``sfkl``, ``srkl``, ``jsd`` and ``tvd``.

- Every backend (torch, Triton, and the reference in float32) against the float64 reference over their parameters
  (``skew_lambda`` from 1e-6 to 1 - 1e-6, ``jsd_beta`` from 0 to 1), with ``T != 1``, the reductions, ignored rows,
  ``-inf`` entries, float32 and bfloat16 inputs, logits near 1e4 and rows of mask values.
- ``jsd`` at ``jsd_beta`` 0 and 1 is ``fkl`` and ``rkl``; at 0.5 it is the ToDi authors' ``js_divergence``; at every
  beta it is TRL's ``generalized_jsd_loss``. Both are written out here from their definitions (neither is imported).
- Properties (hypothesis) that hold for these and not for the others: the skewed KLs lie between ``(1 - l)`` times
  the KL and the KL minus ``l`` times a chi-square (so ``sfkl -> fkl`` as ``l -> 0``), ``jsd`` is symmetric under
  swapping student, teacher and ``beta <-> 1 - beta``, and ``tvd`` obeys Pinsker's inequality. The generic properties
  (non-negative, zero at equality, shift invariance, gradient rows summing to 0) run in ``test_properties.py``.
- ``gradcheck`` at non-default parameters; a compiled ``jsd_beta`` / ``skew_lambda`` schedule (``fullgraph=True``)
  that crosses the ``jsd`` end points; the parameter checks.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import kdkernels as kd
from tests.test_matrix import make_batch
from tests.test_properties import PROPERTY_SETTINGS, cases
from tests.utils import BACKENDS, TOLERANCE, assert_near_reference_on_kl_scale, loss_and_grad, rel_err

BASELINES = ["sfkl", "srkl", "jsd", "tvd"]
ALL_BACKENDS = BACKENDS + ["reference"]
LAMBDAS = [1e-6, 0.1, 0.5, 1 - 1e-6]
BETAS = [0.0, 1e-6, 0.25, 0.5, 1.0]
PARAMETERS = (
    [("sfkl", dict(skew_lambda=lam)) for lam in LAMBDAS]
    + [("srkl", dict(skew_lambda=lam)) for lam in LAMBDAS]
    + [("jsd", dict(jsd_beta=beta)) for beta in BETAS]
    + [("tvd", {})]
)
PARAMETER_IDS = [f"{d}-{next(iter(p.values()), '')}" for d, p in PARAMETERS]


def batch(n_rows, vocab, dtype, seed):
    """``tests.test_matrix.make_batch`` with row 4's label on a finite student entry (a finite CE term)."""
    z, t, labels = make_batch(n_rows, vocab, dtype, seed=seed)
    labels[4] = 1
    return z, t, labels


def kd_fn(teacher, divergence, backend, **options):
    return lambda z: kd.kd_loss(z, teacher, divergence, backend=backend, **options)


def assert_close_to_reference(backend, z, t, divergence, **options):
    """Loss and gradient of ``kd_loss`` on ``backend`` within ``tests.utils.TOLERANCE`` of the float64 reference, on
    the scale of FKL's (``assert_near_reference_on_kl_scale``: at ``skew_lambda = 1 - 1e-6`` or ``jsd_beta = 1e-6``
    the divergence is ~1e-7 here, far below its float32 rounding on the KL's scale)."""
    loss, grad = loss_and_grad(kd_fn(t, divergence, backend, **options), z)
    assert loss.dtype == torch.float32 and grad.dtype == z.dtype
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_near_reference_on_kl_scale(loss, grad, z, t, divergence, TOLERANCE[z.dtype], **options)


# ---------------------------------------------------------------- every backend against the reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence, params", PARAMETERS, ids=PARAMETER_IDS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_parameters_match_reference(backend, divergence, params, dtype):
    """Row losses and gradients over the parameter range at ``T = 1.5``, with an ignored row, ``-inf`` entries in
    the student, the teacher and both, and the hard-label term; student and teacher in ``dtype``."""
    z, t, labels = batch(6, 131, dtype, seed=11)
    options = dict(labels=labels, temperature=1.5, reduction="none", kd_weight=0.7, ce_weight=0.2, **params)
    assert_close_to_reference(backend, z, t, divergence, **options)


@pytest.mark.parametrize("temperature", [0.5, 3.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("divergence", BASELINES)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_reductions_and_temperatures(backend, divergence, reduction, temperature):
    """Each reduction at two temperatures on a 3-D batch, odd parameters, labels with an ignored row, a float32
    student and a bfloat16 teacher."""
    z, t, labels = batch(6, 37, torch.float32, seed=12)
    t = t.to(torch.bfloat16)
    z, t, labels = z.reshape(2, 3, 37), t.reshape(2, 3, 37), labels.reshape(2, 3)
    options = dict(labels=labels, temperature=temperature, reduction=reduction, skew_lambda=0.3, jsd_beta=0.7)
    assert_close_to_reference(backend, z, t, divergence, **options)


@pytest.mark.parametrize("divergence", BASELINES)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_all_rows_ignored(backend, divergence):
    """Every row ignored: the mean is 0 with a zero gradient, not NaN."""
    z, t, _ = make_batch(3, 20, torch.float32, seed=13)
    labels = torch.full((3,), -100)
    loss, grad = loss_and_grad(kd_fn(t, divergence, backend, labels=labels), z)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(z))


@pytest.mark.parametrize("divergence", BASELINES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [1e4, -1e3], ids=["1e4", "-1e3"])
def test_large_logits_and_mask_values(shift, backend, divergence):
    """Logits near 1e4 keep float32 precision, a row of -1e9 (a mask value) or of float32's ``finfo.min`` is an
    ordinary uniform row, part of a row at -1e9 is probability ~0, not a ``-inf`` mask."""
    gen = torch.Generator().manual_seed(14)
    z = 2 * torch.randn(6, 301, generator=gen) + 1e4
    t = 2 * torch.randn(6, 301, generator=gen) + shift
    t[1] = -1e9
    z[2] = -1e9
    z[3] = t[3] = torch.finfo(torch.float32).min
    t[4, :100] = -1e9
    z[5, 200:] = -1e9
    options = dict(temperature=2.0, reduction="none", skew_lambda=0.2, jsd_beta=0.4)
    assert_close_to_reference(backend, z, t, divergence, **options)


# ---------------------------------------------------------------- jsd against fkl, rkl, ToDi's and TRL's definitions


@pytest.mark.parametrize("beta, kl", [(0.0, "fkl"), (1.0, "rkl")])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_jsd_end_points_are_kl(backend, beta, kl):
    """``jsd_beta`` 0 is exactly ``fkl`` and 1 exactly ``rkl`` (TRL's convention), loss and gradient, bit for bit."""
    z, t, labels = batch(5, 50, torch.float32, seed=15)
    options = dict(labels=labels, temperature=2.0, reduction="none", ce_weight=0.5)
    loss, grad = loss_and_grad(kd_fn(t, "jsd", backend, jsd_beta=beta, **options), z)
    kl_loss, kl_grad = loss_and_grad(kd_fn(t, kl, backend, **options), z)
    assert torch.equal(loss, kl_loss) and torch.equal(grad, kl_grad)


def authors_js_divergence(z, t, temperature):
    """The ToDi (and DSKD) authors' ``js_divergence`` per row, from its definition: ``m = (p + q) / 2`` and
    ``0.5 KL(p || m) + 0.5 KL(q || m)``, in float64 without the epsilon their code adds inside the logarithm."""
    p = torch.softmax(t.double() / temperature, -1)
    q = torch.softmax(z.double() / temperature, -1)
    m = 0.5 * (p + q)
    return 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_jsd_half_is_authors_js_divergence(backend):
    """``jsd`` at ``jsd_beta = 0.5`` is the authors' Jensen-Shannon divergence (value and gradient), on finite
    logits."""
    gen = torch.Generator().manual_seed(16)
    z, t = 3 * torch.randn(4, 40, generator=gen), 3 * torch.randn(4, 40, generator=gen)
    loss, grad = loss_and_grad(kd_fn(t, "jsd", backend, jsd_beta=0.5, temperature=2.0, reduction="none"), z)
    ref_loss, ref_grad = loss_and_grad(lambda s: authors_js_divergence(s, t, 2.0), z.double())
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5


def trl_generalized_jsd(student_logits, teacher_logits, labels, beta, temperature):
    """TRL's ``generalized_jsd_loss`` (reduction ``"batchmean"``) from its documented definition, in float64:
    ``beta KL(p || m) + (1 - beta) KL(q || m)`` with the mixture ``m = beta p + (1 - beta) q`` formed in log space, the
    teacher ``p`` and student ``q`` at temperature ``T``, ``KL(p || q)`` at ``beta = 0`` and ``KL(q || p)`` at
    ``beta = 1``, summed over the vocabulary and averaged over the tokens whose label is not -100."""
    log_q = torch.log_softmax(student_logits.double() / temperature, -1)
    log_p = torch.log_softmax(teacher_logits.double() / temperature, -1)
    if beta == 0.0:
        per_entry = F.kl_div(log_q, log_p, reduction="none", log_target=True)  # p (log p - log q)
    elif beta == 1.0:
        per_entry = F.kl_div(log_p, log_q, reduction="none", log_target=True)
    else:
        log_m = torch.logsumexp(torch.stack([log_q + math.log(1 - beta), log_p + math.log(beta)]), dim=0)
        per_entry = (beta * F.kl_div(log_m, log_p, reduction="none", log_target=True)
                     + (1 - beta) * F.kl_div(log_m, log_q, reduction="none", log_target=True))
    kept = labels != -100
    return per_entry[kept].sum() / kept.sum()


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_jsd_is_trl_generalized_jsd(backend, beta):
    """An outside check: ``kd_loss(..., "jsd", jsd_beta=beta)`` with ``reduction="mean"`` is TRL's
    ``generalized_jsd_loss(..., beta=beta)``, value and gradient, on a (batch, sequence, V) batch with padding."""
    gen = torch.Generator().manual_seed(17)
    z, t = 2 * torch.randn(2, 5, 33, generator=gen), 2 * torch.randn(2, 5, 33, generator=gen)
    labels = torch.randint(0, 33, (2, 5), generator=gen)
    labels[0, 3:] = -100
    loss, grad = loss_and_grad(kd_fn(t, "jsd", backend, jsd_beta=beta, labels=labels, temperature=2.0), z)
    ref_loss, ref_grad = loss_and_grad(lambda s: trl_generalized_jsd(s, t, labels, beta, 2.0), z.double())
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5


# ---------------------------------------------------------------- properties of these divergences


def row_loss(z, t, divergence, backend, **kwargs):
    return kd.kd_loss(z, t, divergence, reduction="none", backend=backend, **kwargs).double()


@pytest.mark.parametrize("skewed, kl", [("sfkl", "fkl"), ("srkl", "rkl")])
@pytest.mark.parametrize("backend", ["torch", "reference"])
@PROPERTY_SETTINGS
@given(case=cases(dtypes=(torch.float64,)), lam=st.sampled_from([1e-9, 1e-6, 1e-3, 0.1, 0.5, 0.9]))
def test_skewed_kl_between_bounds(skewed, kl, backend, case, lam):
    """Per row (masks included), in float64 on the backends that take it: with ``K`` the KL (fkl or rkl),
    ``lam K <= K - skewed <= lam X`` where ``X = sum_m a (a / b - 1)`` (``a, b = p, q`` for sfkl, ``q, p`` for srkl),
    by concavity of the log and ``log(1 + x) <= x``. So ``sfkl -> fkl`` (and ``srkl -> rkl``) as ``lam -> 0``."""
    z, t, kwargs = case
    temperature = kwargs["temperature"]
    gap = row_loss(z, t, kl, backend, temperature=temperature) - row_loss(
        z, t, skewed, backend, temperature=temperature, skew_lambda=lam)
    p = torch.softmax(t / temperature, -1)
    q = torch.softmax(z / temperature, -1)
    a, b = (p, q) if skewed == "sfkl" else (q, p)
    live = (z != float("-inf")) & (t != float("-inf"))
    chi2 = torch.where(live, a * (a / torch.where(live, b, 1.0) - 1), 0.0).sum(-1)
    kl_rows = row_loss(z, t, kl, backend, temperature=temperature)
    slack = 1e-12 * (1 + kl_rows.abs())
    assert (gap >= lam * kl_rows - slack).all(), (gap, lam * kl_rows)
    assert (gap <= lam * chi2 + slack).all(), (gap, lam * chi2)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@PROPERTY_SETTINGS
@given(case=cases(dtypes=(torch.float32,)), beta=st.sampled_from([0.0, 0.1, 0.5, 0.8, 1.0]))
def test_jsd_symmetry(backend, case, beta):
    """Swapping student and teacher and ``beta`` with ``1 - beta`` leaves ``jsd`` unchanged (the mixture is the same),
    so at 0.5 it is symmetric; at the end points this is ``fkl(z, t) = rkl(t, z)``."""
    z, t, kwargs = case
    temperature = kwargs["temperature"]
    forward = row_loss(z, t, "jsd", backend, temperature=temperature, jsd_beta=beta)
    swapped = row_loss(t, z, "jsd", backend, temperature=temperature, jsd_beta=1.0 - beta)
    torch.testing.assert_close(swapped, forward, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@PROPERTY_SETTINGS
@given(case=cases(dtypes=(torch.float32, torch.bfloat16), neg_inf=False))
def test_tvd_pinsker(backend, case):
    """On finite logits ``0 <= tvd <= min(1, sqrt(fkl / 2))`` (Pinsker's inequality) row by row."""
    z, t, kwargs = case
    temperature = kwargs["temperature"]
    tvd = row_loss(z, t, "tvd", backend, temperature=temperature)
    fkl = row_loss(z, t, "fkl", backend, temperature=temperature)
    assert (tvd >= 0).all() and (tvd <= 1 + 1e-6).all(), tvd
    assert (tvd <= (fkl.clamp(min=0) / 2).sqrt() + 1e-4).all(), (tvd, fkl)


# ---------------------------------------------------------------- gradcheck, compiled parameter schedules


@pytest.mark.parametrize("divergence, params", [("sfkl", dict(skew_lambda=0.02)), ("sfkl", dict(skew_lambda=0.9)),
                                                ("srkl", dict(skew_lambda=0.02)), ("srkl", dict(skew_lambda=0.9)),
                                                ("jsd", dict(jsd_beta=0.1)), ("jsd", dict(jsd_beta=0.9))],
                         ids=lambda x: x if isinstance(x, str) else str(next(iter(x.values()))))
def test_gradcheck_parameters(divergence, params):
    """``gradcheck`` in float64 on the torch backend away from the default parameters (a ``-inf`` entry, labels,
    CE, ``T = 2``). The defaults, and tvd, are checked in ``test_torch_compile.py``."""
    gen = torch.Generator().manual_seed(18)
    z, t = 2 * torch.randn(3, 6, generator=gen, dtype=torch.float64), 2 * torch.randn(3, 6, generator=gen,
                                                                                      dtype=torch.float64)
    t[1, 2] = float("-inf")
    labels = torch.tensor([1, -100, 4])
    fn = lambda s: kd.kd_loss(s, t, divergence, labels=labels, temperature=2.0, ce_weight=0.3, reduction="none",
                              backend="torch", **params)
    assert torch.autograd.gradcheck(fn, (z.requires_grad_(True),), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_parameter_schedule(backend):
    """``jsd_beta`` and ``skew_lambda`` changing between calls of a ``fullgraph=True`` function are graph inputs: the
    eager results (``jsd_beta`` crossing 0 and 1, where the ops run fkl and rkl), no graph break, at most 2 graphs."""
    torch._dynamo.reset()
    counters.clear()
    z, t, labels = make_batch(4, 24, torch.float32, seed=19)

    def step(student, beta, lam):
        jsd = kd.kd_loss(student, t, "jsd", labels=labels, temperature=2.0, jsd_beta=beta, backend=backend)
        return jsd + kd.kd_loss(student, t, "srkl", labels=labels, skew_lambda=lam, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    try:
        for beta, lam in [(0.5, 0.1), (0.0, 0.2), (0.3, 0.5), (1.0, 0.9), (0.7, 1e-6)]:
            results = []
            for fn in (compiled, step):
                student = z.clone().requires_grad_(True)
                loss = fn(student, beta, lam)
                loss.backward()
                results.append((loss.detach(), student.grad))
            (c_loss, c_grad), (loss, grad) = results
            torch.testing.assert_close(c_loss, loss, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(c_grad, grad, rtol=1e-6, atol=1e-7)
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] <= 2
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------- parameter checks


@pytest.mark.parametrize(
    "name, value",
    [("skew_lambda", v) for v in (0.0, 1.0, -0.1, 1.5, float("nan"), float("inf"))]
    + [("jsd_beta", v) for v in (-0.1, 1.1, -1e-12, float("nan"), float("-inf"))],
)
@pytest.mark.parametrize("divergence", ["sfkl", "jsd"])
def test_parameter_out_of_range_is_an_error(divergence, name, value):
    """``skew_lambda`` outside (0, 1) and ``jsd_beta`` outside [0, 1], NaN or infinite: a ``ValueError`` naming the
    argument, from ``kd_loss`` and from ``KDLoss`` (whichever divergence is chosen: every option is checked)."""
    z, t, _ = make_batch(2, 8, torch.float32)
    with pytest.raises(ValueError, match=name):
        kd.kd_loss(z, t, divergence, backend="torch", **{name: value})
    with pytest.raises(ValueError, match=name):
        kd.KDLoss(divergence, **{name: value})


def test_parameter_bounds_are_as_documented():
    """``jsd_beta`` takes its closed end points; ``skew_lambda`` takes values just inside its open ones."""
    z, t, _ = make_batch(2, 8, torch.float32)
    for options in (dict(jsd_beta=0.0), dict(jsd_beta=1.0), dict(skew_lambda=1e-12), dict(skew_lambda=1 - 1e-12)):
        assert torch.isfinite(kd.kd_loss(z, t, "jsd", backend="torch", **options))
        assert torch.isfinite(kd.kd_loss(z, t, "srkl", backend="torch", **options))
