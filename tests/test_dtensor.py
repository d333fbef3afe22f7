"""``DTensor`` inputs (PyTorch's tensor parallelism) and explicit vocabulary ranges, under gloo on the CPU.

Spawned processes, once per world size (2 ranks, and 3 in the exhaustive run; ``V = 37``, which ``torch.chunk``
splits unevenly: 19/18 and 13/13/11), do every case and pickle their results to the parent, which compares them with
the unsharded float64 reference (``kd_loss_reference``): ``kd_loss`` of student and teacher logits placed
``Shard(-1)`` on a 1-D mesh for every divergence, two temperatures, every reduction, with and without labels and a
hard-label term, ``-inf`` entries and NaN-padded ignored rows, on 3-D and 2-D logits; the loss is a plain tensor and
the gradient a DTensor of the student's placements. Then a plain teacher given as the local shard, replicated
labels, ``KDLoss``, and the errors (a ``process_group`` or ``vocab_range`` with a DTensor, ``Partial`` placements, a
teacher placed otherwise); ``sparse_kd_loss`` of a DTensor student against a top-k teacher; ``fused_linear_kd_loss``
with output layers placed ``Shard(0)`` and plain or replicated hidden states. The workers also run the
explicit-range path (``process_group=``, ``vocab_range=``) under a dispatch-level check that no tensor value is read
back to the host (``test_host_sync.py``'s, which also catches ``Tensor.tolist``): it passes with explicit ranges and
catches the shape table that the validation mode reads. Further runs: a 2 x 2 mesh (4 processes, in the exhaustive
run: data parallel outside, tensor parallel inside), ``torch.compile(fullgraph=True)`` of the DTensor and
explicit-range losses against eager (``aot_eager`` and two cases in the quick run; inductor and every case in the
exhaustive one), and the torchrun example ``examples/tensor_parallel.py`` against one process.
"""

from __future__ import annotations

import datetime
import functools
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)
pytest.importorskip("torch.distributed.tensor")

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor  # noqa: E402

import kdkernels as kd  # noqa: E402
from bench.vocab_parallel import leave_rank  # noqa: E402
from kdkernels.torch_ops.reference import kd_loss_reference  # noqa: E402
from tests.test_host_sync import ScalarReads  # noqa: E402
from tests.test_vocab_parallel import DIVERGENCES, LEAD, PARAMS, VOCAB, data, fused_data, spawned  # noqa: E402
from tests.utils import TOLERANCE, full_only, loss_and_grad, reference_loss_and_grad, rel_err  # noqa: E402

CHUNKS = {2: (19, 18), 3: (13, 13, 11)}  # torch.chunk's split of VOCAB, which Shard(-1) follows
TOL_LOSS, TOL_GRAD = TOLERANCE[torch.float32]


def _cases():
    """``(divergence, reduction, temperature, ce_weight, with_labels, ndim)``: every divergence at T = 1 and 2 with
    labels (and a CE term in half of them), the reductions in turn, on ``(*LEAD, V)`` logits; a few without labels
    and on ``(N, V)`` logits."""
    cases = []
    for i, divergence in enumerate(DIVERGENCES):
        for j, temperature in enumerate((1.0, 2.0)):
            cases.append((divergence, ("mean", "none", "sum")[(i + j) % 3], temperature,
                          0.5 if (i + j) % 2 == 0 else 0.0, True, 3))
    return cases + [("fkl", "mean", 2.0, 0.0, False, 3), ("akl", "none", 1.0, 0.0, False, 2),
                    ("todi", "sum", 2.0, 0.5, True, 2), ("jsd", "none", 1.0, 0.5, True, 2)]


CASES = _cases()
BASE = ("akl", "mean", 2.0, 0.5, True, 3)  # the variants' case: AKL's select sends per-level histograms
VARIANTS = ("dtensor teacher", "local teacher", "replicated labels", "module")


def case_options(case) -> dict:
    divergence, reduction, temperature, ce, _, _ = case
    return dict(reduction=reduction, temperature=temperature, ce_weight=ce, **PARAMS.get(divergence, {}))


