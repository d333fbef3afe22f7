"""Vocabulary-parallel losses (SPEC §8) under torch.distributed: 2 and 3 gloo processes on the CPU, uneven slices.

Each process holds one slice of the vocabulary of the same rows (``SPLITS``) and computes the loss and its slice's
gradient with ``process_group=``, for every divergence, reduction and two temperatures, on the torch backend and
the Triton kernels (interpreter), with ignored rows (NaN padding), ``-inf`` entries, a teacher row of all ``-inf``,
a hard-label term whose labels fall on different ranks, and an AKL row whose cut falls inside a tie group that
spans ranks. The parent process checks that every rank's loss is the same, equals the unsharded ``kd_loss`` and
the float64 reference, and that the slices' gradients put together equal the unsharded gradient. The same for
``sparse_kd_loss`` (top-k ids on every rank), ``fused_linear_kd_loss`` (output rows split, the hidden states'
gradient summed), a group of two of the three processes, and rows with NaN / ``+inf`` entries on one rank. The
workers also count the bytes they all-reduce (``vocab_parallel.all_reduce``, through which every collective of the
path goes, wrapped) against ``bytes_per_row``, the README's table, with the shape table and with an explicit
``vocab_range`` (no table), and check the errors of inconsistent shards. Last, the torchrun example against one
process.
"""

from __future__ import annotations

import datetime
import fcntl
import functools
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import kdkernels as kd  # noqa: E402
from bench.vocab_parallel import leave_rank  # noqa: E402
from kdkernels.torch_ops import layout, vocab_parallel  # noqa: E402
from kdkernels.torch_ops.akl_select import akl_tail_select  # noqa: E402
from kdkernels.torch_ops.options import loss_options  # noqa: E402
from kdkernels.torch_ops.reference import REDUCTIONS, akl_weights  # noqa: E402
from tests.utils import BACKENDS, TOLERANCE, loss_and_grad, reference_loss_and_grad, rel_err  # noqa: E402

VOCAB = 37
LEAD = (2, 5)
SPLITS = {2: (15, 22), 3: (10, 17, 10)}
ALPHA = 0.5
PARAMS = {"akl": {"akl_alpha": ALPHA}, "todi": {"todi_beta": 0.7}, "sfkl": {"skew_lambda": 0.2},
          "srkl": {"skew_lambda": 0.2}, "jsd": {"jsd_beta": 0.3}}
DIVERGENCES = ("fkl", "rkl", "akl", "todi", "sfkl", "srkl", "jsd", "tvd")


def _cases():
    """``(backend, divergence, reduction, temperature, ce_weight, dtype, with_labels, module)`` tuples."""
    cases = []
    for i, divergence in enumerate(DIVERGENCES):
        for j, reduction in enumerate(REDUCTIONS):
            for temperature in (1.0, 2.0):
                ce = 0.5 if (i + j) % 2 == 0 else 0.0
                cases.append(("torch", divergence, reduction, temperature, ce, torch.float32, True, j == 1))
        if "triton" in BACKENDS:
            for temperature in (1.0, 2.0):
                ce = 0.5 if temperature == 2.0 else 0.0
                cases.append(("triton", divergence, REDUCTIONS[i % 3], temperature, ce, torch.float32, True, False))
    cases += [("torch", "akl", "none", 1.0, 0.0, torch.bfloat16, True, False),
              ("torch", "akl", "mean", 2.0, 0.5, torch.float64, True, False),
              ("torch", "fkl", "mean", 2.0, 0.0, torch.float32, False, False),
              ("torch", "akl", "sum", 1.0, 0.0, torch.float32, False, False)]
    if "triton" in BACKENDS:
        cases.append(("triton", "akl", "none", 2.0, 0.5, torch.bfloat16, True, False))
    return cases


CASES = _cases()


def tie_row(n_rows: int = 1) -> torch.Tensor:
    """Teacher rows of ``VOCAB`` zeros but three 2.0: at ``ALPHA = 0.5`` and ``T = 1`` the cut falls inside the
    tie group of zeros, at its 29th entry (index 29), past the first rank's slice for both splits."""
    t = torch.zeros(n_rows, VOCAB)
    t[:, [1, 33, 36]] = 2.0
    return t


