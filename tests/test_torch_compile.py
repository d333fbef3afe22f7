"""torch.compile and gradcheck (issue 6, item 4).

The ops are ``torch.library`` custom ops with fake implementations, so a function calling ``kd_loss`` and a
module holding ``KDLoss`` compile with ``fullgraph=True`` (any graph break is an error) and must give the
eager loss and gradients. ``gradcheck`` in float64 checks the torch backend's analytic gradient.
"""

from __future__ import annotations

import pytest
import torch

import kdkernels as kd
from kdkernels.torch_ops.reference import DIVERGENCES, akl_weights, log_probs
from tests.utils import BACKENDS


def inputs(n_rows=4, vocab=24, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    z = (2 * torch.randn(n_rows, vocab, generator=gen)).to(dtype)
    t = (2 * torch.randn(n_rows, vocab, generator=gen)).to(dtype)
    z[0, 3] = float("-inf")
    labels = torch.randint(0, vocab, (n_rows,), generator=gen)
    labels[1] = -100
    labels[0] = 0 if labels[0] == 3 else labels[0]
    return z, t, labels


def eager_and_compiled(fn, z, *args, compiler="inductor"):
    """Loss and student gradient of ``fn(z, *args)``, eagerly and compiled with ``fullgraph=True``."""
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend=compiler)):
        student = z.clone().requires_grad_(True)
        loss = f(student, *args)
        loss.backward()
        results.append((loss.detach(), student.grad))
    return results


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_compiled_function(divergence, backend):
    """A function calling ``kd_loss`` (labels, CE term, mean over kept rows) compiles without graph breaks and
    matches eager. Inductor for fkl; the other divergences use ``aot_eager`` (same Dynamo capture and
    AOTAutograd tracing through the fake implementations, without the C++ build time)."""
    z, t, labels = inputs()

    def step(student, teacher, labels):
        return kd.kd_loss(student, teacher, divergence, labels=labels, temperature=2.0, kd_weight=0.5,
                          ce_weight=0.5, backend=backend)

    compiler = "inductor" if divergence == "fkl" else "aot_eager"
    (loss, grad), (c_loss, c_grad) = eager_and_compiled(step, z, t, labels, compiler=compiler)
    torch.testing.assert_close(c_loss, loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(c_grad, grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_module(backend):
    """A module holding ``KDLoss`` (with a linear head in front, bfloat16 logits, 3-D batch) compiles with
    ``fullgraph=True`` and gives the eager loss and gradients for the head's weight."""

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 32)
            self.loss = kd.KDLoss("todi", temperature=2.0, reduction="sum", backend=backend)

        def forward(self, hidden, teacher, labels):
            return self.loss(self.proj(hidden).to(torch.bfloat16), teacher, labels)

    torch.manual_seed(0)
    model = Head()
    hidden, teacher = torch.randn(2, 3, 8), torch.randn(2, 3, 32)
    labels = torch.tensor([[1, 2, -100], [4, 5, 6]])
    results = []
    for m in (model, torch.compile(model, fullgraph=True)):
        model.zero_grad()
        loss = m(hidden, teacher, labels)
        loss.backward()
        results.append((loss.detach(), model.proj.weight.grad.clone()))
    (loss, grad), (c_loss, c_grad) = results
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_grad, grad, rtol=1e-5, atol=1e-6)


def test_compiled_reduction_none_and_new_shapes():
    """``reduction="none"`` on a 3-D batch compiles, and a second batch shape recompiles (or runs dynamically)
    without error."""
    fn = torch.compile(lambda s, t: kd.kd_loss(s, t, "akl", reduction="none", backend="torch"), fullgraph=True)
    for shape in [(2, 3, 16), (5, 1, 16)]:
        z, t = torch.randn(shape), torch.randn(shape)
        torch.testing.assert_close(fn(z, t), kd.kd_loss(z, t, "akl", reduction="none", backend="torch"))


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "sfkl", "srkl", "jsd", "tvd"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(divergence, reduction):
    """``torch.autograd.gradcheck`` in float64 on the torch backend (with a ``-inf`` entry, labels, CE, T = 2), for
    every divergence whose gradient is the formula's own (SPEC §2b's at their default parameters; tvd's ``|p - q|``
    is differentiable here, as the random inputs have no ``p = q`` tie)."""
    z, t, labels = inputs(n_rows=3, vocab=6, dtype=torch.float64)
    fn = lambda s: kd.kd_loss(s, t, divergence, labels=labels, temperature=2.0, ce_weight=0.3,
                              reduction=reduction, backend="torch")
    assert torch.autograd.gradcheck(fn, (z.requires_grad_(True),), eps=1e-6, atol=1e-8, rtol=1e-6)


def frozen_loss(z, t, divergence, weights, temperature):
    """AKL/ToDi row losses with their weights held fixed at ``weights`` (SPEC §2: no gradient through them)."""
    lq, q = log_probs(z, temperature, torch.float64)
    lp, p = log_probs(t, temperature, torch.float64)
    d = lq - lp
    if divergence == "akl":
        r_h, r_t = weights
        return r_h * (p * -d).sum(-1) + r_t * (q * d).sum(-1)
    w, c = weights
    return ((c * q - w * p) * d).sum(-1)


@pytest.mark.parametrize("divergence", ["akl", "todi"])
def test_gradcheck_constant_weights(divergence):
    """AKL and ToDi treat their weights as constants, so their gradient is checked against finite differences
    of the loss with the weights frozen at the evaluation point (float64, torch backend)."""
    z, t, _ = inputs(n_rows=3, vocab=6, dtype=torch.float64)
    z[0, 3] = 0.7
    temperature, beta = 2.0, 1.5
    lq, q = log_probs(z, temperature, torch.float64)
    lp, p = log_probs(t, temperature, torch.float64)
    if divergence == "akl":
        weights = akl_weights(p, q, 0.5)
    else:
        weights = (torch.sigmoid(-beta * (lq - lp)), torch.sigmoid(beta * (lq - lp)))
    fn = lambda s: kd.kd_loss(s, t, divergence, temperature=temperature, todi_beta=beta, reduction="none",
                              backend="torch")
    torch.testing.assert_close(fn(z), frozen_loss(z, t, divergence, weights, temperature), rtol=1e-12, atol=1e-12)
    student = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(student).sum(), student)
    eps, numeric = 1e-6, torch.zeros_like(z)
    for idx in range(z.numel()):
        step = torch.zeros_like(z).view(-1)
        step[idx] = eps
        step = step.view_as(z)
        plus = frozen_loss(z + step, t, divergence, weights, temperature).sum()
        minus = frozen_loss(z - step, t, divergence, weights, temperature).sum()
        numeric.view(-1)[idx] = (plus - minus) / (2 * eps)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-8)