def case_data(case):
    """``data``'s logits and labels in the case's shape; NaN-padded ignored rows where it has labels."""
    *_, with_labels, ndim = case
    z, t, labels = data(torch.float32, padded=with_labels)
    if ndim == 2:
        z, t, labels = z.reshape(-1, VOCAB), t.reshape(-1, VOCAB), labels.reshape(-1)
    return z, t, labels if with_labels else None


def placements_of(x) -> tuple:
    """A DTensor's placements with the sharded dims made non-negative: ``(("Shard", 2),)``, ``(("Replicate",),)``."""
    return tuple(("Shard", p.dim % x.ndim) if p.is_shard() else (type(p).__name__,) for p in x.placements)


def summary(loss, grad) -> dict:
    """What the parent checks of a loss and a gradient (the gradient gathered with ``full_tensor``); the classes'
    names, down to a DTensor's local tensor (a plain ``Tensor``, not a collective's ``AsyncCollectiveTensor``)."""
    is_dt = isinstance(grad, DTensor)
    loss_dt = isinstance(loss, DTensor)
    return {"loss": loss.full_tensor() if loss_dt else loss, "loss_dtensor": loss_dt,
            "grad": grad.full_tensor() if is_dt else grad, "grad_dtensor": is_dt,
            "types": (type(loss).__name__, type(grad).__name__, type(grad.to_local()).__name__ if is_dt else None),
            "placements": placements_of(grad) if is_dt else None,
            "local_shape": tuple(grad.to_local().shape) if is_dt else None}


def dense_case(case, mesh, variant: str = "dtensor teacher") -> dict:
    divergence = case[0]
    z, t, labels = case_data(case)
    zd = distribute_tensor(z, mesh, [Shard(-1)])
    teacher = distribute_tensor(t, mesh, [Shard(-1)])
    if variant == "local teacher":  # torch.chunk's piece: the same as the DTensor's local shard
        teacher = t.chunk(mesh.size(), dim=-1)[mesh.get_local_rank()]
    if variant == "replicated labels":
        labels = distribute_tensor(labels, mesh, [Replicate()])
    if variant == "module":
        loss_fn = kd.KDLoss(divergence, **case_options(case))
        return summary(*loss_and_grad(lambda x: loss_fn(x, teacher, labels), zd))
    return summary(*loss_and_grad(lambda x: kd.kd_loss(x, teacher, divergence, labels=labels, **case_options(case)),
                                  zd))


def outcome(fn, error: type, match: str) -> tuple[str, str]:
    """``("raised", message)`` where ``fn()`` raises ``error`` with ``match`` in its message; else what happened."""
    try:
        fn()
    except error as err:
        return ("raised" if re.search(match, str(err)) else "other message", str(err))
    except Exception as err:  # noqa: BLE001 - reported to the parent
        return ("other error", repr(err))
    return ("no error", "")


