"""``fused_linear_kd_loss`` against the float64 reference on materialised logits, its checks and its memory.

Shapes: 37 rows (not a multiple of the chunk sizes 8 and 16, so the last chunk is partial), V = 50,
student hidden 16 and teacher hidden 24 (they may differ); the Triton cases use fewer rows because the
interpreter runs one program per row.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import kdkernels as kd
from kdkernels.torch_ops.fused_linear import auto_chunk_size
from kdkernels.torch_ops.reference import kd_loss_reference
from tests.utils import HAS_TRITON, rel_err

DIVERGENCES = ["fkl", "rkl", "akl", "todi", "sfkl", "srkl", "jsd", "tvd"]
# name -> (options of the loss, teacher given as logits, biases, chunk_size)
CASES = {
    "plain": (dict(), False, False, 8),
    "ce_bias_ignored_T2": (dict(temperature=2.0, kd_weight=0.5, ce_weight=0.5), False, True, 8),
    "teacher_logits_ce": (dict(ce_weight=0.3, temperature=0.7), True, True, 16),
    "sum_auto_chunk": (dict(reduction="sum", todi_beta=2.0, akl_alpha=0.3), False, False, None),
    "none": (dict(reduction="none", ce_weight=1.0, kd_weight=0.25), False, True, 8),
}


def make_inputs(n=37, hs=16, ht=24, vocab=50, bias=False, ignored=True, seed=0):
    """Student/teacher hidden states, weights, biases (or None), labels with every 5th row ignored."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(shape, generator=gen) * scale

    x = dict(h=randn(n, hs), w=randn(vocab, hs, scale=0.5), b=randn(vocab) if bias else None,
             g=randn(n, ht), u=randn(vocab, ht, scale=0.5), c=randn(vocab) if bias else None,
             labels=torch.randint(0, vocab, (n,), generator=gen))
    if ignored:
        x["labels"][::5] = -100
    return x


def fused_result(x, divergence, options, teacher_logits, chunk_size, backend="torch"):
    """Loss and gradients (dh, dW, db) of ``sum(loss * r)`` for a fixed random ``r``."""
    h, w = x["h"].clone().requires_grad_(), x["w"].clone().requires_grad_()
    b = None if x["b"] is None else x["b"].clone().requires_grad_()
    teacher = dict(teacher_logits=torch.nn.functional.linear(x["g"], x["u"], x["c"])) if teacher_logits else \
        dict(teacher_hidden=x["g"], teacher_weight=x["u"], teacher_bias=x["c"])
    loss = kd.fused_linear_kd_loss(h, w, divergence=divergence, student_bias=b, labels=x["labels"],
                                   backend=backend, chunk_size=chunk_size, **teacher, **options)
    return loss, _grads(loss, (h, w, b))


def reference_result(x, divergence, options):
    """The same loss through float64 logits and the plain reference."""
    h, w = x["h"].double().requires_grad_(), x["w"].double().requires_grad_()
    b = None if x["b"] is None else x["b"].double().requires_grad_()
    c = None if x["c"] is None else x["c"].double()
    z = torch.nn.functional.linear(h, w, b)
    t = torch.nn.functional.linear(x["g"].double(), x["u"].double(), c)
    loss = kd_loss_reference(z, t, divergence, labels=x["labels"], **options)
    return loss, _grads(loss, (h, w, b))


def _grads(loss, params):
    weight = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    live = [p for p in params if p is not None]
    grads = iter(torch.autograd.grad((loss * weight.to(loss.dtype)).sum(), live))
    return [None if p is None else next(grads) for p in params]


def assert_close(x, divergence, options, teacher_logits, chunk_size, backend="torch", tol=2e-5):
    loss, grads = fused_result(x, divergence, options, teacher_logits, chunk_size, backend)
    ref_loss, ref_grads = reference_result(x, divergence, options)
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert rel_err(loss, ref_loss) <= tol, rel_err(loss, ref_loss)
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert (got is None) == (want is None), name
        if got is not None:
            assert got.dtype == torch.float32 and torch.isfinite(got).all(), name
            assert rel_err(got, want) <= tol, (name, rel_err(got, want))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_reference_torch(divergence, case):
    options, teacher_logits, bias, chunk_size = CASES[case]
    assert_close(make_inputs(bias=bias), divergence, options, teacher_logits, chunk_size)


TRITON_CASES = [
    ("fkl", "ce_bias_ignored_T2"),
    ("akl", "plain"),
    ("todi", "teacher_logits_ce"),
    ("rkl", "none"),
    ("sfkl", "ce_bias_ignored_T2"),
    ("jsd", "teacher_logits_ce"),
    ("tvd", "plain"),
]


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("divergence,case", TRITON_CASES)
def test_matches_reference_triton(divergence, case):
    options, teacher_logits, bias, _ = CASES[case]
    x = make_inputs(n=11, vocab=40, bias=bias)
    assert_close(x, divergence, options, teacher_logits, chunk_size=4, backend="triton")


