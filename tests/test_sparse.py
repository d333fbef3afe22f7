"""Sparse (top-k) teachers (issue 12, SPEC §7): ``sparse_kd_loss`` and ``topk_teacher`` against the float64 reference.

Every backend (torch; Triton through the interpreter) against ``sparse_reference.py`` on the same rounded inputs,
for each divergence x tail x K (1, 8, 64, V - 1), cycling the temperature, the student and log-prob dtypes and the
CE term over K; every case has an ignored row (NaN logits, out-of-range ids: not read), padding entries (-inf
log-probs whose ids repeat a valid id or leave the vocabulary), a row of padding only and a masked student
entry. Then: K = V with the bucket tail equals the dense op; invalid rows are NaN; bad arguments raise naming
themselves; ``topk_teacher`` equals a stable float64 sort, ties included; no host synchronisation;
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import kdkernels as kd
from kdkernels.torch_ops import sparse_ops
from kdkernels.torch_ops.options import loss_options
from kdkernels.torch_ops.reference import DIVERGENCES
from kdkernels.torch_ops.sparse_reference import sparse_kd_loss_reference, topk_teacher_reference
from tests.test_host_sync import SYNC_METHODS, ScalarReads
from tests.utils import BACKENDS, TOLERANCE, loss_and_grad, rel_err

VOCAB = 100
N_ROWS = 6
# (temperature, student dtype, log-prob dtype, ce_weight) for each K of the matrix
CYCLE = {1: (1.0, torch.float32, torch.float32, 0.0), 8: (2.0, torch.bfloat16, torch.bfloat16, 0.5),
         64: (1.0, torch.bfloat16, torch.float16, 0.5), VOCAB - 1: (0.5, torch.float32, torch.float32, 0.0)}


def sparse_case(k: int, student_dtype=torch.float32, lp_dtype=torch.float32, seed: int = 0, vocab: int = VOCAB,
                n_rows: int = N_ROWS):
    """``(z, ids, lp, labels)``: top-k of a random teacher, shuffled within each row, with the edge rows above."""
    gen = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(n_rows, vocab, generator=gen, dtype=torch.float64)
    t = 3 * torch.randn(n_rows, vocab, generator=gen, dtype=torch.float64)
    ids, lp = topk_teacher_reference(t, k)
    perm = torch.rand(n_rows, k, generator=gen).argsort(-1)
    ids, lp = ids.gather(1, perm), lp.gather(1, perm)
    labels = torch.randint(0, vocab, (n_rows,), generator=gen)
    labels[1] = -100
    z[1] = float("nan")  # an ignored row is not read
    ids[1] = vocab + 3
    outside = (torch.arange(vocab)[None, :] != ids[0, :, None]).all(0).nonzero()
    if len(outside):
        z[0, outside[0, 0]] = float("-inf")  # a masked student entry outside K
    z[3, ids[3, 0]] = float("-inf")  # and one inside K
    if k >= 2:
        lp[2, 0], ids[2, 0] = float("-inf"), ids[2, 1]  # padding repeating a valid id
        lp[3, -1], ids[3, -1] = float("-inf"), vocab + 7  # padding outside the vocabulary
    lp[4] = float("-inf")  # padding only: the teacher's mass is all in the rest
    labels[0], labels[3], labels[5] = ids[0, 0], (ids[3, 0] + 1) % vocab, ids[5, 0]  # finite student logits
    return z.to(student_dtype), ids, lp.to(lp_dtype), labels


def check_against_reference(z, ids, lp, labels, divergence, tail, backend, **options):
    """Loss (reduction none) and gradient match the float64 reference within the student dtype's tolerance."""
    kwargs = dict(tail=tail, labels=labels, reduction="none", **options)
    loss, grad = loss_and_grad(lambda x: kd.sparse_kd_loss(x, ids, lp, divergence, backend=backend, **kwargs), z)
    ref_loss, ref_grad = loss_and_grad(
        lambda x: sparse_kd_loss_reference(x, ids, lp.double(), divergence, **kwargs), z.double())
    assert loss.dtype == torch.float32 and grad.dtype == z.dtype
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    tol_loss, tol_grad = TOLERANCE[z.dtype]
    assert rel_err(loss, ref_loss) <= tol_loss, (rel_err(loss, ref_loss), tol_loss)
    assert rel_err(grad, ref_grad) <= tol_grad, (rel_err(grad, ref_grad), tol_grad)
    ignored = labels == -100
    assert (loss[ignored] == 0).all() and (grad[ignored] == 0).all()
    return loss, grad