def data(dtype: torch.dtype, padded: bool = True):
    """Student and teacher logits ``(*LEAD, VOCAB)`` and labels ``LEAD``, the same in every process; ``padded``:
    NaN in the two rows whose label is ``-100`` (for the cases with labels)."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(10, VOCAB, generator=gen, dtype=torch.float64) * 2
    t = torch.randn(10, VOCAB, generator=gen, dtype=torch.float64) * 2
    z[1, [3, 20]] = float("-inf")  # -inf entries on both ranks of either split
    t[1, [5, 20, 30]] = float("-inf")
    t[2] = tie_row()[0]
    t[6] = float("-inf")  # a teacher row with no distribution: divergence 0, the CE term stays
    z[3, 10:30] = z[3, 10:30].round()  # student ties too
    labels = torch.tensor([2, 25, 36, 14, -100, 15, 9, -100, 27, 0])
    if padded:  # an ignored row's padding reaches no other row, and no rank's result
        z[4], t[4] = float("nan"), float("nan")
        z[7, :5], t[7, 30:] = float("nan"), float("nan")
    return z.to(dtype).reshape(*LEAD, VOCAB), t.to(dtype).reshape(*LEAD, VOCAB), labels.reshape(LEAD)


def case_loss(case, z, t, labels, process_group=None):
    backend, divergence, reduction, temperature, ce, _, with_labels, module = case
    options = dict(reduction=reduction, temperature=temperature, ce_weight=ce, **PARAMS.get(divergence, {}))
    labels = labels if with_labels else None
    if module:
        return kd.KDLoss(divergence, backend=backend, process_group=process_group, **options)(z, t, labels)
    return kd.kd_loss(z, t, divergence, labels=labels, backend=backend, process_group=process_group, **options)


def _slice(world: int, rank: int) -> slice:
    lo = sum(SPLITS[world][:rank])
    return slice(lo, lo + SPLITS[world][rank])


def _count_bytes(world: int, group) -> dict:
    """Bytes all-reduced per row, with ``vocab_parallel.all_reduce`` (every collective of the path) wrapped, by
    case: ``[(forward, backward) with the shape table (its bytes taken off), (forward, backward) with an explicit
    vocab_range (no table)]``."""
    real = vocab_parallel.all_reduce
    sent = []
    vocab_parallel.all_reduce = lambda x, op, group: (sent.append(x.numel() * x.element_size()), real(x, op, group))[1]
    cols = _slice(world, dist.get_rank())

    def count(loss_fn, z, table_bytes: int, rows: int) -> list[tuple[float, int]]:
        modes = []
        for vocab_range in (None, (cols.start, cols.stop, VOCAB)):
            sent.clear()
            loss = loss_fn(z[..., cols].clone().requires_grad_(True), vocab_range)
            forward = sum(sent) - (table_bytes if vocab_range is None else 0)
            sent.clear()
            loss.backward()
            modes.append((forward / rows, sum(sent)))
        return modes

    counts = {}
    try:
        for divergence, dtype, ce, temperature in [(d, torch.float32, 0.0, 1.0) for d in DIVERGENCES] + [
                ("akl", torch.bfloat16, 0.0, 1.0), ("fkl", torch.float32, 0.5, 1.0), ("fkl", torch.float32, 0.5, 2.0),
                ("akl", torch.float64, 0.5, 2.0)]:
            z, t, labels = data(dtype)

            def dense(x, vocab_range, t=t[..., cols], labels=labels, divergence=divergence, ce=ce, T=temperature):
                return kd.kd_loss(x, t, divergence, labels=labels, ce_weight=ce, temperature=T, process_group=group,
                                  vocab_range=vocab_range)

            # the shape table: (world, 4) int64, 32 bytes per rank
            counts[(divergence, dtype, ce, temperature)] = count(dense, z, 32 * world, labels.numel())
        for ce, temperature in ((0.0, 1.0), (0.5, 1.0), (0.5, 2.0)):
            z, t, labels = data(torch.float32)
            ids, lp = kd.topk_teacher(torch.nan_to_num(t, nan=0.0, neginf=-30.0), 6)

            def sparse(x, vocab_range, ids=ids, lp=lp, labels=labels, ce=ce, T=temperature):
                return kd.sparse_kd_loss(x, ids, lp, "fkl", labels=labels, ce_weight=ce, temperature=T,
                                         process_group=group, vocab_range=vocab_range)

            # the shape table: (world, 6) int64, 48 bytes per rank
            counts[("sparse", 6, ce, temperature)] = count(sparse, z, 48 * world, labels.numel())
    finally:
        vocab_parallel.all_reduce = real
    return counts


def _errors(world: int, rank: int, group) -> list[str]:
    """The messages of the errors that inconsistent shards and bad groups raise, on every rank alike."""
    z, t, labels = data(torch.float32)
    cols, width = _slice(world, rank), SPLITS[world][rank]
    z, t = z[..., cols].reshape(-1, width), t[..., cols].reshape(-1, width)
    labels = labels.reshape(-1)
    messages = []
    rows = slice(None) if rank else slice(1, None)  # rank 0 holds one row fewer
    with pytest.raises(ValueError, match="same student_logits rows") as err:
        kd.kd_loss(z[rows], t[rows], "fkl", labels=labels[rows], process_group=group)
    messages.append(str(err.value))
    with pytest.raises(ValueError, match="same divergence"):
        kd.kd_loss(z, t, "fkl" if rank else "rkl", process_group=group)
    with pytest.raises(ValueError, match="same labels"):
        kd.kd_loss(z, t, "fkl", labels=labels if rank else None, process_group=group)
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup"):
        kd.kd_loss(z, t, "fkl", process_group="world")
    with pytest.raises(ValueError, match="backend='reference' does not take process_group"):
        kd.kd_loss(z, t, "fkl", backend="reference", process_group=group)
    return messages


FUSED_CASES = [("torch", "fkl", "mean", 1.0, 0.0, "hidden"), ("torch", "akl", "sum", 2.0, 0.5, "logits"),
               ("torch", "todi", "none", 2.0, 0.5, "hidden"), ("torch", "srkl", "mean", 1.0, 0.5, "logits")]
if "triton" in BACKENDS:
    FUSED_CASES.append(("triton", "jsd", "mean", 1.0, 0.5, "hidden"))


def fused_data():
    """Hidden states ``(*LEAD, 8)`` / ``(*LEAD, 12)``, output weights ``(VOCAB, 8)`` / ``(VOCAB, 12)`` and biases."""
    gen = torch.Generator().manual_seed(2)
    h, g = torch.randn(*LEAD, 8, generator=gen), torch.randn(*LEAD, 12, generator=gen)
    w, u = torch.randn(VOCAB, 8, generator=gen) * 0.7, torch.randn(VOCAB, 12, generator=gen) * 0.7
    b, c = torch.randn(VOCAB, generator=gen), torch.randn(VOCAB, generator=gen)
    return h, w, b, g, u, c


def fused_loss_and_grads(case, cols: slice = slice(None), process_group=None):
    """Loss of a fused case on the output rows ``cols`` and the gradients of ``(h, W[cols], b[cols])``."""
    backend, divergence, reduction, temperature, ce, teacher = case
    h, w, b, g, u, c = fused_data()
    h, w, b = (x.clone().requires_grad_(True) for x in (h, w[cols], b[cols]))
    if teacher == "hidden":
        given = dict(teacher_hidden=g, teacher_weight=u[cols], teacher_bias=c[cols])
    else:
        given = dict(teacher_logits=(g @ u.T)[..., cols])
    labels = data(torch.float32)[2]
    loss = kd.fused_linear_kd_loss(h, w, divergence=divergence, student_bias=b, labels=labels, backend=backend,
                                   reduction=reduction, temperature=temperature, ce_weight=ce, chunk_size=4,
                                   process_group=process_group, **given, **PARAMS.get(divergence, {}))
    weight = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3))
    (loss * weight).sum().backward()
    return loss.detach(), h.grad, w.grad, b.grad


SPARSE_CASES = [("torch", "fkl", "bucket", 1.0, 0.5), ("torch", "akl", "bucket", 2.0, 0.0),
                ("torch", "todi", "renormalize", 2.0, 0.5), ("torch", "fkl", "truncate", 2.0, 0.5),
                ("torch", "tvd", "bucket", 1.0, 0.0), ("torch", "rkl", "bucket+rest", 1.0, 0.5)]
if "triton" in BACKENDS:
    SPARSE_CASES += [("triton", "rkl", "bucket", 2.0, 0.5), ("triton", "jsd", "renormalize", 1.0, 0.0)]


def sparse_loss_and_grad(case, cols: slice = slice(None), process_group=None):
    """Loss of a sparse case (top-6 teacher of ``data``'s, padded, ids on every rank; ``bucket+rest``: with the
    teacher's exact mass outside them) on the student's columns ``cols`` and its gradient there."""
    backend, divergence, tail, temperature, ce = case
    z, t, labels = data(torch.float32, padded=False)
    ids, lp, rest = kd.topk_teacher(torch.nan_to_num(t, neginf=-30.0), 6, return_rest=True)
    lp[0, 1, 2:] = float("-inf")  # padding in one row
    tail, with_rest = tail.removesuffix("+rest"), tail.endswith("+rest")
    return loss_and_grad(lambda x: kd.sparse_kd_loss(x, ids, lp, divergence, tail=tail, labels=labels,
                                                     backend=backend, temperature=temperature, ce_weight=ce,
                                                     reduction="sum", process_group=process_group,
                                                     teacher_rest_logprob=rest if with_rest else None,
                                                     **PARAMS.get(divergence, {})), z[..., cols])


def invalid_data():
    """``data``'s rows with a NaN student entry in row 0 (last id) and a ``+inf`` teacher entry in row 1 (id 0)."""
    z, t, labels = data(torch.float32)
    z[0, 0, -1], t[0, 1, 0] = float("nan"), float("inf")
    return z, t, labels


SUBGROUP_CASE = ("torch", "akl", "sum", 2.0, 0.5, torch.float32, True, False)


EMPTY_CASES = [("torch", d) for d in DIVERGENCES]
if "triton" in BACKENDS:
    EMPTY_CASES += [("triton", d) for d in ("fkl", "akl", "todi")]


def empty_slice_loss_and_grad(case, rank: int, group):
    """Rank 0 holds the whole vocabulary, the others an empty slice (explicit ranges): ``(loss, grad)``."""
    backend, divergence = case
    z, t, labels = data(torch.float32)
    whole = slice(0, VOCAB) if rank == 0 else slice(VOCAB, VOCAB)
    options = dict(temperature=2.0, ce_weight=0.5, **PARAMS.get(divergence, {}))
    return loss_and_grad(lambda x: kd.kd_loss(x, t[..., whole], divergence, labels=labels, backend=backend,
                                              process_group=group, vocab_range=(whole.start, whole.stop, VOCAB),
                                              **options), z[..., whole])


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    group = dist.group.WORLD
    cols = _slice(world, rank)
    results = {"cases": {}}
    for case in CASES:
        z, t, labels = data(case[5], padded=case[6])
        t_slice = t[..., cols]
        results["cases"][case] = loss_and_grad(
            lambda x, case=case, t_slice=t_slice, labels=labels: case_loss(case, x, t_slice, labels, group),
            z[..., cols])
    # AKL's split on tie rows, from the forward's global statistics: the slice's p and q and its tail.
    t = tie_row(3)[:, cols]
    z = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(1))[:, cols]
    opts = loss_options("akl", akl_alpha=ALPHA)
    reducer = vocab_parallel.GroupReducer(group)
    shard = vocab_parallel.table_shard(reducer, z.shape[0], z.shape[1], z.device, "akl", False)
    _, stats = vocab_parallel.forward(z, t, None, opts, shard, reducer, "torch")
    p = (t - stats[:, layout.MAX_T, None] - stats[:, layout.LOGS_T, None]).exp()
    q = (z - stats[:, layout.MAX_Z, None] - stats[:, layout.LOGS_Z, None]).exp()
    results["akl"] = (p, q, akl_tail_select(t, p, ALPHA, reducer), stats[:, [layout.R_HEAD, layout.R_TAIL]])
    results["shard"] = tuple(shard)
    if world == 3:  # a group of ranks 0 and 2 only: its own ranks and offsets (rank 2 holds the second slice)
        pair = dist.new_group([0, 2])
        if rank != 1:
            z, t, labels = data(torch.float32)
            half = _slice(2, dist.get_rank(pair))
            results["pair"] = loss_and_grad(lambda x: case_loss(SUBGROUP_CASE, x, t[..., half], labels, pair),
                                            z[..., half])
    results["invalid"] = {}
    for divergence in ("fkl", "akl", "todi"):  # NaN on the last rank's slice of row 0, +inf on rank 0's of row 1
        z, t, labels = invalid_data()
        results["invalid"][divergence] = kd.kd_loss(z[..., cols], t[..., cols], divergence, labels=labels,
                                                    ce_weight=0.5, reduction="none", process_group=group)
    results["empty"] = {case: empty_slice_loss_and_grad(case, rank, group) for case in EMPTY_CASES}
    results["fused"] = {case: fused_loss_and_grads(case, cols, group) for case in FUSED_CASES}
    results["sparse"] = {case: sparse_loss_and_grad(case, cols, group) for case in SPARSE_CASES}
    results["bytes"] = _count_bytes(world, group)
    results["errors"] = _errors(world, rank, group)
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()
    leave_rank()


