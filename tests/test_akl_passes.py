"""AKL's refinement passes over ``t`` are bounded by the code, for any teacher, and the cut stays exact.

``akl_refine_kernel`` splits the bracket half evenly in key, half evenly in value; the key splits keep at most a
quarter of the key range a round, so ``launch.refine_rounds(bits)`` rounds (8 for 16-bit teachers, 16 for float32)
reach one key whatever the values. These tests drive the teachers of the cost model (``bench/roofline.py``) and
ones built against value splits (entries spread over many binades, a cut inside a large tie group), read the rounds
each row took from the kernel's scratch, and check the loss and gradient against the float64 reference (a bound
that stopped the refinement early would misplace the cut). Triton's interpreter lists at most
``launch.INTERPRETER_CAPACITY`` (64) bracket entries, so these small rows need the refinement a 128k row needs on
a GPU.
"""

import pytest
import torch

import kdkernels as kd
from kdkernels.kernels import launch
from kdkernels.kernels.common import AKL_ROUNDS
from kdkernels.torch_ops.options import KDOptions
from tests.utils import HAS_TRITON, assert_matches_reference, full_only

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its interpreter runs the kernels)")
VOCAB = 2999  # odd: no flat row puts a cumulative mass exactly on alpha


def teachers(vocab: int) -> dict[str, torch.Tensor]:
    """Rows of float32 teacher logits (3 each) of the cost model's profiles and of adversarial kinds."""
    gen = torch.Generator().manual_seed(7)
    randn = lambda: torch.randn(3, vocab, generator=gen)
    llm = 2 * randn()
    llm[:, torch.randperm(vocab, generator=gen)[:5]] += 12.0
    signs = torch.where(torch.rand(3, vocab, generator=gen) < 0.5, -1.0, 1.0)
    return {
        "peaked": 3 * randn(),
        "llm": llm,
        "flat": randn() / 2,  # randn at T = 2
        "quarter": 0.25 * randn(),
        "equal": torch.zeros(3, vocab),
        # nearly equal probabilities from values spread over 32 binades (+-2^-u): evenly spaced values put most
        # entries in one part, however many rounds
        "binades": signs * torch.exp2(-torch.randint(0, 16, (3, vocab), generator=gen).float()),
        # a few values, the cut inside a tie group of hundreds of entries
        "ties": torch.randint(-2, 3, (3, vocab), generator=gen).float() / 8,
    }


def rounds_taken(z: torch.Tensor, t: torch.Tensor, opts: KDOptions) -> torch.Tensor:
    """Refinement rounds of each row, from AKL's scratch after the stats and refinement kernels."""
    with launch.recording() as records:
        launch.kd_forward(z, t, None, opts)
    for record in records[:2]:  # stats_kernel, akl_refine_kernel
        record.kernel[record.grid](*record.args, **record.meta)
    return records[0].args[5][:, AKL_ROUNDS.value]


@pytest.mark.parametrize("teacher_dtype", [torch.bfloat16, *full_only(torch.float32)], ids=["bf16", "fp32"])
@pytest.mark.parametrize("kind", list(teachers(8)))
def test_refinement_rounds_are_bounded_and_the_cut_exact(kind, teacher_dtype):
    t = teachers(VOCAB)[kind].to(teacher_dtype)
    z = torch.randn(t.shape, generator=torch.Generator().manual_seed(1))
    key_bits = 16 if teacher_dtype == torch.bfloat16 else 32
    rounds = rounds_taken(z, t, KDOptions("akl"))
    assert ((rounds >= 0) & (rounds <= launch.refine_rounds(key_bits))).all(), rounds
    if kind in ("flat", "quarter", "binades"):  # these brackets hold more than the list: refinement ran
        assert (rounds > 0).all(), rounds
    assert_matches_reference(lambda s: kd.adaptive_kl(s, t, reduction="none", backend="triton"), z, t, "akl",
                             reduction="none")


def test_round_bound_follows_the_key_width():
    assert launch.refine_rounds(16) == 8
    assert launch.refine_rounds(32) == 16