MATRIX = [(d, tail) for d in DIVERGENCES for tail in sparse_ops.TAILS if tail != "truncate" or d == "fkl"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", list(CYCLE))
@pytest.mark.parametrize(("divergence", "tail"), MATRIX)
def test_matches_reference(divergence, tail, k, backend):
    temperature, student_dtype, lp_dtype, ce_weight = CYCLE[k]
    z, ids, lp, labels = sparse_case(k, student_dtype, lp_dtype, seed=k)
    loss, grad = check_against_reference(z, ids, lp, labels, divergence, tail, backend, temperature=temperature,
                                         ce_weight=ce_weight, todi_beta=2.0 if k == 8 else 1.0)
    if tail == "renormalize" and ce_weight == 0.0:
        in_k = torch.zeros(N_ROWS, VOCAB + 1, dtype=torch.bool)
        in_k.scatter_(1, torch.where(lp != float("-inf"), ids, VOCAB).clamp(0, VOCAB), True)
        assert (grad[~in_k[:, :VOCAB]] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize(("divergence", "tail"), [("fkl", "bucket"), ("jsd", "bucket"), ("srkl", "renormalize"),
                                                  ("tvd", "renormalize")])
def test_finfo_min_student_entries(divergence, tail, temperature, backend):
    """Student logits at float32's ``finfo.min`` outside the teacher's K (a padded vocabulary) and, for the bounded
    divergences, inside it: ``(x - max) / T`` overflows at ``T < 1``, yet they are entries of probability 0, not
    masked ones (only ``-inf`` masks): loss and gradient match the reference. (Inside K under an unbounded divergence
    the reference is ~1e37.)"""
    z, ids, lp, labels = sparse_case(8, seed=3)
    lowest = torch.finfo(torch.float32).min
    for row in (0, 2, 5):
        outside = (torch.arange(VOCAB)[:, None] != ids[row][None, :]).all(1) & (z[row] != float("-inf"))
        outside[labels[row]] = False  # a label there would make the CE term ~1e38
        z[row, outside.nonzero()[::3, 0]] = lowest
    if divergence != "fkl":
        z[5, ids[5, 2]] = lowest
    check_against_reference(z, ids, lp, labels, divergence, tail, backend, temperature=temperature, ce_weight=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions(reduction, backend):
    z, ids, lp, labels = sparse_case(8)
    got = loss_and_grad(lambda x: kd.sparse_kd_loss(x, ids, lp, "rkl", labels=labels, reduction=reduction,
                                                    backend=backend), z)
    ref = loss_and_grad(lambda x: sparse_kd_loss_reference(x, ids, lp.double(), "rkl", labels=labels,
                                                           reduction=reduction), z.double())
    assert rel_err(got[0], ref[0]) <= 1e-5 and rel_err(got[1], ref[1]) <= 1e-5
    everything_ignored = torch.full_like(labels, -100)
    loss, grad = loss_and_grad(lambda x: kd.sparse_kd_loss(x, ids, lp, "rkl", labels=everything_ignored,
                                                           reduction=reduction, backend=backend), z)
    assert loss == 0 and (grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_bucket_with_every_id_equals_the_dense_op(divergence, backend):
    """K = V, no padding: the rest category is empty and the loss is the dense one (teacher at the same T)."""
    gen = torch.Generator().manual_seed(1)
    z = 2 * torch.randn(4, 40, generator=gen)
    t = 2 * torch.randn(4, 40, generator=gen)
    ids, lp = kd.topk_teacher(t, 40, temperature=2.0)
    sparse_loss, sparse_grad = loss_and_grad(
        lambda x: kd.sparse_kd_loss(x, ids, lp, divergence, temperature=2.0, reduction="none", backend=backend), z)
    dense_loss, dense_grad = loss_and_grad(
        lambda x: kd.kd_loss(x, t, divergence, temperature=2.0, reduction="none", backend=backend), z)
    assert rel_err(sparse_loss, dense_loss) <= 1e-5 and rel_err(sparse_grad, dense_grad) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", sparse_ops.TAILS)
def test_invalid_ids_give_a_nan_row(tail, backend):
    """A repeated valid id or one outside [0, V) makes that row's loss and whole gradient NaN; the others stay
    exact. Ids of padding entries are never checked."""
    z, ids, lp, labels = sparse_case(8, seed=3)
    ids[0, 1] = ids[0, 2]  # repeated
    ids[5, 0] = VOCAB  # out of range
    ids[4, 0] = -1  # padding (row 4 is all padding): fine
    loss, grad = loss_and_grad(lambda x: kd.sparse_kd_loss(x, ids, lp, "fkl", tail=tail, labels=labels,
                                                           reduction="none", backend=backend), z)
    bad = torch.tensor([True, False, False, False, False, True])
    assert loss[bad].isnan().all() and grad[bad].isnan().all()
    assert torch.isfinite(loss[~bad]).all() and torch.isfinite(grad[~bad]).all()
    ref = sparse_kd_loss_reference(z.double(), ids, lp.double(), "fkl", tail=tail, labels=labels, reduction="none")
    assert ref[bad].isnan().all() and rel_err(loss[~bad], ref[~bad]) <= 1e-5


def test_truncate_can_be_negative():
    """Truncation is not a divergence: with the student above the teacher on every top-k entry it is negative."""
    z = torch.tensor([[4.0, 3.0, -2.0, -2.0]])
    ids = torch.tensor([[0, 1]])
    lp = torch.log(torch.tensor([[0.4, 0.3]]))
    assert kd.sparse_kd_loss(z, ids, lp, "fkl", tail="truncate") < 0
    assert kd.sparse_kd_loss(z, ids, lp, "fkl", tail="bucket") > 0


def test_bad_arguments_name_themselves():
    z = torch.randn(2, 3, 10)
    ids = torch.randint(0, 10, (2, 3, 4))
    lp = torch.randn(2, 3, 4)
    cases = [
        (dict(teacher_indices=ids.float()), TypeError, "teacher_indices"),
        (dict(teacher_indices=ids[:, :2]), ValueError, "teacher_indices"),
        (dict(teacher_indices=ids[..., :0], teacher_logprobs=lp[..., :0]), ValueError, "teacher_indices"),
        (dict(teacher_logprobs=lp[..., :3]), ValueError, "teacher_logprobs"),
        (dict(teacher_logprobs=lp.long()), TypeError, "teacher_logprobs"),
        (dict(teacher_logprobs=lp.requires_grad_()), ValueError, "teacher_logprobs"),
        (dict(teacher_indices=ids.to("meta")), ValueError, "teacher_indices"),
        (dict(tail="top"), ValueError, "tail"),
        (dict(divergence="rkl", tail="truncate"), ValueError, "truncate"),
        (dict(labels=torch.zeros(2, dtype=torch.long)), ValueError, "labels"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(ce_weight=0.5), ValueError, "ce_weight"),
    ]
    for change, error, name in cases:
        kwargs = dict(student_logits=z, teacher_indices=ids, teacher_logprobs=lp.detach(), divergence="fkl")
        kwargs.update(change)
        with pytest.raises(error, match=name):
            kd.sparse_kd_loss(**kwargs)
    for k, error in ((0, ValueError), (11, ValueError), (2.0, TypeError)):
        with pytest.raises(error, match="k"):
            kd.topk_teacher(z, k)
    with pytest.raises(ValueError, match="temperature"):
        kd.topk_teacher(z, 2, temperature=-1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "k", "temperature"), [
    (torch.float32, 1, 1.0), (torch.float32, 8, 2.0), (torch.bfloat16, 37, 1.0), (torch.bfloat16, 64, 0.5),
    (torch.float16, 100, 1.0), (torch.bfloat16, 300, 1.0)])
def test_topk_teacher_matches_a_stable_float64_sort(dtype, k, temperature, backend):
    """Ids exactly (ties at the k-th value to the lower id: the bf16 teacher rounds to a few values), log-probs to
    float32 rounding. k = 300 > 256 runs the torch path on the Triton backend; the 3-D input checks the shape."""
    gen = torch.Generator().manual_seed(k)
    vocab = 400 if k == 300 else VOCAB
    t = (2 * torch.randn(2, 2, vocab, generator=gen)).to(dtype)
    if dtype == torch.bfloat16:
        t = t.round()  # ties everywhere
    t[0, 0, 5] = float("-inf")
    ids, lp = kd.topk_teacher(t, k, temperature=temperature, backend=backend)
    ref_ids, ref_lp = topk_teacher_reference(t, k, temperature)
    assert ids.dtype == torch.int64 and lp.dtype == torch.float32 and ids.shape == (2, 2, k)
    assert torch.equal(ids, ref_ids)
    finite = ref_lp.isfinite()
    assert torch.equal(finite, lp.isfinite())
    assert (lp[finite].double() - ref_lp[finite]).abs().max() <= 2e-6 * max(1.0, ref_lp[finite].abs().max())


def test_topk_from_hidden_equals_topk_of_the_logits():
    gen = torch.Generator().manual_seed(0)
    h, w, b = torch.randn(3, 5, 16, generator=gen), torch.randn(50, 16, generator=gen), torch.randn(50, generator=gen)
    ids, lp = kd.topk_teacher_from_hidden(h, w, 7, bias=b, temperature=2.0, chunk_size=4)
    ref_ids, ref_lp = kd.topk_teacher(torch.nn.functional.linear(h, w, b), 7, temperature=2.0)
    assert torch.equal(ids, ref_ids) and torch.allclose(lp, ref_lp, rtol=0, atol=1e-5)  # chunked matmul rounding
    with pytest.raises(ValueError, match="hidden"):
        kd.topk_teacher_from_hidden(h[..., :8], w, 7)


def test_torch_backend_reads_no_values():
    """The torch backend's forward (validity check, statistics, categories, dense op) and backward run no aten op
    that would synchronise a CUDA stream."""
    z, ids, lp, labels = sparse_case(8)
    opts = loss_options("akl", temperature=2.0, ce_weight=0.5)
    with ScalarReads() as mode:
        for tail in sparse_ops.TAILS:
            tail_opts = opts._replace(divergence="fkl") if tail == "truncate" else opts
            rows, stats, grad_k = sparse_ops.forward_rows(z, ids, lp, labels, tail_opts, tail, "torch")
            sparse_ops.torch_backward(torch.ones_like(rows), z, ids, lp, labels, stats, grad_k, opts, tail == "bucket")
        sparse_ops.forward_rows(z, ids, lp, labels, opts, "bucket", "torch", rest_lp=torch.full((N_ROWS,), -3.0))
        top, _ = sparse_ops.torch_topk(z, 5, 2.0)
        sparse_ops.rest_rows(z, top, 2.0, "torch")
    assert not mode.seen, mode.seen


@pytest.mark.parametrize("module", ["torch_ops/sparse.py", "torch_ops/sparse_ops.py", "torch_ops/sparse_reference.py",
                                    "kernels/sparse.py"])
def test_op_modules_call_no_sync_method(module):
    tree = ast.parse((Path(kd.__file__).parent / module).read_text())
    calls = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr in SYNC_METHODS]
    assert not calls, f"{module} syncs with the host at lines {calls}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_with_fullgraph(backend):
    """``sparse_kd_loss`` and ``topk_teacher`` trace without graph breaks (aot_eager: Dynamo and AOTAutograd through
    the fake implementations) and match eager."""
    torch._dynamo.reset()
    z, ids, lp, labels = sparse_case(8, seed=2)
    labels[1], z[1], ids[1] = 0, 0.0, ids[0]  # a kept, valid row

    rest = torch.full((N_ROWS,), -3.0)

    def step(student, ids, lp, labels, rest):
        return kd.sparse_kd_loss(student, ids, lp, "todi", labels=labels, temperature=2.0, kd_weight=0.5,
                                 ce_weight=0.5, teacher_rest_logprob=rest, backend=backend)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        for given in (None, rest):
            results.append(loss_and_grad(lambda x, fn=fn, given=given: fn(x, ids, lp, labels, given), z))
    assert all(torch.equal(a, b) for i in (0, 1) for a, b in zip(results[i], results[i + 2]))
    assert not torch.equal(results[0][0], results[1][0])  # the rest is used
    top = torch.compile(lambda t: kd.topk_teacher(t, 4, temperature=2.0, return_rest=True, backend=backend),
                        fullgraph=True, backend="aot_eager")
    eager = kd.topk_teacher(z, 4, temperature=2.0, return_rest=True, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(top(z), eager))
    torch._dynamo.reset()
