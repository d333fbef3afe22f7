"""``python -m bench.roofline_parallel``: the static cost model of ``bench.roofline`` for the vocabulary-parallel loss.

Models one forward + backward of ``kd_loss(..., process_group=...)`` with the Triton backend on ``world`` = 2, 4
and 8 GPUs of one node (H100 and H200 SXM, ``bench.roofline.CARDS``), bf16 student and teacher logits, labels
given and no CE term (``ce_weight = 0``, T = 1), default N = 8192, V = 128256. Each rank holds a slice ``(N, V_r)``
of the vocabulary; the model takes the widest, ``V_r = ceil(V / world)`` (the slowest rank sets the pace). No GPU:
the kernels are compiled for sm_90a as launched, as in ``bench.roofline``.

**Kernels per rank** (the vocabulary-parallel path's fused shards): the launches of ``launch.shard_stats``,
``launch.shard_finish`` and ``launch.kd_backward`` on ``(N, V_r)`` slices, recorded on meta tensors exactly as the
path makes them (labels given, no CE term):

- forward pass 1: ``stats_kernel`` (fkl's and rkl's own; for the other divergences the statistics-only variant,
  tvd's, which AKL's slice uses too);
- forward pass 2: ``finish_kernel`` (todi, sfkl, srkl, jsd, tvd; fkl, rkl and AKL have none);
- backward: ``grad_kernel``.

On the vocabulary-parallel path AKL's head/tail cut is the radix select of ``torch_ops/akl_select.py`` (torch ops,
see below). Each kernel is costed by ``bench.roofline.kernel_cost`` and ``KernelCost.seconds`` (the same SASS walk
and occupancy model; every assumption of ``bench/roofline.py`` holds), with one program per row: the ideal bound
and the occupancy-aware estimates at 450 / 600 / 800 ns DRAM latency. The table's kernel time is the 600 ns estimate.

**AKL's torch ops** (bytes only, at full bandwidth: a lower bound; no launch overheads). After pass 1 the slice's
``q = exp(z - M_z - log s_z)`` and ``p = exp(t - M_t - log s_t)`` are formed (per tensor: cast to float32,
subtract the row's offset, exp: 3 eager ops), then ``akl_select.akl_tail_select(t, p, alpha, reducer)`` finds the
tail (2 levels of 8 bits for a bf16 teacher), then the head and tail gap sums ``sum |p - q|`` (5 ops). The bytes
that each aten op reads and writes of ``(N, V_r)``-sized tensors are counted by a ``TorchDispatchMode`` on a small
CPU slice running that code (the histograms ``(N, 256)`` and per-row values are left out); where the package's
code cannot be run so (an interface moved), the counts of this file's version (``AKL_TORCH_FALLBACK``, measured on
the package at the time of writing: 39 ops, 170 bytes read and 123 written per element) are used. Time = those
bytes x N x V_r / bandwidth.

**All-reduces** (NCCL over NVLink, modelled as a ring): per forward ``collectives`` collectives (fkl, rkl: 2, one
MAX of the maxima and one SUM; todi and the baselines: 3; akl: 3 + 2 per 8-bit level of the teacher's key, i.e. 7
for bf16), plus ``LAYOUT_COLLECTIVES`` = 0 for the shard table (the ranges come from ``vocab_range`` or the
DTensor's mesh; the validation mode, ``process_group`` alone, adds one ``(world, 4)`` int64 table a call), each
``COLLECTIVE_LATENCY_US`` = 15 us; and their payload, ``N x bytes_per_row(divergence, world)`` bytes (imported from
``kdkernels.torch_ops.vocab_parallel``; ``_bytes_per_row_fallback``, a copy of its formula, if it moves), moved in
``2 (w - 1) / w x bytes / NVLINK_BYTES_S`` (a ring all-reduce's bus traffic) at ``NVLINK_BYTES_S`` = 450 GB/s per
direction (NVLink 4 on H100 / H200 SXM: 18 links x 25 GB/s). The backward sends nothing. The collectives are
taken as serial with the kernels (no overlap).

**Floor**: one read of the rank's ``z`` and ``t`` slices and one write of its gradient slice at full bandwidth,
``N x V_r x 6`` bytes. ``x floor`` = total / floor. ``--json`` prints one object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from bench.roofline import CARDS, LATENCIES_NS, LATENCY_NS, SIZES, kernel_cost

DIVERGENCES = ("fkl", "rkl", "todi", "sfkl", "srkl", "jsd", "tvd", "akl")
WORLDS = (2, 4, 8)
STUDENT = TEACHER = "bf16"
NVLINK_BYTES_S = 450e9  # NVLink 4 (H100 / H200 SXM), per direction: 18 links x 25 GB/s
COLLECTIVE_LATENCY_US = 15.0  # one small NCCL all-reduce on one node (launch, ring hops, completion)
LAYOUT_COLLECTIVES = 0  # the shard table: none with vocab_range or a DTensor (1 in the validation mode)
LAYOUT_BYTES_PER_RANK = 32
# AKL's torch ops (see the docstring): aten ops, bytes read and written per element of (N, V_r); bf16 teacher.
AKL_TORCH_FALLBACK = dict(ops=39, read_bytes_per_elem=170.0, write_bytes_per_elem=123.0, source="fallback")
AKL_ALPHA = 0.5
# Kernels the vocabulary-parallel path launches per rank, by divergence: pass 1, pass 2, backward.
FINISH = ("todi", "sfkl", "srkl", "jsd", "tvd")
PARTIAL_SUMS = {"fkl": 2, "rkl": 2, "todi": 2, "akl": 6, "sfkl": 2, "srkl": 2, "jsd": 2, "tvd": 2}


def kernels_of(divergence: str) -> tuple[str, ...]:
    return ("stats_kernel", *(("finish_kernel",) if divergence in FINISH else ()), "grad_kernel")


def collectives(divergence: str, teacher_bytes: int = SIZES[TEACHER]) -> int:
    """All-reduces of one forward (the shard table aside): 2 for fkl/rkl, 3 for todi and the baselines, and for AKL
    3 + 2 per 8-bit level of the teacher's key (one level per byte)."""
    if divergence in ("fkl", "rkl"):
        return 2
    if divergence == "akl":
        return 3 + 2 * teacher_bytes
    return 3