def test_all_rows_ignored_gives_zero():
    x = make_inputs(n=9, bias=True)
    x["labels"][:] = -100
    loss, grads = fused_result(x, "akl", dict(ce_weight=0.5), False, 4)
    assert loss.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_leading_shape_and_module():
    x = make_inputs(n=12)
    h, g, labels = x["h"].reshape(3, 4, -1), x["g"].reshape(3, 4, -1), x["labels"].reshape(3, 4)
    rows = kd.fused_linear_kd_loss(h, x["w"], g, x["u"], "todi", labels=labels, reduction="none")
    assert rows.shape == (3, 4)
    module = kd.FusedLinearKDLoss("todi", chunk_size=5)
    assert "chunk_size=5" in repr(module)
    torch.testing.assert_close(module(h, x["w"], g, x["u"], labels=labels), rows.sum() / (labels != -100).sum())


def test_no_grad_forward_only():
    x = make_inputs()
    w = x["w"].clone().requires_grad_()
    with torch.no_grad():
        loss = kd.fused_linear_kd_loss(x["h"], w, x["g"], x["u"], "fkl")
    assert not loss.requires_grad
    torch.testing.assert_close(loss, kd.kd_loss(x["h"] @ x["w"].T, x["g"] @ x["u"].T, "fkl"))


def test_bfloat16_matches_materialised_logits():
    x = {k: v.bfloat16() if v is not None and v.is_floating_point() else v for k, v in make_inputs().items()}
    h = x["h"].clone().requires_grad_()
    loss = kd.fused_linear_kd_loss(h, x["w"], x["g"], x["u"], "rkl", labels=x["labels"], chunk_size=8)
    (dh,) = torch.autograd.grad(loss, h)
    h2 = x["h"].clone().requires_grad_()
    ref = kd.kd_loss(h2 @ x["w"].T, x["g"] @ x["u"].T, "rkl", labels=x["labels"])
    (ref_dh,) = torch.autograd.grad(ref, h2)
    assert dh.dtype == torch.bfloat16
    assert rel_err(loss, ref) <= 1e-3 and rel_err(dh, ref_dh) <= 2e-2


def test_auto_chunk_size():
    assert auto_chunk_size(32000, 1024) == 512
    assert auto_chunk_size(128256, 4096) == 128
    assert auto_chunk_size(50, 16) == 256
    assert auto_chunk_size(1 << 26, 64) == 1


def _call(x, **overrides):
    args = dict(student_hidden=x["h"], student_weight=x["w"], teacher_hidden=x["g"], teacher_weight=x["u"])
    args.update(overrides)
    return kd.fused_linear_kd_loss(**args)


@pytest.mark.parametrize("overrides,error,match", [
    (lambda x: dict(teacher_weight=x["u"].clone().requires_grad_()), ValueError, "teacher_weight.*detach"),
    (lambda x: dict(teacher_hidden=x["g"].clone().requires_grad_()), ValueError, "teacher_hidden.*detach"),
    (lambda x: dict(teacher_hidden=None, teacher_weight=None,
                    teacher_logits=(x["g"] @ x["u"].T).requires_grad_()), ValueError, "teacher_logits.*detach"),
    (lambda x: dict(teacher_weight=x["u"][:-1]), ValueError, "vocabular"),
    (lambda x: dict(student_hidden=x["h"][:, :-1]), ValueError, "student_hidden hidden size"),
    (lambda x: dict(teacher_hidden=x["g"][:-1]), ValueError, "teacher_hidden leading shape"),
    (lambda x: dict(teacher_logits=x["g"] @ x["u"].T), ValueError, "either teacher_logits"),
    (lambda x: dict(teacher_weight=None), ValueError, "teacher needs"),
    (lambda x: dict(student_weight=x["w"].double()), TypeError, "student_hidden dtype"),
    (lambda x: dict(student_bias=torch.zeros(3)), ValueError, "student_bias must have shape"),
    (lambda x: dict(student_weight=x["w"][None]), ValueError, "student_weight must have shape"),
    (lambda x: dict(student_hidden=x["h"].long()), TypeError, "student_hidden"),
    (lambda x: dict(labels=x["labels"][:-1]), ValueError, "labels"),
    (lambda x: dict(ce_weight=0.5), ValueError, "ce_weight"),
    (lambda x: dict(chunk_size=0), ValueError, "chunk_size"),
    (lambda x: dict(chunk_size=2.0), TypeError, "chunk_size"),
    (lambda x: dict(backend="reference"), ValueError, "backend"),
    (lambda x: dict(divergence="js"), ValueError, "divergence"),
    (lambda x: dict(temperature=0.0), ValueError, "temperature"),
])
def test_rejects_bad_arguments(overrides, error, match):
    x = make_inputs()
    with pytest.raises(error, match=match):
        _call(x, **overrides(x))