def errors(mesh, group) -> dict:
    """The outcome of each misuse of DTensor inputs (on every rank)."""
    z, t, labels = data(torch.float32)
    zd, td = (distribute_tensor(x, mesh, [Shard(-1)]) for x in (z, t))
    partial_z = DTensor.from_local(zd.to_local(), mesh, [Partial()], run_check=False)
    partial_t = DTensor.from_local(td.to_local(), mesh, [Partial()], run_check=False)
    rank, world = mesh.get_local_rank(), mesh.size()
    width = CHUNKS[world][rank]
    start = sum(CHUNKS[world][:rank])
    ids, lp = kd.topk_teacher(torch.nan_to_num(t, nan=0.0, neginf=-30.0), 6)
    h, w, _, g, u, _ = fused_data()
    wd, ud = (distribute_tensor(x, mesh, [Shard(0)]) for x in (w, u))
    checks = {
        "process_group with a DTensor": (
            lambda: kd.kd_loss(zd, td, "fkl", process_group=group), ValueError, "process_group"),
        "vocab_range with a DTensor": (
            lambda: kd.kd_loss(zd, td, "fkl", vocab_range=(start, start + width, VOCAB)), ValueError, "vocab_range"),
        "Partial student": (lambda: kd.kd_loss(partial_z, td, "fkl"), ValueError, "Partial"),
        "Partial teacher": (lambda: kd.kd_loss(zd, partial_t, "fkl"), ValueError, "Partial"),
        "Partial labels": (
            lambda: kd.kd_loss(zd, td, "fkl", labels=DTensor.from_local(labels, mesh, [Partial()], run_check=False)),
            ValueError, "Partial"),
        "replicated teacher": (
            lambda: kd.kd_loss(zd, distribute_tensor(t, mesh, [Replicate()]), "fkl"), ValueError, "placements"),
        "whole plain teacher": (lambda: kd.kd_loss(zd, t, "fkl"), ValueError, "local shard"),
        "plain student, DTensor teacher": (lambda: kd.kd_loss(z, td, "fkl"), TypeError, "DTensor"),
        "sparse: process_group with a DTensor": (
            lambda: kd.sparse_kd_loss(zd, ids, lp, "fkl", process_group=group), ValueError, "process_group"),
        "sparse: Partial student": (lambda: kd.sparse_kd_loss(partial_z, ids, lp, "fkl"), ValueError, "Partial"),
        "fused: process_group with DTensor weights": (
            lambda: kd.fused_linear_kd_loss(h, wd, g, ud, "fkl", process_group=group), ValueError, "process_group"),
    }
    return {name: outcome(*check) for name, check in checks.items()}


SPARSE_CASES = [("fkl", "bucket", 1.0, 0.5, False), ("akl", "bucket", 2.0, 0.0, False),
                ("todi", "renormalize", 2.0, 0.5, False), ("rkl", "bucket+rest", 1.0, 0.5, False),
                ("fkl", "truncate", 2.0, 0.5, True)]  # last: the teacher's tensors and labels replicated DTensors


def sparse_inputs():
    """``data``'s student ``(*LEAD, V)``, the top-6 of its teacher (ids, log-probs, log-mass outside) and labels."""
    z, t, labels = data(torch.float32, padded=False)
    ids, lp, rest = kd.topk_teacher(torch.nan_to_num(t, neginf=-30.0), 6, return_rest=True)
    return z, ids, lp, rest, labels


def sparse_loss(case, z, ids, lp, rest, labels, backend: str = "auto"):
    divergence, tail, temperature, ce, _ = case
    tail, with_rest = tail.removesuffix("+rest"), tail.endswith("+rest")
    return kd.sparse_kd_loss(z, ids, lp, divergence, tail=tail, teacher_rest_logprob=rest if with_rest else None,
                             labels=labels, backend=backend, temperature=temperature, ce_weight=ce, reduction="sum",
                             **PARAMS.get(divergence, {}))


def sparse_case(case, mesh) -> dict:
    z, ids, lp, rest, labels = sparse_inputs()
    if case[-1]:
        ids, lp, rest, labels = (distribute_tensor(x, mesh, [Replicate()]) for x in (ids, lp, rest, labels))
    zd = distribute_tensor(z, mesh, [Shard(-1)])
    return summary(*loss_and_grad(lambda x: sparse_loss(case, x, ids, lp, rest, labels), zd))


# (divergence, reduction, temperature, ce_weight, hidden states: "plain" tensors or "replicated" DTensors)
FUSED_CASES = [("fkl", "mean", 1.0, 0.0, "plain"), ("akl", "sum", 2.0, 0.5, "replicated"),
               ("todi", "none", 2.0, 0.5, "plain"), ("jsd", "mean", 1.0, 0.5, "replicated")]


