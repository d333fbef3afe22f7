"""The bucket tail's rest category for confident teachers (issue 19 item 1, SPEC §7).

Teachers with one logit 0, 10, 20, 40 and 60 above the rest of ``V = 3000`` (K = 4; from gap 40 on their top-k sum
to 1 in float32, so ``1 - sum_K p`` is 0 or below) and an unsure student:

- with ``teacher_rest_logprob`` from ``topk_teacher(..., return_rest=True)`` every divergence equals the float64
  K+1-category loss with the exact rest mass (a float64 sort of the full row), loss and gradient, both backends
  (the top-k itself by the torch backend: the Triton top-k kernel takes ~50 s per call at V = 3000 in the
  interpreter; it is tested at V <= 400);
- the rest itself is exact to float32 rounding, down to ``1e-40``, and ``-inf`` for ``k = V``, both backends;
- without it, the floored rest keeps the category: no row is negative and the gradient raises the teacher's top
  entry, for every divergence (reverse KL was -0.36 with a rising gradient before);
- the rest travels through ``topk_teacher_from_hidden`` and the fused output layer; bad arguments name themselves.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kdkernels as kd
from kdkernels.torch_ops.reference import DIVERGENCES
from kdkernels.torch_ops.sparse_reference import REST_FLOOR, sparse_kd_loss_reference, topk_teacher_reference
from tests.utils import BACKENDS, loss_and_grad, rel_err

GAPS = (0.0, 10.0, 20.0, 40.0, 60.0)
VOCAB = 3000
K = 4
# Against the float64 categories: float32 rounding, except that a confident row's reverse-KL-like gradient multiplies
# it by |log p_rest| (up to ~55 here), so the gradients get 5x the dense float32 tolerance.
TOL_LOSS, TOL_GRAD = 1e-5, 5e-5


def confident_case(gaps=GAPS, seed: int = 0):
    """``(z, t)`` ``(len(gaps), VOCAB)`` float32: in row ``r`` one teacher logit ``gaps[r]`` above the others' maximum
    (at a random id), and an unsure student of standard normal logits that leans to that id (6 above: ``q`` about
    0.08 there, 0.9 outside K)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(len(gaps), VOCAB, generator=gen)
    top = torch.randint(0, VOCAB, (len(gaps),), generator=gen)
    rows = torch.arange(len(gaps))
    t[rows, top] = t.amax(-1) + torch.tensor(gaps)
    z = torch.randn(len(gaps), VOCAB, generator=gen)
    z[rows, top] += 6.0
    return z, t


