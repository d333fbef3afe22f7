"""The streaming loops of the Triton kernels over rows of several blocks, against the float64 reference.

Every streaming pass reads a row's whole blocks in a pipelined loop without a mask (``common.whole_blocks``:
``STAGES`` and ``UNROLL`` from the launcher), then the partial block with a mask; the stats pass's blocks are tiles
of ``BATCH`` entries a lane (``launch.stats_tile``). Most other tests use rows of one block, so this one takes rows
of 3.4 blocks of 2048 (V = 7008: an odd number of whole blocks, so the unrolled loop runs its remainder, then a
partial block; for the stats pass, 1.7 tiles of 4096 entries with 16-bit rows, 3.4 of 2048 with a float32 side)
and of exactly 2 blocks (V = 4096: an empty partial block), every divergence, each dtype mix, masked entries in a
later block, an ignored row and the CE term at T = 2, and checks the launcher's pipeline settings.
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


def launched_pipelines(z, t, labels, opts) -> dict[str, tuple[int, int, int]]:
    """``{kernel: (STAGES, UNROLL, BATCH)}`` of the pipelined passes of a forward and backward (``BATCH``: 1 for
    the passes without tiles)."""
    with launch.recording() as records:
        _, stats = launch.kd_forward(z, t, labels, opts)
        launch.kd_backward(torch.ones(z.shape[0]), z, t, labels, stats, opts)
    return {r.kernel.fn.__name__: (r.meta["STAGES"], r.meta["UNROLL"], r.meta.get("BATCH", 1))
            for r in records if "STAGES" in r.meta}


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
    for name, (stages, unroll, batch) in pipelines.items():
        wide = small or (name == "akl_refine_kernel" and teacher_dtype == torch.bfloat16)
        assert stages == launch.STAGES, name
        if name == "stats_kernel":  # tiles of 8 (16-bit) or 4 (a float32 side) entries a lane
            assert (batch, unroll) == (8 if small else 4, launch.STATS_UNROLL)
        else:
            assert (batch, unroll) == (1, launch.FEWER.get((name, divergence), launch.UNROLL[name]) if wide else 1)
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


@pytest.mark.parametrize("temperature", [2.0, *full_only(1.5, 1.0)])
@pytest.mark.parametrize("dtypes", ["bf16", "fp32"])
@pytest.mark.parametrize("divergence", list(DIVERGENCE_CODES))
def test_stats_tiles_at_extremes(divergence, dtypes, temperature):
    """The stats pass's tiles (``launch.stats_tile``: a lane's maxima raised once for its ``BATCH`` entries) on
    rows of one whole tile or more and a partial one of 16 entries (V = 4112), with extreme rows: -1e9 over the
    teacher's first 2048 entries (its first tile, which fixes AKL's thresholds) and over the student's from 3000,
    the student offset by 1e4, a teacher of -inf but for two entries (one in the partial tile), a student of -inf
    but for one in the partial tile, -inf in both over overlapping ranges; NaN and +inf rows give NaN. The CE term
    at T = 2 takes the squares of the student's weights (``CE_SQUARE``), at other T its own."""
    student_dtype, teacher_dtype = DTYPES[dtypes]
    vocab = 4112
    gen = torch.Generator().manual_seed(5)
    z = 2 * torch.randn(7, vocab, generator=gen)
    t = 3 * torch.randn(7, vocab, generator=gen)
    z[0, 3000:] -= 1e9
    t[0, :2048] = -1e9
    z[1] += 1e4
    t[2, :] = float("-inf")
    t[2, [7, 4100]] = torch.tensor([0.5, 1.0])
    z[3, :4096] = float("-inf")
    z[3, 4100] = 3.0
    z[4, 2000:2500] = float("-inf")
    t[4, 2400:2600] = float("-inf")
    z[5, 3000] = float("nan")
    t[6, 5] = float("inf")
    z, t = z.to(student_dtype), t.to(teacher_dtype)
    labels = torch.tensor([1, 5, 4100, 4100, 10, 3, 3])
    options = dict(labels=labels, temperature=temperature, ce_weight=0.5, reduction="none")
    batch, lanes, _ = launch.stats_tile(divergence, vocab, z, t)
    assert batch > 1 and vocab // (batch * lanes) >= 1  # a whole tile, then the partial one
    loss, grad = loss_and_grad(lambda s: kd.kd_loss(s, t, divergence, backend="triton", **options), z)
    ref_loss, ref_grad = reference_loss_and_grad(z[:5], t[:5], divergence, **{**options, "labels": labels[:5]})
    tol_loss, tol_grad = TOLERANCE[student_dtype]
    assert rel_err(loss[:5], ref_loss) <= tol_loss, rel_err(loss[:5], ref_loss)
    assert rel_err(grad[:5], ref_grad) <= tol_grad, rel_err(grad[:5], ref_grad)
    assert torch.isnan(loss[5:]).all()