def fused_case(case, mesh=None) -> dict:
    """The fused loss and the gradients of ``(h, W, b)`` (weights ``Shard(0)`` DTensors with a ``mesh``; float64
    logits through the reference without)."""
    divergence, reduction, temperature, ce, hidden = case
    options = dict(reduction=reduction, temperature=temperature, ce_weight=ce, **PARAMS.get(divergence, {}))
    labels = data(torch.float32)[2]
    h, w, b, g, u, c = fused_data()
    if mesh is None:
        h, w, b, g, u, c = (x.double() for x in (h, w, b, g, u, c))
        h, w, b = (x.requires_grad_(True) for x in (h, w, b))
        loss = kd_loss_reference(h @ w.T + b, g @ u.T + c, divergence, labels=labels, **options)
    else:
        w, b, u, c = (distribute_tensor(x, mesh, [Shard(0)]) for x in (w, b, u, c))
        if hidden == "replicated":
            h, g = (distribute_tensor(x, mesh, [Replicate()]) for x in (h, g))
        h, w, b = (x.requires_grad_(True) for x in (h, w, b))
        loss = kd.fused_linear_kd_loss(h, w, g, u, divergence, student_bias=b, teacher_bias=c, labels=labels,
                                       chunk_size=4, **options)
    weight = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (loss * weight.to(loss.dtype)).sum().backward()
    return {"loss": loss.detach(), "loss_dtensor": isinstance(loss, DTensor),
            **{name: summary(loss.detach(), x.grad) for name, x in (("h", h), ("w", w), ("b", b))}}


OPTIONS_READ = {("torch_ops/options.py", "from_op", "tolist")}


class HostReads(ScalarReads):
    """``ScalarReads`` (aten ops that copy a value to the host), and the reads that bypass the dispatcher:
    ``Tensor.tolist`` and ``Tensor.numpy`` (patched while the mode is on; the mode re-enters itself for the
    kdkernels ops, hence the depth), but for :data:`OPTIONS_READ` (the options' CPU tensor read by
    ``options.from_op``; the shape table's read, which ``test_host_sync`` allows in the validation mode, counts)."""

    READS = ("tolist", "numpy")

    def __init__(self):
        super().__init__()
        self.depth, self.saved = 0, {}

    def __enter__(self):
        if self.depth == 0:
            self.saved = {name: getattr(torch.Tensor, name) for name in self.READS}
            for name, method in self.saved.items():
                setattr(torch.Tensor, name, self._recorded(name, method))
        self.depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self.depth -= 1
        if self.depth == 0:
            for name, method in self.saved.items():
                setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def _recorded(self, name, method):
        def read(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if not any(caller.co_filename.endswith(module) and caller.co_name == function and name == method_name
                       for module, function, method_name in OPTIONS_READ):
                self.seen.append(f"Tensor.{name} in {_package_caller()}")
            return method(tensor, *args, **kwargs)
        return read


def _package_caller() -> str:
    """The innermost kdkernels function on the stack (a read may go through a tensor subclass's method first)."""
    frame = sys._getframe(1)
    while frame is not None and f"{Path(kd.__file__).parent}" not in frame.f_code.co_filename:
        frame = frame.f_back
    return "?" if frame is None else frame.f_code.co_name


def host_reads(mesh, group) -> dict:
    """The host reads of a forward and backward, by divergence: ``process_group`` with ``vocab_range`` (torch
    backend, labels, a CE term at T = 2), and for comparison the validation mode (no ``vocab_range``) and DTensors."""
    rank, world = mesh.get_local_rank(), mesh.size()
    start = sum(CHUNKS[world][:rank])
    vocab_range = (start, start + CHUNKS[world][rank], VOCAB)
    z, t, labels = data(torch.float32)
    cols = slice(*vocab_range[:2])
    seen = {}
    runs = [(d, "vocab_range") for d in DIVERGENCES] + [("fkl", "table"), ("akl", "table"), ("fkl", "dtensor"),
                                                        ("akl", "dtensor")]
    for divergence, mode in runs:
        options = dict(labels=labels, ce_weight=0.5, temperature=2.0, backend="torch", **PARAMS.get(divergence, {}))
        if mode == "dtensor":
            x, teacher = (distribute_tensor(y, mesh, [Shard(-1)]) for y in (z, t))
        else:
            x, teacher = z[..., cols], t[..., cols]
            options.update(process_group=group, vocab_range=vocab_range if mode == "vocab_range" else None)
        x = x.detach().clone().requires_grad_(True)
        with HostReads() as reads:
            kd.kd_loss(x, teacher, divergence, **options).backward()
        seen[(divergence, mode)] = reads.seen
    return seen


def _init(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))


