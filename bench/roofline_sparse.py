"""``python -m bench.roofline_sparse``: the static cost model of ``bench.roofline`` for the sparse-teacher kernels.

For one shape (default N=8192, V=128256, K=64, bfloat16 student and log-probs), the kernels that
``kernels/sparse.py`` launches are compiled exactly as launched for sm_90a and their loops counted (no GPU):

- ``sparse_stats_kernel`` (forward): reads ``z`` and the id bitmask (4 bytes per 32 entries);
- ``sparse_grad_kernel`` (backward): reads ``z``, writes ``dz``;
- ``sparse_ids_kernel`` (backward): per row the K entries (id, log-prob, ``G_k``, ``z`` and ``dz`` at the id);
- ``topk_kernel`` (``topk_teacher``, separate): reads ``t``. Its loop holds the merge of a block into the running
  top-k, taken only when the block has a key above the current k-th: counted as always taken, an upper bound.

Each kernel's time is the largest of memory, issue and MUFU time (``bench.roofline.KernelCost``). The loss's
forward + backward (tail ``bucket``, labels) is compared with the floor (one read of ``z``, one write of the
gradient) and with its own traffic (``z`` read twice, the gradient written once, plus the bitmask and the K
entries). The category divergence on ``(N, K + 1)`` (the dense op, O(K / V) of the traffic) and the host-side
tensor ops are not counted. ``--check`` exits 1 unless every streaming kernel of the loss is memory-bound on both
cards; ``--json`` prints one object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from bench.roofline import CARDS, SIZES, KernelCost, opcode, parse_sass, vocabulary_loop

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
ID_BYTES = 8  # int64 ids as the op passes them
GRAD_K_BYTES = 4  # float32 G_k


def _bytes_per_element(name: str, student: int, logprob: int) -> float:
    """Bytes one element of the kernel's loop streams (an entry of the row; one of the K entries for the ids)."""
    return {
        "sparse_stats_kernel": student + 4 / 32,
        "sparse_grad_kernel": 2 * student,
        "sparse_ids_kernel": ID_BYTES + logprob + GRAD_K_BYTES + 2 * student,
        "topk_kernel": student,
    }[name]


def launches(rows: int, vocab: int, k: int, student: str, logprob: str) -> list:
    """The recorded launches (on meta tensors) of one bucket forward + backward with labels, then ``topk_teacher``."""
    import torch

    from kdkernels.kernels import launch
    from kdkernels.kernels import sparse as kernels
    from kdkernels.torch_ops.options import KDOptions

    meta = torch.device("meta")
    z = torch.empty((rows, vocab), dtype=getattr(torch, DTYPES[student]), device=meta)
    ids = torch.empty((rows, k), dtype=torch.int64, device=meta)
    lp = torch.empty((rows, k), dtype=getattr(torch, DTYPES[logprob]), device=meta)
    labels = torch.empty(rows, dtype=torch.int64, device=meta)
    opts = KDOptions("fkl")
    with launch.recording() as records:
        stats = kernels.sparse_stats(z, ids, torch.empty((rows, k), dtype=torch.bool, device=meta), labels, opts,
                                     rest=True)
        kernels.sparse_backward(torch.empty(rows, device=meta), z, ids, lp, labels, stats,
                                torch.empty((rows, k), device=meta), opts, rest=True)
        kernels.topk(z, k, 1.0)
    return records


def kernel_cost(record, student: int, logprob: int) -> KernelCost:
    from kdkernels.kernels import aot

    cubin = aot.compile_launch(record, 90).asm["cubin"]
    instrs = parse_sass(aot.sass(cubin))
    loop = vocabulary_loop(instrs)
    name = aot.kernel_name(record)
    block = record.meta.get("BLOCK_V", record.meta.get("BLOCK_K", 0))
    res = aot.resources(cubin)
    return KernelCost(name=name, warps=record.meta["num_warps"], block=block if loop else 0, loop_instr=len(loop),
                      loop_mufu=sum(opcode(op).startswith("MUFU") for op in loop),
                      other_instr=len(instrs) - len(loop),
                      bytes_per_elem=_bytes_per_element(name, student, logprob), registers=res["reg"],
                      local_bytes=res["local"] + res["stack"])