def _bytes_per_row_fallback(divergence: str, world: int, teacher_bytes: int = 2) -> int:
    """``vocab_parallel.bytes_per_row`` as written when this file was (labels, no CE term, float32 statistics)."""
    numbers = 4 + PARTIAL_SUMS[divergence]
    return numbers * 4 if divergence != "akl" else (numbers + 256 * teacher_bytes) * 4 + 4 * world


def bytes_per_row(divergence: str, world: int, teacher_bytes: int = SIZES[TEACHER]) -> tuple[int, str]:
    """Bytes each rank all-reduces per row in a forward, and where the figure came from."""
    try:
        from kdkernels.torch_ops.vocab_parallel import bytes_per_row as package
    except (ImportError, AttributeError):
        return _bytes_per_row_fallback(divergence, world, teacher_bytes), "fallback"
    try:
        return package(divergence, world, teacher_bytes=teacher_bytes), "kdkernels.torch_ops.vocab_parallel"
    except TypeError:
        return package(divergence, world), "kdkernels.torch_ops.vocab_parallel"


def allreduce_seconds(payload_bytes: float, world: int, count: int, *, latency_us: float = COLLECTIVE_LATENCY_US,
                      bandwidth: float = NVLINK_BYTES_S) -> float:
    """``count`` ring all-reduces moving ``payload_bytes`` in all (each rank's buffer) over ``world`` ranks:
    ``count x latency + 2 (w - 1) / w x bytes / bandwidth``; 0 for one rank."""
    if world <= 1:
        return 0.0
    return count * latency_us * 1e-6 + 2 * (world - 1) / world * payload_bytes / bandwidth


def allreduce(divergence: str, rows: int, world: int) -> dict:
    """The forward's collectives: count, bytes per row, seconds."""
    per_row, source = bytes_per_row(divergence, world)
    count = collectives(divergence) + LAYOUT_COLLECTIVES
    payload = rows * per_row + LAYOUT_COLLECTIVES * LAYOUT_BYTES_PER_RANK * world
    return dict(collectives=count, bytes_per_row=per_row, payload_bytes=payload, source=source,
                seconds=allreduce_seconds(payload, world, count))


class _LocalReducer:
    """A group of one, for running ``akl_tail_select``'s vocabulary-parallel branch without collectives."""

    rank, world_size = 0, 1

    def sum_(self, x):
        return x

    sum = max_ = max = sum_

    def count_before(self, count):
        return count * 0