def test_the_case_is_confident():
    """The premise: from gap 40 the float32 top-k log-probs leave no mass outside K, while the true rest is far
    above the floor."""
    _, t = confident_case()
    _, lp = kd.topk_teacher(t, K, backend="torch")
    _, _, rest = topk_teacher_reference(t, K, return_rest=True)
    assert (lp[3:].double().exp().sum(-1) >= 1).all()
    assert (rest > math.log(REST_FLOOR)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_given_rest_equals_the_exact_categories(divergence, backend):
    z, t = confident_case()
    ids, lp, rest = kd.topk_teacher(t, K, return_rest=True, backend="torch")
    ref_ids, ref_lp, ref_rest = topk_teacher_reference(t, K, return_rest=True)
    assert torch.equal(ids, ref_ids)
    loss, grad = loss_and_grad(lambda x: kd.sparse_kd_loss(x, ids, lp, divergence, teacher_rest_logprob=rest,
                                                           reduction="none", backend=backend), z)
    ref_loss, ref_grad = loss_and_grad(lambda x: sparse_kd_loss_reference(
        x, ref_ids, ref_lp, divergence, teacher_rest_logprob=ref_rest, reduction="none"), z.double())
    assert ((loss.double() - ref_loss).abs() <= TOL_LOSS * ref_loss.abs()).all(), (loss, ref_loss)
    assert rel_err(grad, ref_grad) <= TOL_GRAD, rel_err(grad, ref_grad)


# Divergences whose rest term grows as log p_rest falls (a q log(q / p) part at the rest); the others barely notice a
# teacher rest of 1e-17 or 2**-126.
LOG_P_SENSITIVE = ("rkl", "akl", "todi")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_without_rest_the_rest_category_stays(divergence, backend):
    """The floored rest (2**-126 where ``1 - sum_K p <= 0``, gaps 40 and 60): every row non-negative, the gradient
    at the teacher's top id negative where the teacher is confident (gap >= 10), the reference (the same floor)
    matched; on the floored rows the loss is the exact-rest loss (fkl, sfkl, srkl, jsd, tvd) or above it (rkl,
    akl, todi: the floor is below the true rest), never the loss without the student's mass outside K."""
    z, t = confident_case()
    ids, lp, rest = kd.topk_teacher(t, K, return_rest=True, backend="torch")
    loss, grad = loss_and_grad(lambda x: kd.sparse_kd_loss(x, ids, lp, divergence, reduction="none",
                                                           backend=backend), z)
    ref_loss, ref_grad = loss_and_grad(lambda x: sparse_kd_loss_reference(x, ids, lp.double(), divergence,
                                                                          reduction="none"), z.double())
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (loss >= 0).all(), loss
    assert (grad[1:].gather(1, ids[1:, :1]) < 0).all(), grad.gather(1, ids[:, :1])  # at gap 0 p_top < q_top
    assert rel_err(loss, ref_loss) <= TOL_LOSS and rel_err(grad, ref_grad) <= TOL_GRAD
    exact = kd.sparse_kd_loss(z, ids, lp, divergence, teacher_rest_logprob=rest, reduction="none", backend=backend)
    floored = slice(3, None)
    if divergence in LOG_P_SENSITIVE:
        assert (loss[floored] >= exact[floored]).all(), (loss, exact)
    else:
        assert ((loss[floored] - exact[floored]).abs() <= 1e-4 * exact[floored]).all(), (loss, exact)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "k", "temperature"), [
    (torch.float32, 4, 1.0), (torch.bfloat16, 8, 2.0), (torch.float32, 300, 0.5), (torch.float32, 64, 1.0)])
def test_topk_rest_is_exact(dtype, k, temperature, backend):
    """``log sum_{j not in K} softmax(t / T)_j`` against a float64 sort of the row, to float32 rounding of the log
    (gap 100: a rest of ~1e-41); ``-inf`` for k = V = 64; k = 300 (V = 400) runs the torch top-k beside the
    backend's rest pass. V = 100 otherwise."""
    vocab = {300: 400, 64: 64}.get(k, 100)
    _, t = confident_case(gaps=(*GAPS, 100.0), seed=k)
    t = t[:, :vocab].to(dtype)
    t[:, 0] = t.amax(-1) + torch.tensor((*GAPS, 100.0), dtype=dtype)  # the gaps again, in the first vocab ids
    ids, lp, rest = kd.topk_teacher(t, k, temperature=temperature, return_rest=True, backend=backend)
    ref_ids, _, ref_rest = topk_teacher_reference(t, k, temperature, return_rest=True)
    assert torch.equal(ids, ref_ids) and rest.dtype == torch.float32 and rest.shape == (len(GAPS) + 1,)
    if k == vocab:
        assert (rest == float("-inf")).all()
    else:
        assert ((rest.double() - ref_rest).abs() <= 2e-6 * ref_rest.abs().clamp(min=1)).all(), (rest, ref_rest)


