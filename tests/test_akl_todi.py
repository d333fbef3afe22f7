"""AKL's head/tail cut and ToDi's weights against the reference, on the teacher rows that make them hard.

The kernels find AKL's cut with a radix select (no sort); the reference sorts. Their weights ``r_h``,
``r_t`` are compared directly from the statistics the forward returns, not only through the loss.
"""

import pytest
import torch

import kdkernels as kd
from kdkernels.kernels import launch
from kdkernels.torch_ops import layout
from kdkernels.torch_ops.op import kd_forward
from kdkernels.torch_ops.options import KDOptions, op_args
from kdkernels.torch_ops.reference import akl_weights, divergence_rows, log_probs
from tests.utils import BACKENDS, assert_matches_reference, full_only


def teacher_rows(vocab: int, seed: int) -> torch.Tensor:
    """Float32 teacher logits, one row of each kind: peaked, flat, heavy ties, -inf entries, random.

    Take an odd ``vocab``: on the flat row an even one puts a cumulative sum exactly on alpha = 0.5, where
    float32 and float64 sums may round either way.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = [
        torch.randn(vocab, generator=gen) + torch.where(torch.arange(vocab) == 3, 30.0, 0.0),  # head = 1 token
        torch.randn(vocab, generator=gen) * 0.01,  # nearly flat: the head is most of the vocabulary
        torch.zeros(vocab),  # exactly flat: one tie group holds the cut
        torch.randint(-3, 3, (vocab,), generator=gen).float(),  # few distinct values, large tie groups
        torch.randint(-8, 8, (vocab,), generator=gen).float() / 4,
        torch.where(torch.rand(vocab, generator=gen) < 0.3, float("-inf"), torch.randn(vocab, generator=gen)),
        torch.randn(vocab, generator=gen) * 3,
    ]
    rows.append(-rows[3])  # ties again, with negative zeros
    return torch.stack(rows)


def cut_inside_tie_group(t: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    """Rows whose cut splits a group of equal teacher probabilities between tail and head."""
    _, p = log_probs(t.double(), temperature, torch.float64)
    order = torch.sort(p, dim=-1, stable=True).indices
    p_sorted = torch.gather(p, -1, order)
    tail = torch.cumsum(p_sorted, -1) <= alpha
    first_head = (~tail).int().argmax(-1, keepdim=True)
    cut_p = torch.gather(p_sorted, -1, first_head)
    return ((p_sorted == cut_p) & tail).any(-1)


def kernel_weights(z, t, backend, temperature, alpha):
    _, stats = kd_forward(z, t, None, *op_args(KDOptions("akl", temperature=temperature, akl_alpha=alpha)), backend)
    return stats[:, layout.R_HEAD], stats[:, layout.R_TAIL]


@pytest.mark.parametrize("temperature", [1.0, *full_only(2.0)])  # T = 2 on AKL's Triton path: test_matrix
@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_akl_weights_match_stable_sort(backend, teacher_dtype, alpha, temperature):
    vocab = 301  # odd: no flat row puts the cumulative mass exactly on alpha
    t = teacher_rows(vocab, seed=int(alpha * 10)).to(teacher_dtype)
    z = torch.randn(t.shape, generator=torch.Generator().manual_seed(1))
    r_h, r_t = kernel_weights(z, t, backend, temperature, alpha)
    _, q = log_probs(z.double(), temperature, torch.float64)
    _, p = log_probs(t.double(), temperature, torch.float64)
    ref_h, ref_t = akl_weights(p, q, alpha)
    assert torch.allclose(r_h.double(), ref_h, atol=2e-6, rtol=0), (r_h, ref_h)
    assert torch.allclose(r_t.double(), ref_t, atol=2e-6, rtol=0)


def test_ties_put_the_cut_inside_a_group():
    """The rows above do exercise the index-order tie rule (otherwise the test would prove little)."""
    t = teacher_rows(301, seed=5).to(torch.bfloat16)
    assert cut_inside_tie_group(t, 1.0, 0.5).sum() >= 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_tie_order_changes_weights_and_kernel_follows(backend):
    """Flat teacher: the tail is the lowest indices; reversing the student moves r_h, and we follow."""
    vocab = 63
    t = torch.zeros(2, vocab)
    z = torch.stack([torch.linspace(-2, 2, vocab), torch.linspace(2, -2, vocab)])
    r_h, _ = kernel_weights(z, t, backend, 1.0, 0.5)
    _, q = log_probs(z.double(), 1.0, torch.float64)
    p = torch.full_like(q, 1 / vocab)
    ref_h, _ = akl_weights(p, q, 0.5)
    assert abs(ref_h[0] - ref_h[1]) > 0.05  # the index rule matters here
    assert torch.allclose(r_h.double(), ref_h, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_akl_loss_on_hard_teachers(backend):
    t = teacher_rows(257, seed=7).to(torch.bfloat16)
    z = torch.randn(t.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    options = dict(temperature=2.0, reduction="none", akl_alpha=0.5)
    assert_matches_reference(lambda s: kd.adaptive_kl(s, t, backend=backend, **options), z, t, "akl", **options)


@pytest.mark.parametrize("temperature", [1.0, *full_only(2.0)])  # T = 2 on AKL's Triton path: test_matrix
@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_akl_refinement_and_rank_paths(monkeypatch, teacher_dtype, alpha, temperature):
    """With room for only 8 bracket entries, the kernels narrow wide brackets by passes over ``t`` and settle
    large tie groups by their index-order rank; the weights are still the stable sort's."""
    monkeypatch.setattr(launch, "INTERPRETER_CAPACITY", 8)
    t = teacher_rows(301, seed=int(alpha * 10) + 3).to(teacher_dtype)
    z = torch.randn(t.shape, generator=torch.Generator().manual_seed(4))
    r_h, r_t = kernel_weights(z, t, "triton", temperature, alpha)
    _, q = log_probs(z.double(), temperature, torch.float64)
    _, p = log_probs(t.double(), temperature, torch.float64)
    ref_h, ref_t = akl_weights(p, q, alpha)
    assert torch.allclose(r_h.double(), ref_h, atol=2e-6, rtol=0), (r_h, ref_h)
    assert torch.allclose(r_t.double(), ref_t, atol=2e-6, rtol=0)


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_todi_betas(backend, beta):
    t = teacher_rows(200, seed=8)
    z = torch.randn(t.shape, generator=torch.Generator().manual_seed(9))
    options = dict(temperature=2.0, reduction="none", todi_beta=beta)
    assert_matches_reference(lambda s: kd.todi(s, t, backend=backend, **options), z, t, "todi", **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_todi_beta_one_equals_fkl_plus_rkl(backend):
    """With beta = 1 the ToDi loss value is F + R (its gradient is not: the weights are constants)."""
    t = teacher_rows(150, seed=10)
    z = torch.randn(t.shape, generator=torch.Generator().manual_seed(11))
    todi = kd.todi(z, t, reduction="none", backend=backend)
    both = kd.forward_kl(z, t, reduction="none", backend=backend) + kd.reverse_kl(z, t, reduction="none",
                                                                                   backend=backend)
    assert torch.allclose(todi, both, rtol=1e-5, atol=1e-6)
    ref = divergence_rows(z.double(), t.double(), "fkl") + divergence_rows(z.double(), t.double(), "rkl")
    assert torch.allclose(todi.double(), ref, rtol=1e-5, atol=1e-6)