def akl_torch_traffic(rows: int = 4, width: int = 1024) -> dict:
    """Aten ops and bytes read / written per element of ``(rows, width)``-sized tensors by AKL's torch ops on a
    slice (bf16 ``z``, ``t``): forming ``q`` and ``p``, ``akl_tail_select``, the head and tail gap sums."""
    try:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        from kdkernels.torch_ops.akl_select import akl_tail_select
    except ImportError:
        return dict(AKL_TORCH_FALLBACK)
    elements = rows * width

    def big(x) -> int:
        return x.numel() * x.element_size() if isinstance(x, torch.Tensor) and x.numel() == elements else 0

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:
                read = sum(big(x) for x in tree_leaves((args, kwargs)))
                written = sum(big(x) for x in tree_leaves(out))
                if read or written:
                    self.ops.append((str(func), read, written))
            return out

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(rows, width, generator=gen).to(torch.bfloat16)
    t = (2 * torch.randn(rows, width, generator=gen)).to(torch.bfloat16)
    offset_z = torch.logsumexp(z.float(), 1)  # M + log s, a per-row value: not counted
    offset_t = torch.logsumexp(t.float(), 1)
    for reducer in (_LocalReducer(), None):
        try:
            with Count() as count:
                q = (z.float() - offset_z[:, None]).exp()
                p = (t.float() - offset_t[:, None]).exp()
                tail = akl_tail_select(t, p, AKL_ALPHA, reducer)
                gap = (p - q).abs()
                torch.where(tail, 0.0, gap).sum(-1), torch.where(tail, gap, 0.0).sum(-1)
        except (AttributeError, TypeError):  # the reducer's interface moved: the single-device branch
            continue
        return dict(ops=len(count.ops), read_bytes_per_elem=sum(r for _, r, _ in count.ops) / elements,
                    write_bytes_per_elem=sum(w for _, _, w in count.ops) / elements,
                    source="counted" + (" (reducer=None)" if reducer is None else ""))
    return dict(AKL_TORCH_FALLBACK)


def rank_kernels(divergence: str, rows: int, width: int) -> list:
    """``(KernelCost, programs)`` of the kernels one rank launches on its ``(rows, width)`` slices."""
    import torch

    from kdkernels.kernels import launch
    from kdkernels.torch_ops.options import KDOptions

    meta = torch.device("meta")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    z = torch.empty((rows, width), dtype=dtype[STUDENT], device=meta)
    t = torch.empty((rows, width), dtype=dtype[TEACHER], device=meta)
    labels = torch.empty(rows, dtype=torch.int64, device=meta)
    opts = KDOptions(divergence)
    with launch.recording() as records:
        stats = launch.shard_stats(z, t, labels, opts)
        if divergence in FINISH:
            launch.shard_finish(z, t, stats, opts)
        launch.kd_backward(torch.empty(rows, device=meta), z, t, labels, stats, opts)
    found = [r.kernel.fn.__name__ for r in records]
    if found != list(kernels_of(divergence)):
        raise RuntimeError(f"{divergence}: expected launches {kernels_of(divergence)}, the launcher records {found}")
    return [(kernel_cost(r, STUDENT, TEACHER), math.prod(r.grid)) for r in records]