def _guarded(fn):
    """``fn``'s result, or ``("error", repr)``: a case the package does not handle yet fails its own test only."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - reported to the parent
        return ("error", repr(err))


def _worker(rank: int, world: int, store: str, out: str) -> None:
    _init(rank, world, store)
    mesh = init_device_mesh("cpu", (world,))
    group = mesh.get_group()
    results = {
        "cases": {case: _guarded(functools.partial(dense_case, case, mesh)) for case in CASES},
        "variants": {v: _guarded(functools.partial(dense_case, BASE, mesh, v)) for v in VARIANTS},
        "errors": errors(mesh, group),
        "sparse": {case: _guarded(functools.partial(sparse_case, case, mesh)) for case in SPARSE_CASES},
        "fused": {case: _guarded(functools.partial(fused_case, case, mesh)) for case in FUSED_CASES},
        "host_reads": _guarded(lambda: host_reads(mesh, group)),
    }
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()
    leave_rank()


@pytest.fixture(scope="module", params=[2, *full_only(3)])
def ranks(request, tmp_path_factory):
    """``(world, [results of each rank])`` of one run of ``world`` processes on a 1-D mesh."""
    return request.param, spawned(_worker, request.param, tmp_path_factory)


def _ok(result):
    assert not (isinstance(result, tuple) and result[:1] == ("error",)), result[1]
    return result


@functools.cache
def reference(case):
    """The float64 reference's ``(loss, grad)`` of a dense case."""
    z, t, labels = case_data(case)
    return reference_loss_and_grad(z, t, case[0], labels=labels, **case_options(case))


def check_dense(results: list, case, world: int) -> None:
    """Every rank's loss (a plain tensor) the same and equal to the reference, the gradient a DTensor placed as the
    student with ``torch.chunk``'s widths and its whole equal to the reference gradient."""
    results = [_ok(r) for r in results]
    loss_ref, grad_ref = reference(case)
    ndim = case[-1]
    for rank, r in enumerate(results):
        assert r["types"] == ("Tensor", "DTensor", "Tensor"), r["types"]
        assert torch.equal(r["loss"], results[0]["loss"]), "ranks disagree on the loss"
        assert torch.equal(r["grad"], results[0]["grad"])
        assert r["placements"] == (("Shard", ndim - 1),) and r["local_shape"][-1] == CHUNKS[world][rank]
    loss, grad = results[0]["loss"], results[0]["grad"]
    assert loss.shape == loss_ref.shape and grad.shape == grad_ref.shape and grad.dtype == torch.float32
    assert torch.isfinite(grad).all()
    assert rel_err(loss, loss_ref) <= TOL_LOSS, rel_err(loss, loss_ref)
    assert rel_err(grad, grad_ref) <= TOL_GRAD, rel_err(grad, grad_ref)


def _case_id(case) -> str:
    divergence, reduction, temperature, ce, with_labels, ndim = case
    return (f"{divergence}-{reduction}-T{temperature:g}-ce{ce:g}" + ("" if with_labels else "-nolabels")
            + f"-{ndim}d")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(case) for case in CASES])
def test_dtensor_loss_and_grad_match_the_reference(ranks, case):
    world, results = ranks
    check_dense([r["cases"][case] for r in results], case, world)


@pytest.mark.parametrize("variant", VARIANTS)
def test_local_teacher_replicated_labels_and_the_module(ranks, variant):
    world, results = ranks
    check_dense([r["variants"][variant] for r in results], BASE, world)