def test_peak_memory_does_not_grow_with_tokens():
    """Peak extra resident memory (fresh subprocesses) at N and 10 N, same chunk size, V = 16384, hidden 32.

    Full float32 logits at 10 N = 1024 rows are 64 MiB; the fused path may grow only by its (N, hidden)
    tensors (128 KiB each), so it must grow by less than 8 MiB. The "matmul then kd_loss" path is measured
    the same way and must grow by more than 32 MiB, which shows the measurement can fail. glibc's mmap
    threshold is fixed so that every large buffer is mapped and unmapped: with its default dynamic threshold
    the freed chunk buffers are reused from a heap that fragments, which adds a few MiB of noise.
    """
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/status")
    from bench.fused_linear import run_provider

    def peak(provider_and_n):
        provider, n = provider_and_n
        argv = ["--n", str(n), "--hidden", "32", "--vocab", "16384", "--chunk-size", "32", "--repeats", "1",
                "--warmup", "1", "--threads", "1", "--device", "cpu", "--divergence", "fkl", "--ce-weight", "0.5"]
        return run_provider(provider, argv, env={"MALLOC_MMAP_THRESHOLD_": "65536"})["peak_bytes"] / 2**20

    runs = [("fused", 1024), ("fused", 102), ("matmul", 1024), ("matmul", 102)]
    with ThreadPoolExecutor(max_workers=2) as pool:  # each in its own process
        fused_big, fused_small, matmul_big, matmul_small = pool.map(peak, runs)
    assert matmul_big - matmul_small > 32, (matmul_big, matmul_small)
    assert fused_big - fused_small < 8, (fused_big, fused_small)


def test_second_backward_explains_itself():
    """The gradients made in the forward go to the first backward; a second one says why it cannot run."""
    x = make_inputs(n=6)
    h = x["h"].clone().requires_grad_()
    loss = kd.fused_linear_kd_loss(h, x["w"], x["g"], x["u"], "fkl")
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    with pytest.raises(RuntimeError, match=r"second backward through the same loss \(retain_graph=True\) is not "
                                           r"supported: compute the loss again"):
        loss.backward()
    torch.testing.assert_close(h.grad, first)  # nothing was added


def test_second_backward_with_reduction_none():
    """``reduction="none"`` recomputes in its backward, so a retained graph gives the same gradient twice."""
    x = make_inputs(n=6)
    h = x["h"].clone().requires_grad_()
    loss = kd.fused_linear_kd_loss(h, x["w"], x["g"], x["u"], "fkl", reduction="none").sum()
    (first,) = torch.autograd.grad(loss, h, retain_graph=True)
    (second,) = torch.autograd.grad(loss, h)
    torch.testing.assert_close(first, second)


@pytest.mark.parametrize("teacher_logits", [False, True])
def test_vocab_size_uses_first_rows_of_padded_heads(teacher_logits):
    """Heads of 50 and 53 rows over one 47-token vocabulary: the loss of the first 47 rows, as views.

    The padded rows (huge logits) would dominate every distribution if they were read; they get zero gradient.
    """
    x = make_inputs(n=9, bias=True, vocab=47)
    pad = lambda t, rows: torch.cat([t, torch.full((rows, *t.shape[1:]), 50.0)])
    w = pad(x["w"], 3).requires_grad_()
    b = pad(x["b"], 3).requires_grad_()
    u, c = pad(x["u"], 6), pad(x["c"], 6)
    teacher = dict(teacher_logits=torch.nn.functional.linear(x["g"], u, c)) if teacher_logits else \
        dict(teacher_hidden=x["g"], teacher_weight=u, teacher_bias=c)
    loss = kd.fused_linear_kd_loss(x["h"], w, student_bias=b, labels=x["labels"], ce_weight=0.5, vocab_size=47,
                                   **teacher)
    loss.backward()
    ref = kd.fused_linear_kd_loss(x["h"], x["w"], x["g"], x["u"], student_bias=x["b"], teacher_bias=x["c"],
                                  labels=x["labels"], ce_weight=0.5)
    torch.testing.assert_close(loss, ref)
    assert w.grad[:47].abs().sum() > 0 and torch.equal(w.grad[47:], torch.zeros(3, 16))
    assert torch.equal(b.grad[47:], torch.zeros(3))


def test_vocab_size_is_named_and_checked():
    x = make_inputs(n=4)
    with pytest.raises(ValueError, match="pass vocab_size="):
        _call(x, teacher_weight=torch.cat([x["u"], x["u"][:2]]))
    with pytest.raises(ValueError, match="vocab_size=51 exceeds the 50 vocabulary entries of student_weight"):
        _call(x, vocab_size=51)
    with pytest.raises(TypeError, match="vocab_size"):
        _call(x, vocab_size=4.0)
    with pytest.raises(ValueError, match="vocab_size"):
        _call(x, vocab_size=0)
