"""The compiled Triton kernels on a GPU against the float64 reference (skipped without CUDA).

The rest of the suite runs the kernels on CPU tensors through Triton's interpreter (on a GPU machine, run it
with ``TRITON_INTERPRET=1``); this file runs them compiled, on CUDA tensors, and ``bash bench/gpu_check.sh``
runs it. Shapes here are the production ones: the 128256 and 256000 vocabularies, several blocks per row.
"""

import os

import pytest
import torch

import kdkernels as kd
from kdkernels.torch_ops import layout
from kdkernels.torch_ops.op import kd_forward
from kdkernels.torch_ops.options import KDOptions, op_args
from kdkernels.torch_ops.reference import DIVERGENCES, akl_weights, log_probs
from kdkernels.torch_ops.sparse_reference import sparse_kd_loss_reference, topk_teacher_reference
from tests.test_matrix import make_batch
from tests.utils import TOLERANCE, loss_and_grad, reference_loss_and_grad, rel_err

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs CUDA and compiled (not interpreted) Triton kernels",
)


def _check(divergence, z, t, **options):
    zc = z.cuda().requires_grad_(True)
    loss = kd.kd_loss(zc, t.cuda(), divergence, **options)
    weight = torch.rand(loss.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (loss * weight.to(loss.dtype).cuda()).sum().backward()
    ref_loss, ref_grad = reference_loss_and_grad(z, t, divergence, **options)
    tol_loss, tol_grad = TOLERANCE[z.dtype]
    assert zc.grad.dtype == z.dtype
    assert rel_err(loss.cpu(), ref_loss) <= tol_loss
    assert rel_err(zc.grad.cpu(), ref_grad) <= tol_grad


@pytest.mark.parametrize("vocab", [1, 7, 1000, 50257, 128256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kernels_match_reference(divergence, dtype, vocab):
    z, t, labels = make_batch(6, vocab, dtype, seed=vocab)
    _check(divergence, z, t, labels=labels, temperature=2.0, reduction="none", ce_weight=0.5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_large_vocabulary_mean(divergence):
    z, t, labels = make_batch(8, 256000, torch.bfloat16, seed=1)
    _check(divergence, z, t, labels=labels, temperature=1.0)


@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_akl_weights_on_gpu(teacher_dtype):
    gen = torch.Generator().manual_seed(2)
    t = torch.randint(-4, 4, (16, 32000), generator=gen).float().to(teacher_dtype)  # ties everywhere
    z = torch.randn(16, 32000, generator=gen)
    _, stats = kd_forward(z.cuda(), t.cuda(), None, *op_args(KDOptions("akl")), "triton")
    _, q = log_probs(z.double(), 1.0, torch.float64)
    _, p = log_probs(t.double(), 1.0, torch.float64)
    assert torch.allclose(stats[:, layout.R_HEAD].double().cpu(), akl_weights(p, q, 0.5)[0], atol=2e-6, rtol=0)


@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale, temperature, alpha", [(3.0, 1.0, 0.5), (1.0, 2.0, 0.5), (3.0, 1.0, 0.1),
                                                       (30.0, 1.0, 0.999999)])
def test_akl_cut_at_production_size(teacher_dtype, scale, temperature, alpha):
    """Peaked (the stats pass's bracket suffices), flat (refinement passes) and extreme-alpha teachers at V=128256."""
    gen = torch.Generator().manual_seed(4)
    t = (scale * torch.randn(8, 128256, generator=gen)).to(teacher_dtype)
    z = torch.randn(8, 128256, generator=gen)
    opts = KDOptions("akl", temperature=temperature, akl_alpha=alpha)
    _, stats = kd_forward(z.cuda(), t.cuda(), None, *op_args(opts), "triton")
    _, q = log_probs(z.double(), temperature, torch.float64)
    _, p = log_probs(t.double(), temperature, torch.float64)
    ref_h, _ = akl_weights(p, q, alpha)
    assert torch.allclose(stats[:, layout.R_HEAD].double().cpu(), ref_h, atol=2e-6, rtol=0)


def test_fused_linear_on_gpu():
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(300, 64, generator=gen)
    w = torch.randn(5000, 64, generator=gen) * 0.1
    g = torch.randn(300, 96, generator=gen)
    u = torch.randn(5000, 96, generator=gen) * 0.1
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = kd.kd_loss(h64 @ w64.T, (g.double() @ u.double().T), "todi", temperature=2.0, backend="reference")
    ref.backward()
    hc, wc = h.cuda().requires_grad_(True), w.cuda().requires_grad_(True)
    loss = kd.fused_linear_kd_loss(hc, wc, g.cuda(), u.cuda(), "todi", temperature=2.0, chunk_size=128)
    loss.backward()
    assert rel_err(loss.cpu(), ref) <= 1e-5
    assert rel_err(hc.grad.cpu(), h64.grad) <= 1e-4 and rel_err(wc.grad.cpu(), w64.grad) <= 1e-4


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("divergence", ["fkl", "akl", "todi", "jsd"])
def test_sparse_teacher_at_production_size(divergence, tail):
    """``topk_teacher`` (the streaming kernel, k = 64 of V = 128256, a bf16 teacher with ties) against a stable
    float64 sort, then ``sparse_kd_loss`` on its output against the float64 sparse reference."""
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(8, 128256, generator=gen).to(torch.bfloat16)
    t = (3 * torch.randn(8, 128256, generator=gen)).to(torch.bfloat16)
    ids, lp = kd.topk_teacher(t.cuda(), 64, temperature=2.0)
    ref_ids, ref_lp = topk_teacher_reference(t, 64, temperature=2.0)
    assert torch.equal(ids.cpu(), ref_ids)
    assert torch.allclose(lp.cpu().double(), ref_lp, atol=1e-5, rtol=0)
    kwargs = dict(tail=tail, temperature=2.0, reduction="none")
    loss, grad = loss_and_grad(lambda x: kd.sparse_kd_loss(x, ids, lp, divergence, **kwargs), z.cuda())
    ref_loss, ref_grad = loss_and_grad(
        lambda x: sparse_kd_loss_reference(x, ids.cpu(), lp.cpu().double(), divergence, **kwargs), z.double())
    tol_loss, tol_grad = TOLERANCE[z.dtype]
    assert rel_err(loss.cpu(), ref_loss) <= tol_loss
    assert rel_err(grad.cpu(), ref_grad) <= tol_grad
