"""Determinism (issue 6, item 5): the same inputs give bitwise the same loss and gradient on repeated calls.

No path uses atomics: every kernel program owns one row and reduces it in a fixed block order, and the torch
backend processes fixed chunks of rows, so the results cannot depend on scheduling.
"""

from __future__ import annotations

import pytest
import torch

import kdkernels as kd
from tests.utils import BACKENDS, divergence_backend, loss_and_grad

DIVERGENCES = ["fkl", "rkl", "akl", "todi", "sfkl", "srkl", "jsd", "tvd"]


def inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    z = (3 * torch.randn(2, 3, 40, generator=gen)).to(dtype)
    t = (3 * torch.randn(2, 3, 40, generator=gen)).to(torch.bfloat16)  # ties in the teacher, for AKL
    z[0, 0, :5] = float("-inf")
    labels = torch.tensor([[1, -100, 7], [39, 0, 12]])
    return z, t, labels


@pytest.mark.parametrize("divergence, backend", divergence_backend(DIVERGENCES, BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_repeated_calls_are_bitwise_equal(dtype, divergence, backend):
    """Two calls on the same inputs: identical row-loss and gradient bits."""
    z, t, labels = inputs(dtype)
    fn = lambda s: kd.kd_loss(s, t, divergence, labels=labels, ce_weight=0.5, temperature=2.0, reduction="none",
                              backend=backend)
    first_loss, first_grad = loss_and_grad(fn, z)
    loss, grad = loss_and_grad(fn, z)
    assert torch.equal(loss, first_loss)
    assert torch.equal(grad, first_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_algorithms_mode(backend):
    """The op runs under ``torch.use_deterministic_algorithms(True)`` (no nondeterministic torch op in the
    path) and gives the same bits as without it."""
    z, t, labels = inputs()
    fn = lambda s: kd.kd_loss(s, t, "akl", labels=labels, ce_weight=0.5, backend=backend)
    loss, grad = loss_and_grad(fn, z)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        det_loss, det_grad = loss_and_grad(fn, z)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(det_loss, loss) and torch.equal(det_grad, grad)
