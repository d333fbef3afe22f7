"""The streaming loops of the Triton kernels over rows of several blocks, against the float64 reference.

Every streaming pass reads a row's whole blocks in a pipelined loop without a mask (``common.whole_blocks``:
``STAGES`` and ``UNROLL`` from the launcher), then the partial block with a mask. Most other tests use rows of one
block, so this one takes rows of 3.4 blocks of 2048 (V = 7008: an odd number of whole blocks, so the unrolled loop
runs its remainder, then a partial block) and of exactly 2 blocks (V = 4096: an empty partial block), every
divergence, each dtype mix, masked entries in a later block, an ignored row and the CE term at T = 2, and checks
the launcher's pipeline settings.
"""

import pytest
import torch

import kdkernels as kd
from kdkernels.kernels import launch
from kdkernels.torch_ops.layout import DIVERGENCE_CODES
from kdkernels.torch_ops.options import KDOptions
from tests.utils import HAS_TRITON, TOLERANCE, full_only, loss_and_grad, reference_loss_and_grad, rel_err

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its interpreter runs the kernels)")
DTYPES = {"bf16": (torch.bfloat16, torch.bfloat16), "bf16/fp32": (torch.bfloat16, torch.float32),
          "fp32": (torch.float32, torch.float32)}


def launched_pipelines(z, t, labels, opts) -> dict[str, tuple[int, int]]:
    """``{kernel: (STAGES, UNROLL)}`` of the pipelined passes of a forward and backward."""
    with launch.recording() as records:
        _, stats = launch.kd_forward(z, t, labels, opts)
        launch.kd_backward(torch.ones(z.shape[0]), z, t, labels, stats, opts)
    return {r.kernel.fn.__name__: (r.meta["STAGES"], r.meta["UNROLL"]) for r in records if "STAGES" in r.meta}


@pytest.mark.parametrize("vocab", [7008, *full_only(4096)])
@pytest.mark.parametrize("dtypes", ["bf16", "fp32", *full_only("bf16/fp32")])
@pytest.mark.parametrize("divergence", list(DIVERGENCE_CODES))
def test_rows_of_several_blocks(divergence, dtypes, vocab):
    student_dtype, teacher_dtype = DTYPES[dtypes]
    gen = torch.Generator().manual_seed(3)
    z = (2 * torch.randn(3, vocab, generator=gen)).to(student_dtype)
    t = (3 * torch.randn(3, vocab, generator=gen)).to(teacher_dtype)
    z[1, 3000:3100] = float("-inf")  # masked entries in a later block
    labels = torch.tensor([7, -100, vocab - 9])
    options = dict(labels=labels, temperature=2.0, ce_weight=0.5, kd_weight=0.5, reduction="none")
    pipelines = launched_pipelines(z, t, labels, KDOptions(divergence, temperature=2.0, ce_weight=0.5, kd_weight=0.5))
    expected = {"stats_kernel", "grad_kernel"} | ({"finish_kernel"} if divergence not in ("fkl", "rkl") else set())
    assert set(pipelines) == expected | ({"akl_refine_kernel"} if divergence == "akl" else set())
    small = dtypes == "bf16"  # 16-bit z and t (vocab: 16-aligned rows)
    for name, (stages, unroll) in pipelines.items():
        wide = small or (name == "akl_refine_kernel" and teacher_dtype == torch.bfloat16)
        assert stages == launch.STAGES, name
        expected = launch.FEWER.get((name, divergence), launch.UNROLL[name]) if wide else 1
        if name == "stats_kernel" and divergence not in launch.SMALL_BLOCKS[name] and small:
            expected *= 2  # T = 2 with the CE term: the stats pass's half blocks
        assert unroll == expected, name
    loss, grad = loss_and_grad(lambda s: kd.kd_loss(s, t, divergence, backend="triton", **options), z)
    ref_loss, ref_grad = reference_loss_and_grad(z, t, divergence, **options)
    tol_loss, tol_grad = TOLERANCE[student_dtype]
    assert rel_err(loss, ref_loss) <= tol_loss, rel_err(loss, ref_loss)
    assert rel_err(grad, ref_grad) <= tol_grad, rel_err(grad, ref_grad)
    assert loss[1] == 0 and (grad[1] == 0).all()  # the ignored row


@pytest.mark.parametrize("offset", ["none", "student", "teacher"])
@pytest.mark.parametrize("divergence", ["fkl", "rkl"])
def test_kl_sums_stay_exact_when_the_maxima_grow_late(divergence, offset):
    """fkl and rkl sum their log-ratios centred on each lane's running maxima: a row whose first block lies 40 nats
    below the rest (the maxima grow late, by a lot) and a student near a scaled teacher (a small loss made of large
    terms), with either side offset by 1e4, still meets float32's tolerance. Centring on fixed points (say the first
    block's maxima) instead loses the digits the differences ``t - t0`` round away."""
    gen = torch.Generator().manual_seed(0)
    t = 3 * torch.randn(4, 7008, generator=gen)
    t[:, :2048] -= 40.0
    z = 0.9 * t + 0.3 * torch.randn(4, 7008, generator=gen)
    z = z + 1e4 if offset == "student" else z
    t = t - 1e4 if offset == "teacher" else t
    loss, grad = loss_and_grad(lambda s: kd.kd_loss(s, t, divergence, backend="triton", reduction="none"), z)
    ref_loss, ref_grad = reference_loss_and_grad(z, t, divergence, reduction="none")
    tol_loss, tol_grad = TOLERANCE[torch.float32]
    assert rel_err(loss, ref_loss) <= tol_loss, rel_err(loss, ref_loss)
    assert rel_err(grad, ref_grad) <= tol_grad, rel_err(grad, ref_grad)
