"""The streaming loops of the Triton kernels over rows of several blocks, against the float64 reference.

A 16-aligned row of more than two blocks of 16-bit inputs (and AKL's smaller blocks of a float32 teacher) runs the
3-slot loops (``common.stream_start``: three blocks per iteration, each slot refilled three blocks on); float32 inputs
run the 1-slot loop. Most other tests use
rows of one block, so this one takes a row of 3.4 blocks of 2048 (V = 7008: the last iteration's slots hold a
partial block and blocks past the row), every divergence, each dtype mix, masked entries in a later block, an
ignored row and the CE term at T = 2, and checks that the launcher chose the loop it should.
"""

import pytest
import torch

import kdkernels as kd
from kdkernels.kernels import launch
from kdkernels.torch_ops.layout import DIVERGENCE_CODES
from kdkernels.torch_ops.options import KDOptions
from tests.utils import HAS_TRITON, TOLERANCE, full_only, loss_and_grad, reference_loss_and_grad, rel_err

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its interpreter runs the kernels)")
VOCAB = 7008
DTYPES = {"bf16": (torch.bfloat16, torch.bfloat16), "bf16/fp32": (torch.bfloat16, torch.float32),
          "fp32": (torch.float32, torch.float32)}


def launched_slots(z, t, labels, opts) -> dict[str, tuple[int, int, int]]:
    """``{kernel: (SLOTS, bytes an entry of its reads, BLOCK_V)}`` of a forward and backward."""
    with launch.recording() as records:
        _, stats = launch.kd_forward(z, t, labels, opts)
        launch.kd_backward(torch.ones(z.shape[0]), z, t, labels, stats, opts)
    both = z.element_size() + t.element_size()
    entry = {"akl_refine_kernel": t.element_size()}
    return {r.kernel.fn.__name__: (r.meta["SLOTS"], entry.get(r.kernel.fn.__name__, both), r.meta["BLOCK_V"])
            for r in records if "SLOTS" in r.meta}


@pytest.mark.parametrize("dtypes", ["bf16", "fp32", *full_only("bf16/fp32")])
@pytest.mark.parametrize("divergence", list(DIVERGENCE_CODES))
def test_rows_of_several_blocks(divergence, dtypes):
    student_dtype, teacher_dtype = DTYPES[dtypes]
    gen = torch.Generator().manual_seed(3)
    z = (2 * torch.randn(3, VOCAB, generator=gen)).to(student_dtype)
    t = (3 * torch.randn(3, VOCAB, generator=gen)).to(teacher_dtype)
    z[1, 5000:5100] = float("-inf")  # masked entries in a later block
    labels = torch.tensor([7, -100, 6999])
    options = dict(labels=labels, temperature=2.0, ce_weight=0.5, kd_weight=0.5, reduction="none")
    slots = launched_slots(z, t, labels, KDOptions(divergence, temperature=2.0, ce_weight=0.5, kd_weight=0.5))
    # 3 slots where a pass reads at most 6 bytes an entry and 8 KB a block from aligned rows (``launch.slots``):
    # every bf16 pass (but ToDi's finish), no float32 one but AKL's refinement (512-entry blocks of t)
    for name, (n, entry, block) in slots.items():
        assert n == (3 if entry <= 6 and entry * block <= 8192 and divergence not in launch.ONE_SLOT.get(name, ())
                     else 1), (name, n, entry, block)
    if dtypes == "bf16":
        assert all(n == 3 for name, (n, _, _) in slots.items() if divergence not in launch.ONE_SLOT.get(name, ()))
    if dtypes == "fp32":
        assert all(n == 1 for name, (n, _, _) in slots.items() if name != "akl_refine_kernel")
    loss, grad = loss_and_grad(lambda s: kd.kd_loss(s, t, divergence, backend="triton", **options), z)
    ref_loss, ref_grad = reference_loss_and_grad(z, t, divergence, **options)
    tol_loss, tol_grad = TOLERANCE[student_dtype]
    assert rel_err(loss, ref_loss) <= tol_loss, rel_err(loss, ref_loss)
    assert rel_err(grad, ref_grad) <= tol_grad, rel_err(grad, ref_grad)
    assert loss[1] == 0 and (grad[1] == 0).all()  # the ignored row
