"""``DTensor`` inputs: logits (and output layers) sharded on the vocabulary by PyTorch's tensor parallelism.

A ``torch.distributed.tensor.DTensor`` of logits ``(..., V)`` placed ``Shard(-1)`` on one dimension of its mesh (the
output of a ``ColwiseParallel`` output layer with ``use_local_output=False``; an output weight ``(V, H)`` placed
``Shard(0)``) holds, on this rank, the slice ``[start, end)`` of the vocabulary. The loss then runs the
vocabulary-parallel path (``vocab_parallel.py``) on the local tensor with that mesh dimension's process group and
``vocab_range=(start, end, V)``: no shape table, no host synchronisation. PyTorch's ``Shard`` splits ``V`` as
``torch.chunk`` does: each rank holds ``ceil(V / n)`` ids in rank order, the last ones fewer (possibly none).

The other mesh dimensions may hold ``Replicate()`` or shard a leading (batch) dimension (data parallel outside,
tensor parallel inside): the loss is then that of this rank's rows, the same on every rank of the vocabulary's
group. A DTensor not sharded on the vocabulary runs the plain path on its local tensor. ``Partial`` placements
are refused (reduce them first). The local tensor comes from ``DTensor.to_local()``, through which the gradient
flows back as a ``DTensor`` with the input's placements; the loss itself is a plain tensor.
"""

from __future__ import annotations


def is_dtensor(x: object) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor`` (False where torch has no DTensor)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(x, DTensor)


def local(x, name: str):
    """``x.to_local()`` for a DTensor without ``Partial`` placements, ``x`` itself for anything else."""
    if not is_dtensor(x):
        return x
    if any(p.is_partial() for p in x.placements):
        raise ValueError(f"{name} is a DTensor with a Partial placement {tuple(x.placements)}: redistribute it to "
                         "Replicate() or Shard() first")
    return x.to_local()


def vocab_split(x, name: str, dim: int):
    """``(local tensor, process group or None, vocab_range or None)`` of a DTensor ``x`` whose dimension ``dim``
    is the vocabulary: the group and ``(start, end, V)`` of the one mesh dimension that shards it, None where none
    does. A ``ValueError`` names ``name`` where two mesh dimensions shard the vocabulary or the local size is not
    ``torch.chunk``'s."""
    tensor = local(x, name)
    dim = dim % x.ndim
    sharding = [i for i, p in enumerate(x.placements) if p.is_shard() and p.dim % x.ndim == dim]
    if not sharding:
        return tensor, None, None
    if len(sharding) > 1:
        raise ValueError(f"{name} is sharded on its vocabulary dimension by mesh dimensions {sharding}; kdkernels "
                         "takes one (tensor parallel inside, data parallel outside)")
    mesh_dim = sharding[0]
    parts = x.device_mesh.size(mesh_dim)
    rank = x.device_mesh.get_local_rank(mesh_dim)
    vocab = x.shape[dim]
    step = -(-vocab // parts)
    start = min(rank * step, vocab)
    end = min(start + step, vocab)
    if tensor.shape[dim] != end - start:
        raise ValueError(f"{name}'s local shard has {tensor.shape[dim]} vocabulary entries where an even split "
                         f"(torch.chunk) of {vocab} over {parts} ranks gives rank {rank} {end - start}")
    return tensor, x.device_mesh.get_group(mesh_dim), (start, end, vocab)


def same_split(x, ref, name: str, ref_name: str, dim: int, width: int):
    """The local tensor of ``x``: a DTensor placed as ``ref`` (a DTensor) on its mesh, or a plain tensor of the
    local shape (``width`` entries along ``dim``); else a ``ValueError`` naming both."""
    if is_dtensor(x):
        if x.device_mesh != ref.device_mesh or tuple(x.placements) != tuple(ref.placements):
            raise ValueError(f"{name} and {ref_name} must be DTensors of one mesh and placements, got "
                             f"{tuple(x.placements)} and {tuple(ref.placements)}")
        return local(x, name)
    if x is not None and x.shape[dim] != width:
        raise ValueError(f"{name} is a plain tensor of {x.shape[dim]} vocabulary entries but {ref_name} is a DTensor "
                         f"whose local shard has {width}: pass {name} as a DTensor, or as the local shard")
    return x


def check_no_group(process_group, vocab_range, name: str) -> None:
    """A DTensor's mesh gives the group and range: ``process_group`` and ``vocab_range`` must be None."""
    if process_group is not None or vocab_range is not None:
        raise ValueError(f"{name} is a DTensor, whose mesh and placements give the group and the vocabulary range: "
                         "leave process_group and vocab_range unset")


def unwrap_logits(student, teacher, labels, process_group, vocab_range):
    """``(z, t, labels, process_group, vocab_range)`` for ``kd_loss`` with DTensor logits (see the module
    docstring); the teacher is a DTensor placed as the student or a plain tensor of the student's local shape."""
    if not is_dtensor(student):
        raise TypeError("teacher_logits is a DTensor but student_logits is not: pass both as DTensors (or the "
                        "teacher as the student's local shard)")
    check_no_group(process_group, vocab_range, "student_logits")
    z, group, rng = vocab_split(student, "student_logits", -1)
    t = same_split(teacher, student, "teacher_logits", "student_logits", -1, z.shape[-1])
    return z, t, local(labels, "labels"), group, rng
