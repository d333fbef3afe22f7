"""Hand-computed cases for the reference itself: it is the oracle of every other test."""

import math

import pytest
import torch

from kdkernels.torch_ops.reference import (
    DIVERGENCES,
    akl_weights,
    cross_entropy_rows,
    divergence_rows,
    kd_loss_reference,
)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_identical_distributions_give_zero(divergence):
    x = torch.randn(4, 37, dtype=torch.float64)
    assert torch.allclose(divergence_rows(x, x + 3.0, divergence), torch.zeros(4, dtype=torch.float64), atol=1e-12)


def test_one_hot_teacher():
    """p = e_k (teacher -inf elsewhere): F = -log q_k; only entry k is unmasked, so R = q_k log q_k."""
    z = torch.tensor([[1.0, 2.0, 0.5, -1.0]], dtype=torch.float64)
    t = torch.tensor([[float("-inf"), 0.0, float("-inf"), float("-inf")]], dtype=torch.float64)
    q = torch.softmax(z, -1)[0, 1].item()
    assert divergence_rows(z, t, "fkl").item() == pytest.approx(-math.log(q), rel=1e-12)
    assert divergence_rows(z, t, "rkl").item() == pytest.approx(q * math.log(q), rel=1e-12)


def test_uniform_student():
    """q = 1/V: F = sum p log p + log V and R = -log V - (1/V) sum log p."""
    t = torch.tensor([[0.3, -1.2, 2.0, 0.0, 0.7]], dtype=torch.float64)
    z = torch.zeros_like(t)
    p = torch.softmax(t, -1)
    vocab = t.shape[-1]
    fkl = (p * p.log()).sum().item() + math.log(vocab)
    rkl = -math.log(vocab) - p.log().sum().item() / vocab
    assert divergence_rows(z, t, "fkl").item() == pytest.approx(fkl, rel=1e-12)
    assert divergence_rows(z, t, "rkl").item() == pytest.approx(rkl, rel=1e-12)


def test_temperature_divides_both_logits_without_t_squared():
    z = torch.randn(3, 11, dtype=torch.float64)
    t = torch.randn(3, 11, dtype=torch.float64)
    for divergence in DIVERGENCES:
        assert torch.allclose(divergence_rows(z, t, divergence, temperature=2.0),
                              divergence_rows(z / 2, t / 2, divergence))


def test_akl_split_by_hand():
    """p = (.1, .2, .3, .4), alpha = .35: tail = entries 0, 1 (cumsum .1, .3); head = 2, 3."""
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    q = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    r_h, r_t = akl_weights(p, q, 0.35)
    g_tail, g_head = 0.3 + 0.1, 0.1 + 0.3
    assert r_h.item() == pytest.approx(g_head / (g_head + g_tail))
    assert r_t.item() == pytest.approx(g_tail / (g_head + g_tail))


def test_akl_ties_enter_the_tail_in_index_order():
    """Four equal p = .25, alpha = .5: the tail is entries 0 and 1 (cumsum .25, .5), the head 2 and 3."""
    p = torch.full((1, 4), 0.25, dtype=torch.float64)
    q = torch.tensor([[0.05, 0.15, 0.3, 0.5]], dtype=torch.float64)
    r_h, _ = akl_weights(p, q, 0.5)
    g_tail = 0.2 + 0.1
    g_head = 0.05 + 0.25
    assert r_h.item() == pytest.approx(g_head / (g_head + g_tail))


def test_akl_weights_default_to_half_when_student_equals_teacher():
    p = torch.softmax(torch.randn(2, 9, dtype=torch.float64), -1)
    r_h, r_t = akl_weights(p, p.clone(), 0.5)
    assert torch.equal(r_h, torch.full_like(r_h, 0.5)) and torch.equal(r_t, torch.full_like(r_t, 0.5))


def test_todi_by_hand():
    """Two entries: sum over i of w_i p_i (lp_i - lq_i) + c_i q_i (lq_i - lp_i), beta = 2."""
    p = torch.tensor([0.7, 0.3], dtype=torch.float64)
    q = torch.tensor([0.4, 0.6], dtype=torch.float64)
    beta = 2.0
    expected = 0.0
    for pi, qi in zip(p.tolist(), q.tolist()):
        x = math.log(pi) - math.log(qi)
        w, c = 1 / (1 + math.exp(-beta * x)), 1 / (1 + math.exp(beta * x))
        expected += w * pi * x - c * qi * x
    got = divergence_rows(q.log()[None], p.log()[None], "todi", todi_beta=beta).item()
    assert got == pytest.approx(expected, rel=1e-12)


def test_mean_over_kept_rows_and_all_ignored_batch():
    z = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64)
    labels = torch.tensor([1, -100, 2])
    rows = divergence_rows(z, t, "fkl")
    mean = kd_loss_reference(z, t, "fkl", labels=labels)
    assert mean.item() == pytest.approx((rows[0] + rows[2]).item() / 2)
    none_kept = kd_loss_reference(z, t, "fkl", labels=torch.full((3,), -100))
    none_kept.backward()
    assert none_kept.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))


def test_cross_entropy_by_hand():
    """CE = logsumexp(z) - z[label]: +inf at a -inf logit, NaN for labels outside [0, V) (as the kernels; the
    reference used to raise IndexError), and the same for int32 labels."""
    z = torch.tensor([[1.0, 2.0, float("-inf")]] * 4, dtype=torch.float64)
    lse = math.log(math.e + math.e**2)
    for dtype in (torch.int64, torch.int32):
        ce = cross_entropy_rows(z, torch.tensor([1, 2, 3, -1], dtype=dtype), torch.float64)
        assert ce[0].item() == pytest.approx(lse - 2.0, rel=1e-12)
        assert ce[1].item() == float("inf")
        assert torch.isnan(ce[2:]).all()