@pytest.mark.parametrize("name", ["process_group with a DTensor", "vocab_range with a DTensor", "Partial student",
                                  "Partial teacher", "Partial labels", "replicated teacher", "whole plain teacher",
                                  "plain student, DTensor teacher", "sparse: process_group with a DTensor",
                                  "sparse: Partial student", "fused: process_group with DTensor weights"])
def test_misuse_raises_on_every_rank(ranks, name):
    world, results = ranks
    outcomes = [r["errors"][name] for r in results]
    assert all(o[0] == "raised" for o in outcomes), outcomes


@functools.cache
def sparse_reference(case):
    z, ids, lp, rest, labels = sparse_inputs()
    return loss_and_grad(lambda x: sparse_loss(case, x, ids, lp.double(), rest.double(), labels, "reference"),
                         z.double())


@pytest.mark.parametrize("case", SPARSE_CASES, ids=["-".join(map(str, case[:4])) + ("-replicated" if case[4] else "")
                                                    for case in SPARSE_CASES])
def test_sparse_dtensor_student_matches_the_reference(ranks, case):
    world, results = ranks
    results = [_ok(r["sparse"][case]) for r in results]
    loss_ref, grad_ref = sparse_reference(case)
    for rank, r in enumerate(results):
        assert r["types"] == ("Tensor", "DTensor", "Tensor") and r["placements"] == (("Shard", 2),), r["types"]
        assert r["local_shape"] == (*LEAD, CHUNKS[world][rank]) and torch.equal(r["loss"], results[0]["loss"])
    grad = results[0]["grad"]
    assert torch.isfinite(grad).all() and (grad != 0).any()
    assert rel_err(results[0]["loss"], loss_ref) <= TOL_LOSS and rel_err(grad, grad_ref) <= TOL_GRAD


@pytest.mark.parametrize("case", FUSED_CASES, ids=["-".join(map(str, case)) for case in FUSED_CASES])
def test_fused_linear_with_sharded_weights_matches_the_reference(ranks, case):
    world, results = ranks
    results = [_ok(r["fused"][case]) for r in results]
    ref = fused_case(case)
    for rank, r in enumerate(results):
        assert not r["loss_dtensor"] and torch.equal(r["loss"], results[0]["loss"])
        for name in ("w", "b"):  # the output layer's gradients: DTensors placed as the weights
            assert r[name]["types"][1:] == ("DTensor", "Tensor"), (name, r[name]["types"])
            assert r[name]["placements"] == (("Shard", 0),), (name, r[name]["placements"])
            assert r[name]["local_shape"] == (CHUNKS[world][rank],) + ((8,) if name == "w" else ())
        if case[-1] == "replicated":
            assert r["h"]["types"][1:] == ("DTensor", "Tensor"), r["h"]["types"]
            assert r["h"]["placements"] == (("Replicate",),), r["h"]["placements"]
        else:  # a plain tensor, not the all-reduce's AsyncCollectiveTensor
            assert r["h"]["types"][1] == "Tensor", r["h"]["types"]
        assert torch.equal(r["h"]["grad"], results[0]["h"]["grad"])
    assert rel_err(results[0]["loss"], ref["loss"]) <= TOL_LOSS
    for name in ("h", "w", "b"):  # the hidden states' gradient summed over the group: whole on every rank
        assert rel_err(results[0][name]["grad"], ref[name]["grad"]) <= TOL_GRAD, name


def test_explicit_ranges_read_nothing_back_to_the_host(ranks):
    world, results = ranks
    for r in results:
        seen = _ok(r["host_reads"])
        for divergence in DIVERGENCES:
            assert seen[(divergence, "vocab_range")] == [], (divergence, seen[(divergence, "vocab_range")])
        for divergence in ("fkl", "akl"):
            assert seen[(divergence, "dtensor")] == [], (divergence, seen[(divergence, "dtensor")])


def test_the_host_read_check_catches_the_shape_table(ranks):
    """Without ``vocab_range`` the shape table is read back (``tolist``): the check above can fail."""
    world, results = ranks
    for r in results:
        seen = _ok(r["host_reads"])
        for divergence in ("fkl", "akl"):
            assert "Tensor.tolist in table_shard" in seen[(divergence, "table")], seen[(divergence, "table")]