def model(rows: int = 8192, vocab: int = 128256, worlds=WORLDS, divergences=DIVERGENCES) -> dict:
    """Per card, world size and divergence: per-rank kernel, torch-op and all-reduce times, total, floor."""
    akl = akl_torch_traffic() if "akl" in divergences else None
    out = dict(rows=rows, vocab=vocab, worlds=list(worlds), student=STUDENT, teacher=TEACHER,
               assumptions=dict(nvlink_bytes_s=NVLINK_BYTES_S, collective_latency_us=COLLECTIVE_LATENCY_US,
                                layout_collectives=LAYOUT_COLLECTIVES, latency_ns=LATENCY_NS,
                                cards={c: dict(zip(("bandwidth", "sms", "clock"), v)) for c, v in CARDS.items()}),
               akl_torch=akl, kernels={}, results=[])
    size = SIZES[STUDENT] * 2 + SIZES[TEACHER]
    for world in worlds:
        width = -(-vocab // world)
        for divergence in divergences:
            costs = rank_kernels(divergence, rows, width)
            comm = allreduce(divergence, rows, world)
            for cost, _ in costs:
                out["kernels"].setdefault(f"{divergence} {cost.name}", dict(
                    cost.__dict__, instr_per_elem=cost.instr_per_elem, mufu_per_elem=cost.mufu_per_elem))
            for card, (bandwidth, _, _) in CARDS.items():
                kernels = {}
                for cost, programs in costs:
                    kernels[cost.name] = dict(
                        ms={f"{ns:g}": 1e3 * cost.seconds(card, rows, width, programs, ns)[0] for ns in LATENCIES_NS},
                        ideal_ms=1e3 * cost.seconds(card, rows, width, programs)[0],
                        bound=cost.seconds(card, rows, width, programs, LATENCY_NS)[1])
                kernel_ms = {f"{ns:g}": sum(k["ms"][f"{ns:g}"] for k in kernels.values()) for ns in LATENCIES_NS}
                ideal_ms = sum(k["ideal_ms"] for k in kernels.values())
                torch_ms = (1e3 * rows * width * (akl["read_bytes_per_elem"] + akl["write_bytes_per_elem"]) / bandwidth
                            if divergence == "akl" else 0.0)
                comm_ms = 1e3 * comm["seconds"]
                floor_ms = 1e3 * rows * width * size / bandwidth
                total = {key: ms + torch_ms + comm_ms for key, ms in kernel_ms.items()}
                out["results"].append(dict(
                    card=card, world=world, width=width, divergence=divergence, kernels=kernels,
                    kernel_ms=kernel_ms[f"{LATENCY_NS:g}"], kernel_ms_by_latency=kernel_ms, kernel_ideal_ms=ideal_ms,
                    torch_ms=torch_ms, allreduce=dict(comm, ms=comm_ms), total_ms=total[f"{LATENCY_NS:g}"],
                    total_ms_by_latency=total, floor_ms=floor_ms, x_floor=total[f"{LATENCY_NS:g}"] / floor_ms,
                    kernel_x_floor=kernel_ms[f"{LATENCY_NS:g}"] / floor_ms))
    return out


def print_report(r: dict) -> None:
    a = r["assumptions"]
    print(f"Static cost model of the vocabulary-parallel kd_loss (Triton backend), forward + backward per rank: "
          f"N={r['rows']} V={r['vocab']} bf16, labels, no CE term, slice V_r = ceil(V / world); sm_90a SASS as "
          f"launched (bench/roofline.py's model, DRAM latency {a['latency_ns']:g} ns); ring all-reduces over NVLink "
          f"at {a['nvlink_bytes_s'] / 1e9:g} GB/s per direction, {a['collective_latency_us']:g} us per collective "
          f"({a['layout_collectives']} for a shard table: ranges from vocab_range or the DTensor's mesh).")
    if r["akl_torch"]:
        k = r["akl_torch"]
        print(f"AKL: stats + grad kernels, and its cut and gap sums as torch ops ({k['source']}): {k['ops']} ops "
              f"reading {k['read_bytes_per_elem']:g} and writing {k['write_bytes_per_elem']:g} bytes per element of "
              f"the slice, at full bandwidth (a lower bound).")
    print("kernels ms: per-rank kernels at 600 ns (ideal bound); torch: AKL's torch ops; all-reduce: collectives x "
          "bytes per row; x floor: total / (one read of z, t and one write of dz of the slice); kernels x: the "
          "kernels alone")
    head = (f"{'card':<5} {'world':>5} {'V_r':>6} {'div':<5} {'kernels':>7} {'(ideal)':>8} {'torch':>6} "
            f"{'coll':>4} {'B/row':>6} {'all-red':>7} {'total':>7} {'floor':>6} {'x floor':>7} {'kernels x':>9}")
    print(head)
    print("-" * len(head))
    for x in sorted(r["results"], key=lambda x: (x["card"], x["world"])):
        c = x["allreduce"]
        print(f"{x['card']:<5} {x['world']:>5} {x['width']:>6} {x['divergence']:<5} {x['kernel_ms']:>7.3f} "
              f"{'(' + format(x['kernel_ideal_ms'], '.3f') + ')':>8} {x['torch_ms']:>6.3f} {c['collectives']:>4} "
              f"{c['bytes_per_row']:>6} {c['ms']:>7.3f} {x['total_ms']:>7.3f} {x['floor_ms']:>6.3f} "
              f"{x['x_floor']:>7.2f} {x['kernel_x_floor']:>9.2f}")
    print("(ms per call; kernels by name in --json, with the estimates at 450 and 800 ns)")


def _comma(convert=str, choices=None):
    def parse(text: str) -> tuple:
        items = tuple(convert(x) for x in text.split(",") if x)
        if not items or (choices and any(x not in choices for x in items)):
            allowed = f" of {','.join(choices)}" if choices else ""
            raise argparse.ArgumentTypeError(f"expected a comma-separated list{allowed}, got {text!r}")
        return items

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.roofline_parallel", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192, help="N, rows (default 8192)")
    parser.add_argument("--vocab", type=int, default=128256, help="V, the whole vocabulary (default 128256)")
    parser.add_argument("--world", type=_comma(int), default=WORLDS,
                        help=f"world sizes, comma-separated (default {','.join(map(str, WORLDS))})")
    parser.add_argument("--divergences", type=_comma(choices=DIVERGENCES), default=DIVERGENCES,
                        help=f"comma-separated (default: all, {','.join(DIVERGENCES)})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    if any(w < 1 for w in args.world):
        parser.error("--world: world sizes are at least 1")
    result = model(args.rows, args.vocab, args.world, args.divergences)
    if args.json:
        print(json.dumps(result))
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