def test_topk_from_hidden_returns_the_rest():
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(3, 5, 16, generator=gen), torch.randn(50, 16, generator=gen)
    ids, lp, rest = kd.topk_teacher_from_hidden(h, w, 7, temperature=2.0, return_rest=True, chunk_size=4)
    ref = kd.topk_teacher(F.linear(h, w), 7, temperature=2.0, return_rest=True)
    assert rest.shape == (3, 5) and torch.equal(ids, ref[0])
    assert torch.allclose(rest, ref[2], rtol=0, atol=1e-5)  # chunked matmul rounding


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_path_takes_the_rest(reduction):
    """``fused_linear_kd_loss(teacher_rest_logprob=)`` equals ``sparse_kd_loss`` of the materialised logits with the
    same rest (and differs from the floored one: the rest is used), over several chunks. In float64 on the torch
    backend: the plumbing is the backends' common code (the op with a given rest is tested above on both), and the
    hidden states' gradient ``dz W`` cancels to ~1e-4 relative in float32 for these rows whatever the path."""
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(len(GAPS), 12, generator=gen, dtype=torch.float64)
    w = torch.randn(VOCAB, 12, generator=gen, dtype=torch.float64) / 12**0.5
    _, t = confident_case()
    ids, lp, rest = kd.topk_teacher(t, K, return_rest=True)

    def grads(fn):
        leaves = [h.clone().requires_grad_(True), w.clone().requires_grad_(True)]
        loss = fn(*leaves).sum()
        loss.backward()
        return loss.detach(), [x.grad for x in leaves]

    fused = grads(lambda h, w: kd.fused_linear_kd_loss(h, w, divergence="rkl", teacher_indices=ids,
                                                       teacher_logprobs=lp, teacher_rest_logprob=rest, chunk_size=2,
                                                       reduction=reduction))
    dense = grads(lambda h, w: kd.sparse_kd_loss(F.linear(h, w), ids, lp, "rkl", teacher_rest_logprob=rest,
                                                 reduction=reduction))
    floored = kd.sparse_kd_loss(F.linear(h, w), ids, lp, "rkl", reduction=reduction).sum()
    assert rel_err(fused[0], dense[0]) <= 1e-12 and rel_err(fused[0], floored) > 1e-3
    for got, want in zip(fused[1], dense[1]):
        assert rel_err(got, want) <= 1e-7  # the fused path's row shares of "mean" are float32


def test_rest_is_ignored_by_the_other_tails():
    z, t = confident_case()
    ids, lp, rest = kd.topk_teacher(t, K, return_rest=True)
    for tail in ("renormalize", "truncate"):
        with_rest = kd.sparse_kd_loss(z, ids, lp, "fkl", tail=tail, teacher_rest_logprob=rest, reduction="none")
        assert torch.equal(with_rest, kd.sparse_kd_loss(z, ids, lp, "fkl", tail=tail, reduction="none"))


def test_bad_rest_arguments_name_themselves():
    z = torch.randn(2, 3, 10)
    ids = torch.randint(0, 10, (2, 3, 4))
    lp = torch.randn(2, 3, 4)
    rest = torch.randn(2, 3)
    cases = [
        (rest.tolist(), TypeError), (rest.long(), TypeError), (rest[:, :2], ValueError), (rest[..., None], ValueError),
        (rest.to("meta"), ValueError), (rest.clone().requires_grad_(), ValueError),
    ]
    for bad, error in cases:
        with pytest.raises(error, match="teacher_rest_logprob"):
            kd.sparse_kd_loss(z, ids, lp, teacher_rest_logprob=bad)
        with pytest.raises(error, match="teacher_rest_logprob"):
            kd.fused_linear_kd_loss(z, torch.randn(7, 10), teacher_indices=ids % 7, teacher_logprobs=lp,
                                    teacher_rest_logprob=bad)
    with pytest.raises(ValueError, match="sparse teacher"):
        kd.fused_linear_kd_loss(z, torch.randn(7, 10), teacher_logits=torch.randn(2, 3, 7), teacher_rest_logprob=rest)
    with pytest.raises(TypeError, match="return_rest"):
        kd.topk_teacher(z, 2, return_rest=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_may_hold_any_rest(backend):
    """An ignored row's rest is not read (NaN padding there changes nothing); the others' rests are used as given."""
    z, t = confident_case()
    ids, lp, rest = kd.topk_teacher(t, K, return_rest=True, backend="torch")
    labels = torch.tensor([0, -100, 2, 3, -100])
    poisoned = torch.where(labels == -100, float("nan"), rest)
    got = loss_and_grad(lambda x: kd.sparse_kd_loss(x, ids, lp, "akl", labels=labels, teacher_rest_logprob=poisoned,
                                                    reduction="none", backend=backend), z)
    want = loss_and_grad(lambda x: kd.sparse_kd_loss(x, ids, lp, "akl", labels=labels, teacher_rest_logprob=rest,
                                                     reduction="none", backend=backend), z)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (got[0][labels == -100] == 0).all() and (got[1][labels == -100] == 0).all()