# A 2 x 2 mesh ("dp", "tp"): (divergence, reduction, temperature, ce_weight, placement of the rows on "dp").
MESH_CASES = [("fkl", "mean", 2.0, 0.5, "Shard(0)"), ("akl", "none", 1.0, 0.0, "Shard(0)"),
              ("todi", "sum", 2.0, 0.5, "Replicate()")]


def mesh_case(case, mesh) -> dict:
    divergence, reduction, temperature, ce, rows = case
    z, t, labels = data(torch.float32)
    placements = [Shard(0) if rows == "Shard(0)" else Replicate(), Shard(-1)]
    zd, td = (distribute_tensor(x, mesh, placements) for x in (z, t))
    labels = distribute_tensor(labels, mesh, [placements[0], Replicate()])  # this dp rank's rows
    options = dict(reduction=reduction, temperature=temperature, ce_weight=ce, **PARAMS.get(divergence, {}))
    return summary(*loss_and_grad(lambda x: kd.kd_loss(x, td, divergence, labels=labels, **options), zd))


def _mesh_worker(rank: int, world: int, store: str, out: str) -> None:
    _init(rank, world, store)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    z = distribute_tensor(data(torch.float32)[0], mesh, [Shard(-1), Shard(-1)])
    results = {"cases": {case: _guarded(functools.partial(mesh_case, case, mesh)) for case in MESH_CASES},
               "coords": (mesh.get_local_rank("dp"), mesh.get_local_rank("tp")),
               "two vocabulary dims": outcome(lambda: kd.kd_loss(z, z.detach(), "fkl"), ValueError,
                                              "mesh dimensions")}
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()
    leave_rank()


@pytest.fixture(scope="module")
def mesh_ranks(tmp_path_factory):
    return spawned(_mesh_worker, 4, tmp_path_factory)


@pytest.mark.full  # 4 processes on 2 cores: the exhaustive run (CI)
@pytest.mark.parametrize("case", MESH_CASES, ids=["-".join(map(str, case)) for case in MESH_CASES])
def test_2d_mesh_data_parallel_outside_tensor_parallel_inside(mesh_ranks, case):
    divergence, reduction, temperature, ce, rows = case
    z, t, labels = data(torch.float32)
    options = dict(reduction=reduction, temperature=temperature, ce_weight=ce, **PARAMS.get(divergence, {}))
    by_dp = [reference_loss_and_grad(z[d:d + 1], t[d:d + 1], divergence, labels=labels[d:d + 1], **options)
             for d in range(LEAD[0])]
    whole = reference_loss_and_grad(z, t, divergence, labels=labels, **options)
    for r in mesh_ranks:
        dp, tp = r["coords"]
        result = _ok(r["cases"][case])
        assert result["types"] == ("Tensor", "DTensor", "Tensor"), result["types"]
        if rows == "Shard(0)":  # the loss of this dp rank's rows; the gradient of each dp rank's rows, gathered
            loss_ref, grad_ref = by_dp[dp][0], torch.cat([grad for _, grad in by_dp])
            assert result["placements"] == (("Shard", 0), ("Shard", 2)), result["placements"]
        else:
            loss_ref, grad_ref = whole
            assert result["placements"] == (("Replicate",), ("Shard", 2)), result["placements"]
        assert result["local_shape"] == ((1 if rows == "Shard(0)" else 2), LEAD[1], CHUNKS[2][tp])
        assert rel_err(result["loss"], loss_ref) <= TOL_LOSS, (dp, tp, rel_err(result["loss"], loss_ref))
        assert rel_err(result["grad"], grad_ref) <= TOL_GRAD, (dp, tp, rel_err(result["grad"], grad_ref))


@pytest.mark.full
def test_2d_mesh_refuses_a_vocabulary_sharded_twice(mesh_ranks):
    for r in mesh_ranks:
        assert r["two vocabulary dims"][0] == "raised", r["two vocabulary dims"]