def spawned(worker, world: int, tmp_path_factory, *args) -> list:
    """Each rank's results of one run of ``worker(rank, world, store, out, *args)`` on ``world`` processes, once per
    test run: the pytest-xdist workers share it (the first spawns the processes under a file lock, the others read
    its results), as each would otherwise set the module's fixtures up on its own."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's directory, shared by workers
    key = "-".join(map(str, (worker.__module__, worker.__name__, world, *args)))
    path = root / f"spawned-{key}"
    with open(root / f"spawned-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "done").exists():
            path.mkdir(exist_ok=True)
            torch.multiprocessing.spawn(worker, args=(world, str(path / "store"), str(path / "out"), *args),
                                        nprocs=world)
            (path / "done").touch()
    # not weights_only: a result that is a collective's AsyncCollectiveTensor comes back as one, for a test to see
    return [torch.load(f"{path / 'out'}.{rank}", weights_only=False) for rank in range(world)]


@pytest.fixture(scope="module", params=[2, 3])
def ranks(request, tmp_path_factory):
    """``(world, [results of each rank])`` of one run of ``world`` processes."""
    return request.param, spawned(_worker, request.param, tmp_path_factory)


def _case_id(case) -> str:
    backend, divergence, reduction, temperature, ce, dtype, with_labels, module = case
    return (f"{backend}-{divergence}-{reduction}-T{temperature:g}-ce{ce:g}-{str(dtype)[6:]}"
            + ("" if with_labels else "-nolabels") + ("-module" if module else ""))


@functools.cache
def unsharded(case):
    """The unsharded op's and the float64 reference's ``(loss, grad)`` of a case (shared by both worlds)."""
    backend, divergence, reduction, temperature, ce, dtype, with_labels, _ = case
    z, t, labels = data(dtype, padded=with_labels)
    options = dict(reduction=reduction, temperature=temperature, ce_weight=ce, **PARAMS.get(divergence, {}))
    return (loss_and_grad(lambda x: case_loss(case, x, t, labels), z),
            reference_loss_and_grad(z, t, divergence, labels=labels if with_labels else None, **options))


@pytest.mark.parametrize("index", range(len(CASES)), ids=[_case_id(case) for case in CASES])
def test_loss_and_grad_match_unsharded(ranks, index):
    world, results = ranks
    case = CASES[index]
    backend, divergence, reduction, temperature, ce, dtype, with_labels, _ = case
    shard_results = [r["cases"][case] for r in results]
    losses = [loss for loss, _ in shard_results]
    assert all(torch.equal(losses[0], loss) for loss in losses[1:]), "ranks disagree on the loss"
    grad = torch.cat([grad for _, grad in shard_results], dim=-1)
    labels = data(dtype, padded=with_labels)[2]
    (loss_ref, grad_ref), (loss64, grad64) = unsharded(case)
    tol_loss, tol_grad = TOLERANCE[dtype]
    assert grad.dtype == dtype and losses[0].dtype == loss_ref.dtype
    assert torch.isfinite(grad).all()
    assert rel_err(losses[0], loss_ref) <= max(tol_loss, 1e-6), (rel_err(losses[0], loss_ref))
    assert rel_err(grad, grad_ref) <= max(tol_grad, 1e-6), rel_err(grad, grad_ref)
    keep = (labels != -100)[..., None] if with_labels else torch.ones(LEAD + (1,), dtype=torch.bool)
    assert (grad[~keep.expand_as(grad)] == 0).all()
    assert rel_err(losses[0], loss64) <= tol_loss and rel_err(grad, grad64) <= tol_grad


@pytest.mark.parametrize("case", EMPTY_CASES, ids=["-".join(case) for case in EMPTY_CASES])
def test_ranks_with_an_empty_slice(ranks, case):
    """Ranks holding no entry of the vocabulary (``vocab_range=(V, V, V)``) add nothing: every rank's loss is the
    unsharded one, rank 0 holds the whole gradient, the others an empty one."""
    world, results = ranks
    backend, divergence = case
    z, t, labels = data(torch.float32)
    options = dict(temperature=2.0, ce_weight=0.5, **PARAMS.get(divergence, {}))
    loss64, grad64 = reference_loss_and_grad(z, t, divergence, labels=labels, **options)
    tol_loss, tol_grad = TOLERANCE[torch.float32]
    for rank, r in enumerate(results):
        loss, grad = r["empty"][case]
        assert rel_err(loss, loss64) <= tol_loss, (rank, rel_err(loss, loss64))
        assert grad.shape == ((*LEAD, VOCAB) if rank == 0 else (*LEAD, 0))
    assert rel_err(results[0]["empty"][case][1], grad64) <= tol_grad


def test_a_subgroup_of_the_world(ranks):
    world, results = ranks
    if world != 3:
        pytest.skip("the 3-process run makes a group of ranks 0 and 2")
    (loss_a, grad_a), (loss_b, grad_b) = results[0]["pair"], results[2]["pair"]
    z, t, labels = data(torch.float32)
    loss, grad = loss_and_grad(lambda x: case_loss(SUBGROUP_CASE, x, t, labels), z)
    assert torch.equal(loss_a, loss_b) and "pair" not in results[1]
    assert rel_err(loss_a, loss) <= 1e-6 and rel_err(torch.cat([grad_a, grad_b], -1), grad) <= 1e-5


@pytest.mark.parametrize("divergence", ["fkl", "akl", "todi"])
def test_invalid_entries_make_their_rows_nan_on_every_rank(ranks, divergence):
    world, results = ranks
    rows = [r["invalid"][divergence] for r in results]
    z, t, labels = invalid_data()
    expected = kd.kd_loss(z, t, divergence, labels=labels, ce_weight=0.5, reduction="none")
    assert expected[0, :2].isnan().all() and rows[0][0, :2].isnan().all()
    assert all(torch.allclose(rows[0], x, equal_nan=True, rtol=0, atol=0) for x in rows)
    assert torch.allclose(rows[0], expected, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_shape_table_gives_each_rank_its_slice(ranks):
    world, results = ranks
    for rank, r in enumerate(results):
        cols = _slice(world, rank)
        assert r["shard"] == (cols.start, cols.stop - cols.start, VOCAB, world)


def test_akl_split_is_the_stable_sort_split(ranks):
    world, results = ranks
    p, q, tail = (torch.cat([r["akl"][i] for r in results], dim=-1) for i in range(3))
    weights = results[0]["akl"][3]
    order = torch.sort(p, dim=-1, stable=True).indices
    expected = torch.zeros_like(tail).scatter(-1, order, torch.cumsum(p.gather(-1, order), -1) <= ALPHA)
    assert torch.equal(tail, expected)
    ties = (p == p[:, :1]) & (p < p.amax(-1, keepdim=True))  # the zeros of tie_row
    first_head = [int(i) for i in (ties & ~tail).float().argmax(-1)]
    assert first_head == [29, 29, 29], first_head  # the cut inside the tie group, past rank 0's slice
    assert ties[:, :SPLITS[world][0]].any(-1).all()  # rank 0 holds tie entries: its count came first
    r_h, r_t = akl_weights(p.double(), q.double(), ALPHA)
    assert torch.allclose(weights[:, 0].double(), r_h, rtol=0, atol=1e-6)
    assert torch.allclose(weights[:, 1].double(), r_t, rtol=0, atol=1e-6)
    assert all(torch.equal(r["akl"][3], results[0]["akl"][3]) for r in results)


@pytest.mark.parametrize("case", FUSED_CASES, ids=["-".join(map(str, case)) for case in FUSED_CASES])
def test_fused_linear_matches_unsharded(ranks, case):
    world, results = ranks
    losses, dh, dw, db = zip(*(r["fused"][case] for r in results))
    loss, dh_ref, dw_ref, db_ref = fused_loss_and_grads(case)
    assert all(torch.equal(losses[0], x) for x in losses[1:])
    assert rel_err(losses[0], loss) <= 1e-6
    for x in dh:  # summed over the group: the whole gradient on every rank, a plain tensor
        assert type(x) is torch.Tensor, type(x)
        assert rel_err(x, dh_ref) <= 1e-5
    assert rel_err(torch.cat(dw), dw_ref) <= 1e-5 and rel_err(torch.cat(db), db_ref) <= 1e-5


@pytest.mark.parametrize("case", SPARSE_CASES, ids=["-".join(map(str, case)) for case in SPARSE_CASES])
def test_sparse_matches_unsharded(ranks, case):
    world, results = ranks
    losses, grads = zip(*(r["sparse"][case] for r in results))
    loss, grad = sparse_loss_and_grad(case)
    assert all(torch.equal(losses[0], x) for x in losses[1:])
    assert torch.isfinite(grad).all() and (grad != 0).any()
    assert rel_err(losses[0], loss) <= 1e-6 and rel_err(torch.cat(grads, -1), grad) <= 1e-5


def test_bytes_sent_per_row_match_the_readme_table(ranks):
    world, results = ranks
    for (divergence, dtype, ce, temperature), modes in results[0]["bytes"].items():
        if divergence == "sparse":
            expected = vocab_parallel.sparse_bytes_per_row(dtype, hard_label=ce != 0.0,
                                                           temperature_one=temperature == 1.0)
        else:
            expected = vocab_parallel.bytes_per_row(
                divergence, world, teacher_bytes=dtype.itemsize, hard_label=ce != 0.0,
                temperature_one=temperature == 1.0, stat_bytes=8 if dtype == torch.float64 else 4)
        # modes: with the shape table (its bytes taken off), then with vocab_range (no table: exactly the row bytes)
        for mode, (forward, backward) in zip(("table", "vocab_range"), modes):
            assert (forward, backward) == (expected, 0), (divergence, dtype, ce, temperature, mode, forward, expected)
    table = {d: vocab_parallel.bytes_per_row(d, 2) for d in DIVERGENCES}
    assert table == {"fkl": 24, "rkl": 24, "akl": 2096, "todi": 24, "sfkl": 24, "srkl": 24, "jsd": 24, "tvd": 24}
    assert vocab_parallel.bytes_per_row("akl", 2, teacher_bytes=4) == 4144
    assert vocab_parallel.sparse_bytes_per_row(64) == 264


def test_inconsistent_shards_raise_on_every_rank(ranks):
    world, results = ranks
    messages = [r["errors"][0] for r in results]
    assert all(message == messages[0] for message in messages)
    assert str([9] + [10] * (world - 1)) in messages[0]


def test_process_group_needs_an_initialised_group():
    z = torch.randn(3, 5)
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        kd.kd_loss(z, z.clone(), "fkl", process_group=object())


def test_single_device_path_does_not_load_the_vocabulary_parallel_module():
    code = textwrap.dedent("""
        import sys, torch, kdkernels as kd
        z = torch.randn(4, 9, requires_grad=True)
        kd.kd_loss(z, torch.randn(4, 9), "akl").backward()
        kd.KDLoss("todi")(z, torch.randn(4, 9)).backward()
        assert "kdkernels.torch_ops.vocab_parallel" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_torchrun_example_trains_like_one_process():
    pytest.importorskip("transformers")
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(root / "examples" / "vocab_parallel.py"), "--steps", "6", "--teacher-steps", "30"]
    out = subprocess.run(command, check=True, timeout=300, capture_output=True, text=True, cwd=root).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 6
    for _, parallel, single in rows:
        assert abs(float(parallel) - float(single)) <= 1e-5 * abs(float(single))
    gaps = re.search(r"largest loss difference (\S+); largest output-weight difference after training (\S+)", out)
    assert float(gaps[1]) <= 1e-5 and float(gaps[2]) <= 1e-5, out