def model(rows: int = 8192, vocab: int = 128256, k: int = 64, student: str = "bf16", logprob: str = "bf16") -> dict:
    """Per-kernel costs and the loss's totals on each card."""
    size_z, size_lp = SIZES[student], SIZES[logprob]
    costs = [kernel_cost(r, size_z, size_lp) for r in launches(rows, vocab, k, student, logprob)]
    out = dict(rows=rows, vocab=vocab, k=k, student=student, logprob=logprob, kernels=[])
    for card, (bandwidth, _, _) in CARDS.items():
        loss_s = traffic_s = 0.0
        for cost in costs:
            elements = k if cost.name == "sparse_ids_kernel" else vocab
            seconds, bound = cost.seconds(card, rows, elements)
            if cost.name != "topk_kernel":
                loss_s += seconds
                traffic_s += rows * elements * cost.bytes_per_elem / bandwidth
            else:
                out.setdefault("topk", {})[card] = dict(ms=1e3 * seconds, floor_ms=1e3 * rows * vocab * size_z
                                                        / bandwidth, bound=bound)
            if card == "H100":
                out["kernels"].append(dict(cost.__dict__, instr_per_elem=cost.instr_per_elem,
                                           mufu_per_elem=cost.mufu_per_elem, bound=bound,
                                           bounds={c: cost.seconds(c, rows, elements)[1] for c in CARDS}))
        floor = rows * vocab * 2 * size_z / bandwidth
        out[card] = dict(ms=1e3 * loss_s, floor_ms=1e3 * floor, x_floor=loss_s / floor, x_traffic=loss_s / traffic_s)
    return out


def memory_bound(result: dict) -> bool:
    """Every streaming kernel of the loss is memory-bound on every card."""
    return all(set(k["bounds"].values()) == {"memory"} for k in result["kernels"]
               if k["name"] in ("sparse_stats_kernel", "sparse_grad_kernel"))


def print_report(r: dict) -> None:
    print(f"Static cost model of the sparse-teacher kernels, N={r['rows']} V={r['vocab']} K={r['k']}, student "
          f"{r['student']}, log-probs {r['logprob']}; sm_90a SASS as launched (bench/roofline.py's assumptions)")
    head = (f"{'kernel':<20} {'warps':>5} {'block':>5} {'regs':>4} {'spill':>5} {'instr/elem':>10} {'mufu/elem':>9} "
            f"{'bytes/elem':>10} {'H100':>7} {'H200':>7}")
    print(head)
    print("-" * len(head))
    for k in r["kernels"]:
        print(f"{k['name']:<20} {k['warps']:>5} {k['block']:>5} {k['registers']:>4} {k['local_bytes']:>5} "
              f"{k['instr_per_elem']:>10.2f} {k['mufu_per_elem']:>9.2f} {k['bytes_per_elem']:>10.3f} "
              f"{k['bounds']['H100']:>7} {k['bounds']['H200']:>7}")
    print("(sparse_ids_kernel: per one of the K entries of a row; topk_kernel: the merge counted in every block)")
    print("\nsparse_kd_loss forward + backward (bucket): ms, x floor (one read of z, one gradient write), x traffic "
          "(z read twice, the gradient written once, bitmask and K entries)")
    for card in CARDS:
        c = r[card]
        print(f"{card}: {c['ms']:.3f} ms, floor {c['floor_ms']:.3f} ms, x floor {c['x_floor']:.2f}, "
              f"x traffic {c['x_traffic']:.2f}")
    for card, c in r["topk"].items():
        print(f"topk_teacher k={r['k']} on {card}: at most {c['ms']:.3f} ms ({c['bound']}-bound), one read of t "
              f"{c['floor_ms']:.3f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.roofline_sparse", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192, help="N, rows (default 8192)")
    parser.add_argument("--vocab", type=int, default=128256, help="V, vocabulary (default 128256)")
    parser.add_argument("--k", type=int, default=64, help="K, teacher entries per row (default 64)")
    parser.add_argument("--student", choices=tuple(DTYPES), default="bf16", help="student dtype (default bf16)")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the loss's streaming kernels are "
                                                             "memory-bound")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    result = model(args.rows, args.vocab, args.k, args.student)
    if args.json:
        print(json.dumps(result))
    else:
        print_report(result)
    return 1 if args.check and not memory_bound(result) else 0


if __name__ == "__main__":
    sys.exit(main())