# torch.compile(fullgraph=True) against eager: DTensor logits, and the explicit-range process_group path.
COMPILED_CASES = [("dtensor", "fkl"), ("vocab_range", "akl"), ("dtensor", "akl"), ("dtensor", "todi"),
                  ("vocab_range", "fkl")]
QUICK_COMPILED = 2  # the quick run compiles the first two cases; the exhaustive one (KDKERNELS_FULL=1) all


def compiled_case(case, mesh, group, backend: str) -> dict:
    mode, divergence = case
    z, t, labels = data(torch.float32)
    options = dict(labels=labels, ce_weight=0.5, temperature=2.0, **PARAMS.get(divergence, {}))
    if mode == "dtensor":
        z, t = (distribute_tensor(x, mesh, [Shard(-1)]) for x in (z, t))
    else:
        rank, world = mesh.get_local_rank(), mesh.size()
        start = sum(CHUNKS[world][:rank])
        vocab_range = (start, start + CHUNKS[world][rank], VOCAB)
        z, t = z[..., start:vocab_range[1]], t[..., start:vocab_range[1]]
        options.update(process_group=group, vocab_range=vocab_range)

    def fn(x, y):
        return kd.kd_loss(x, y, divergence, **options)

    eager = summary(*loss_and_grad(lambda x: fn(x, t), z))
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    return {"eager": eager, "compiled": summary(*loss_and_grad(lambda x: compiled(x, t), z))}


def _compile_worker(rank: int, world: int, store: str, out: str, backend: str) -> None:
    _init(rank, world, store)
    mesh = init_device_mesh("cpu", (world,))
    cases = COMPILED_CASES if os.environ.get("KDKERNELS_FULL") == "1" else COMPILED_CASES[:QUICK_COMPILED]
    results = {case: _guarded(functools.partial(compiled_case, case, mesh, mesh.get_group(), backend))
               for case in cases}
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()
    leave_rank()


@pytest.fixture(scope="module", params=["aot_eager", *full_only("inductor")])
def compiled_ranks(request, tmp_path_factory):
    """Two processes compiling every case with the compiler backend of the parameter."""
    return request.param, spawned(_compile_worker, 2, tmp_path_factory, request.param)


@pytest.mark.parametrize("case", [*COMPILED_CASES[:QUICK_COMPILED], *full_only(*COMPILED_CASES[QUICK_COMPILED:])],
                         ids=["-".join(case) for case in COMPILED_CASES])
def test_compiled_fullgraph_equals_eager(compiled_ranks, case):
    backend, results = compiled_ranks
    for r in results:
        result = _ok(r[case])
        eager, compiled = result["eager"], result["compiled"]
        assert compiled["types"] == eager["types"] == (("Tensor", "DTensor", "Tensor") if case[0] == "dtensor"
                                                        else ("Tensor", "Tensor", None)), compiled["types"]
        assert compiled["placements"] == eager["placements"]
        assert rel_err(compiled["loss"], eager["loss"]) <= 1e-6, rel_err(compiled["loss"], eager["loss"])
        assert rel_err(compiled["grad"], eager["grad"]) <= 1e-6, rel_err(compiled["grad"], eager["grad"])


def test_torchrun_tensor_parallel_example_matches_one_process():
    if importlib.util.find_spec("torch.distributed.run") is None:
        pytest.skip("torchrun (torch.distributed.run) is not available in this torch build")
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(root / "examples" / "tensor_parallel.py"), "--steps", "4", "--teacher-steps", "20"]
    out = subprocess.run(command, check=True, timeout=300, capture_output=True, text=True, cwd=root).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 4, out
    for _, parallel, single in rows:
        assert abs(float(parallel) - float(single)) <= 1e-5 * abs(float(single)), out
    assert "lm_head.weight: (Shard(dim=0),)" in out and "split over 2 ranks as [26, 25]" in out, out
    assert out.strip().endswith("matches one process"), out
