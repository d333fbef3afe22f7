"""Every backend against the float64 reference: divergence x dtype x V x temperature x reduction.

Each batch mixes the row kinds that break fused kernels: an ordinary row, an ignored row, ``-inf`` entries
in the student only, the teacher only, and both. V covers 1, an odd prime, a size that is not a multiple
of the block, a size above one streaming block (4096, so the online rescaling runs) and GPT-2's 50257 (1 and the
block's remainder in the exhaustive run only).
"""

import pytest
import torch

import kdkernels as kd
from kdkernels.torch_ops.reference import DIVERGENCES, REDUCTIONS
from tests.utils import BACKENDS, assert_matches_reference, full_only

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_batch(n_rows: int, vocab: int, dtype: torch.dtype, seed: int = 0, scale: float = 2.0):
    """Student/teacher logits ``(n_rows, vocab)`` rounded to ``dtype``, labels with row 1 ignored.

    Rows 2, 3 and 4 get ``-inf`` in the student, the teacher, and both (when V allows it).
    """
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(n_rows, vocab, generator=gen) * scale).to(dtype)
    t = (torch.randn(n_rows, vocab, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, vocab, (n_rows,), generator=gen)
    labels[1 % n_rows] = -100
    if vocab >= 4 and n_rows >= 5:
        z[2, 1::3] = float("-inf")
        t[3, 2::5] = float("-inf")
        z[4, 0::4] = float("-inf")
        t[4, 0::4] = float("-inf")
        t[4, 1] = float("-inf")
        labels[2] = 0  # a finite student entry, so the CE term stays finite
    return z, t, labels


@pytest.mark.parametrize("vocab", [7, 5003, *full_only(1, 1000)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_match_reference(backend, divergence, dtype, vocab):
    """Per-row losses (reduction="none") and gradients, temperature 2 on the odd sizes."""
    z, t, labels = make_batch(5, vocab, dtype, seed=vocab)
    temperature = 2.0 if vocab % 2 else 1.0
    options = dict(labels=labels, temperature=temperature, reduction="none", todi_beta=1.5)
    assert_matches_reference(
        lambda s: kd.kd_loss(s, t, divergence, backend=backend, **options), z, t, divergence, **options
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_and_temperatures(backend, divergence, reduction, temperature):
    z, t, labels = make_batch(6, 131, torch.float32, seed=1)
    options = dict(labels=labels, temperature=temperature, reduction=reduction)
    assert_matches_reference(
        lambda s: kd.kd_loss(s, t, divergence, backend=backend, **options), z, t, divergence, **options
    )


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_without_labels(backend, divergence):
    """No labels: every row counts; leading dimensions are flattened and restored."""
    z, t, _ = make_batch(6, 64, torch.float32, seed=2)
    z, t = z.reshape(2, 3, 64), t.reshape(2, 3, 64)
    for reduction in REDUCTIONS:
        assert_matches_reference(
            lambda s, r=reduction: kd.kd_loss(s, t, divergence, reduction=r, backend=backend),
            z, t, divergence, reduction=reduction,
        )


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpt2_vocabulary(backend, divergence):
    """V = 50257 (many streaming blocks); AKL with a bfloat16 teacher, the others in float32."""
    dtype = torch.bfloat16 if divergence == "akl" else torch.float32
    z, t, labels = make_batch(2, 50257, dtype, seed=3)
    options = dict(labels=labels, temperature=2.0, reduction="sum")
    assert_matches_reference(
        lambda s: kd.kd_loss(s, t, divergence, backend=backend, **options), z, t, divergence, **options
    )


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_hard_label_term(backend, divergence):
    """``kd_weight * divergence + ce_weight * CE`` with CE at temperature 1 (the published recipe)."""
    z, t, labels = make_batch(6, 300, torch.float32, seed=4)
    options = dict(labels=labels, temperature=2.0, kd_weight=0.5, ce_weight=0.5)
    assert_matches_reference(
        lambda s: kd.kd_loss(s, t, divergence, backend=backend, **options), z, t, divergence, **options
    )


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_flows_into_linear_layer(backend, divergence):
    """``loss.backward()`` through a real ``nn.Linear`` matches the reference's parameter gradients."""
    torch.manual_seed(5)
    hidden = torch.randn(2, 5, 16)
    head = torch.nn.Linear(16, 97)
    teacher = torch.randn(2, 5, 97)
    labels = torch.randint(0, 97, (2, 5))
    labels[0, 0] = -100
    grads = []
    for use in (backend, "reference"):
        head.zero_grad()
        kd.KDLoss(divergence, temperature=2.0, backend=use)(head(hidden), teacher, labels).backward()
        grads.append((head.weight.grad.clone(), head.bias.grad.clone()))
    for ours, ref in zip(grads[0], grads[1]):
        assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-6)
