"""API hardening (issue 10, items 5-7).

- Item 5: ``backend="reference"`` agrees with the production backends on narrow integer labels, on labels
  outside ``[0, V)`` (a NaN row loss with ``ce_weight > 0``) and on ignored rows that hold NaN or ``inf``
  (loss 0 and gradient exactly 0 there).
- Item 6: the float options trace under ``torch.compile(fullgraph=True)`` when they change between calls
  (a temperature or weight schedule, without a graph per value) and with ``dynamic=True``; NumPy scalars and
  0-dim CPU tensors are taken where a float is expected.
- Item 7: a backward with ``create_graph=True`` (double backward) raises a clear error at once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import kdkernels as kd
from kdkernels.torch_ops.op import SECOND_DERIVATIVE
from kdkernels.torch_ops.reference import DIVERGENCES
from tests.utils import BACKENDS, loss_and_grad


def batch(n_rows=4, vocab=12, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    z = (2 * torch.randn(n_rows, vocab, generator=gen)).to(dtype)
    t = (2 * torch.randn(n_rows, vocab, generator=gen)).to(dtype)
    return z, t


def run(backend, z, t, divergence, **kwargs):
    """Loss and gradient (of ``sum(loss * random weight)``) of ``kd_loss`` on one backend."""
    return loss_and_grad(lambda s: kd.kd_loss(s, t, divergence, backend=backend, **kwargs), z)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


# ---------------------------------------------------------------- item 5: the reference agrees


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8])
def test_reference_takes_narrow_integer_labels(dtype):
    """Labels of any integer dtype give the reference the int64 result (it used to raise with CE), which the
    production backends give too."""
    z, t = batch(dtype=torch.float64)
    labels = torch.tensor([3, -100, 0, 11])
    options = dict(labels=labels, ce_weight=0.5, reduction="none")
    expected = run("reference", z, t, "todi", **options)
    loss, grad = run("reference", z, t, "todi", **{**options, "labels": labels.to(dtype)})
    torch.testing.assert_close(loss, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(grad, expected[1], rtol=0, atol=0)
    for backend in BACKENDS:
        other_loss, other_grad = run(backend, z.float(), t.float(), "todi", **{**options, "labels": labels.to(dtype)})
        torch.testing.assert_close(other_loss, loss.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other_grad, grad.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_reference_out_of_range_labels_give_nan_rows(divergence):
    """A kept label outside ``[0, V)`` with ``ce_weight > 0`` makes that row's loss NaN on the reference (it used
    to raise IndexError), as on the production backends, where its gradient row is NaN too (the README's contract:
    no host synchronisation to check the labels); the other rows and their gradients agree."""
    z, t = batch(n_rows=5, dtype=torch.float64)
    labels = torch.tensor([3, 12, -1, -100, 40])
    loss, grad = run("reference", z, t, divergence, labels=labels, ce_weight=0.5, reduction="none")
    assert torch.isnan(loss[[1, 2, 4]]).all()
    assert torch.isfinite(loss[[0, 3]]).all() and loss[3] == 0
    for backend in BACKENDS:
        other_loss, other_grad = run(backend, z.float(), t.float(), divergence, labels=labels, ce_weight=0.5,
                                     reduction="none")
        torch.testing.assert_close(other_loss, loss.float(), rtol=1e-5, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(other_grad[[0, 3]], grad[[0, 3]].float(), rtol=1e-5, atol=1e-6)
        assert torch.isnan(other_grad[[1, 2, 4]]).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_reference_ignored_rows_may_hold_garbage(divergence):
    """NaN or ``inf`` logits in ignored rows give the reference loss 0 and gradient exactly 0 there (the
    gradient used to be NaN), and leave the kept rows as they are without the garbage."""
    z, t = batch(dtype=torch.float64)
    labels = torch.tensor([2, -100, 5, -100])
    z[1], t[1, 3], t[3, 0] = float("nan"), float("inf"), float("nan")
    loss, grad = run("reference", z, t, divergence, labels=labels, ce_weight=0.5, reduction="none")
    assert torch.equal(loss[[1, 3]], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(grad[[1, 3]], torch.zeros(2, 12, dtype=torch.float64))
    clean_loss, clean_grad = run("reference", z[[0, 2]], t[[0, 2]], divergence, labels=labels[[0, 2]],
                                 ce_weight=0.5, reduction="none")
    torch.testing.assert_close(loss[[0, 2]], clean_loss)
    assert torch.isfinite(grad).all()
    mean = kd.kd_loss(z, t, divergence, labels=labels, ce_weight=0.5, backend="reference")
    torch.testing.assert_close(mean, clean_loss.mean())


# ---------------------------------------------------------------- item 6: float options


def compiled_and_eager(fn, calls, compiler="aot_eager", **compile_options):
    """``[(compiled loss, grad), (eager loss, grad)]`` of ``fn(student, *args)`` for each ``(student, *args)``."""
    compiled = torch.compile(fn, fullgraph=True, backend=compiler, **compile_options)
    results = []
    for student, *args in calls:
        pair = []
        for f in (compiled, fn):
            z = student.clone().requires_grad_(True)
            loss = f(z, *args)
            loss.backward()
            pair.append((loss.detach(), z.grad))
        results.append(pair)
    return results


@pytest.mark.parametrize("backend, compiler", [
    ("torch", "aot_eager"),
    *[pytest.param(b, "aot_eager", marks=pytest.mark.full) for b in BACKENDS if b != "torch"],
    pytest.param("torch", "inductor", marks=pytest.mark.full),
])
def test_compiled_temperature_and_weight_schedule(backend, compiler, fresh_dynamo):
    """A temperature and weight schedule over 12 calls of a ``fullgraph=True`` function (more values than
    dynamo's limit of 8 recompilations): no graph break or error (``math.isfinite`` on the symbolic float used to
    fail), the eager results, and at most 2 graphs (the first call's, then one with the floats as inputs; the
    ops' options used to be ``float`` in their schemas, which specialised a graph to each value)."""
    z, t = batch()
    labels = torch.tensor([1, -100, 3, 4])

    def step(student, temperature, kd_weight):
        return kd.kd_loss(student, t, "akl", labels=labels, temperature=temperature, kd_weight=kd_weight,
                          ce_weight=1.0 - kd_weight, backend=backend)

    schedule = [(z, 1.0 + 0.25 * i, 0.5 + 0.02 * i) for i in range(12)]
    for (c_loss, c_grad), (loss, grad) in compiled_and_eager(step, schedule, compiler):
        torch.testing.assert_close(c_loss, loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(c_grad, grad, rtol=1e-6, atol=1e-7)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] <= 2


def test_compiled_dynamic(fresh_dynamo):
    """``dynamic=True`` (symbolic floats and batch sizes from the first call) traces and matches eager."""
    z, t = batch(n_rows=6)

    def step(student, teacher, temperature):
        return kd.kd_loss(student, teacher, "todi", temperature=temperature, todi_beta=1.5, reduction="sum",
                          backend="torch")

    calls = [(z, t, 2.0), (z[:3], t[:3], 2.5), (z[:5], t[:5], 2.5)]
    for (c_loss, c_grad), (loss, grad) in compiled_and_eager(step, calls, dynamic=True):
        torch.testing.assert_close(c_loss, loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(c_grad, grad, rtol=1e-6, atol=1e-7)
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_schedule_still_checks_values(fresh_dynamo):
    """Once the temperature is symbolic, an invalid value still raises an error naming it."""
    z, t = batch()
    fn = torch.compile(lambda s, temperature: kd.kd_loss(s, t, temperature=temperature, backend="torch"),
                       fullgraph=True, backend="aot_eager")
    fn(z, 1.0)
    fn(z, 2.0)
    with pytest.raises(Exception, match="temperature"):
        fn(z, -1.0)


@pytest.mark.parametrize("value", [torch.tensor(2.0), np.float64(2.0)], ids=["tensor", "numpy"])
def test_compiled_refuses_tensor_and_numpy_options(value, fresh_dynamo):
    """Under ``torch.compile`` Dynamo traces a tensor or NumPy option as a tensor, whose value cannot be read
    without a graph break: the error names the option and asks for a Python number."""
    z, t = batch()
    fn = torch.compile(lambda s, temperature: kd.kd_loss(s, t, temperature=temperature, backend="torch"),
                       fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="temperature must be a float .*a Python number under torch.compile"):
        fn(z, value)


NUMBER_OPTIONS = dict(temperature=2.0, akl_alpha=0.3, todi_beta=1.5, skew_lambda=0.2, jsd_beta=0.3, kd_weight=0.5,
                      ce_weight=0.25)


@pytest.mark.parametrize(
    "convert",
    [np.float32, np.float64, torch.tensor, lambda x: torch.tensor(x, dtype=torch.float64)],
    ids=["np.float32", "np.float64", "tensor", "tensor64"],
)
@pytest.mark.parametrize("divergence", ["akl", "todi", "srkl", "jsd"])
def test_numpy_and_0dim_tensor_options(divergence, convert):
    """NumPy scalars and 0-dim CPU tensors are taken for every float option (a 0-dim tensor used to be a
    TypeError) and give the loss of the same Python floats (rounded to the given dtype)."""
    z, t = batch()
    labels = torch.tensor([1, -100, 3, 4])
    given = {name: convert(value) for name, value in NUMBER_OPTIONS.items()}
    floats = {name: float(value) for name, value in given.items()}
    for backend in ["torch", "reference"]:
        loss = kd.kd_loss(z, t, divergence, labels=labels, backend=backend, **given)
        torch.testing.assert_close(loss, kd.kd_loss(z, t, divergence, labels=labels, backend=backend, **floats))
    module = kd.KDLoss(divergence, **given)
    assert all(type(getattr(module.loss_options, name)) is float for name in NUMBER_OPTIONS)
    torch.testing.assert_close(module(z, t, labels), kd.kd_loss(z, t, divergence, labels=labels, **floats))


def test_integer_options_become_floats():
    """Python and NumPy integers (and integer 0-dim tensors) are taken and stored as floats."""
    module = kd.KDLoss(temperature=2, kd_weight=np.int64(1), ce_weight=torch.tensor(0))
    opts = module.loss_options
    assert opts.temperature == 2.0 and type(opts.temperature) is float
    assert type(opts.kd_weight) is float and type(opts.ce_weight) is float


# ---------------------------------------------------------------- item 7: no double backward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["fkl", "todi", "jsd"])
def test_double_backward_refused_at_the_first_backward(divergence, backend):
    """``create_graph=True`` raises at the first backward, saying the op has no second derivative (it used to
    return a gradient whose own backward failed with a message about ``kd_backward``)."""
    z, t = batch()
    student = z.clone().requires_grad_(True)
    loss = kd.kd_loss(student, t, divergence, temperature=2.0, backend=backend)
    with pytest.raises(RuntimeError, match="create_graph=True") as info:
        torch.autograd.grad(loss, student, create_graph=True)
    assert str(info.value) == SECOND_DERIVATIVE and "second derivative" in SECOND_DERIVATIVE
    (grad,) = torch.autograd.grad(loss, student)  # the first-order gradient is still there
    assert torch.isfinite(grad).all()


def test_reference_has_a_second_derivative():
    """The error message points at ``backend="reference"``: autograd differentiates it twice."""
    z, t = batch(dtype=torch.float64)
    student = z.clone().requires_grad_(True)
    loss = kd.kd_loss(student, t, "fkl", backend="reference")
    (grad,) = torch.autograd.grad(loss, student, create_graph=True)
    grad.pow(2).sum().backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
