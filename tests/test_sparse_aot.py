"""Ahead-of-time compilation of the sparse-teacher kernels for sm_80 and sm_90a, and their static cost model.

``python -m tests.test_sparse_aot`` records (on meta tensors) what ``kernels/sparse.py`` launches for a few cases that
together take every constexpr value (tail with and without the rest bitmask, labels, the CE term at T = 1 and 2,
student and log-prob dtypes, a vocabulary divisible by 16 or not, k of 1 to 256 for ``topk_teacher``), compiles each
launch exactly as launched (``kernels/aot.py``) down to a cubin for both architectures and prints its resources;
the test checks that none spills. The cost model (``bench/roofline_sparse.py``) must find the loss's streaming
passes memory-bound on the H100 and the H200, and their time within 10% of their own traffic (``z`` read twice,
the gradient written once). Both run in subprocesses without ``TRITON_INTERPRET`` (set by conftest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

# (student, log-prob dtype, tail, labels, vocabulary, K)
CASES = [
    ("bf16", "bf16", "bucket", "ce_t2", 128256, 64),
    ("fp16", "fp16", "renormalize", "labels", 50257, 8),
    ("fp32", "fp32", "truncate", "none", 128256, 256),
    ("bf16", "fp32", "bucket", "ce_t1", 50257, 1),
]
KERNELS = {"sparse_stats_kernel", "sparse_grad_kernel", "sparse_ids_kernel", "topk_kernel"}


def _records(case):
    import torch

    from kdkernels.kernels import launch
    from kdkernels.kernels import sparse as kernels
    from kdkernels.kernels.aot import DTYPES
    from kdkernels.torch_ops.options import KDOptions

    student, logprob, tail, labels, vocab, k = case
    meta = torch.device("meta")
    rows = 64
    z = torch.empty((rows, vocab), dtype=DTYPES[student], device=meta)
    ids = torch.empty((rows, k), dtype=torch.int64, device=meta)
    lp = torch.empty((rows, k), dtype=DTYPES[logprob], device=meta)
    label_tensor = None if labels == "none" else torch.empty(rows, dtype=torch.int64, device=meta)
    opts = KDOptions("fkl", temperature=2.0 if labels == "ce_t2" else 1.0,
                     ce_weight=0.5 if labels.startswith("ce") else 0.0)
    rest = tail == "bucket"
    with launch.recording() as records:
        stats = kernels.sparse_stats(z, ids, torch.empty((rows, k), dtype=torch.bool, device=meta), label_tensor,
                                     opts, rest)
        kernels.sparse_backward(torch.empty(rows, device=meta), z, ids, lp, label_tensor, stats,
                                torch.empty((rows, k), device=meta), opts, rest)
        kernels.topk(z, k, 1.0)
    return records


def _compile(job):
    from kdkernels.kernels import aot

    case_index, launch_index, arch = job
    record = _records(CASES[case_index])[launch_index]
    cubin = aot.compile_launch(record, arch).asm["cubin"]
    return dict(case=case_index, kernel=aot.kernel_name(record), arch=arch, **aot.resources(cubin))


def main() -> None:
    """One JSON line per compiled launch (two processes)."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(i, j, arch) for i, case in enumerate(CASES) for j in range(len(_records(case))) for arch in (80, 90)]
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        for row in pool.map(_compile, jobs):
            print(json.dumps(row), flush=True)


def _run(args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=1200)


def test_every_case_compiles_for_sm80_and_sm90a_without_spills():
    out = _run(["-m", "tests.test_sparse_aot"])
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert {(r["arch"], r["kernel"]) for r in rows} == {(arch, k) for arch in (80, 90) for k in KERNELS}
    assert {r["case"] for r in rows} == set(range(len(CASES)))
    assert all(r["reg"] > 0 for r in rows)
    spills = [r for r in rows if r["local"] or r["stack"]]
    assert not spills, spills


def test_the_loss_is_memory_bound():
    out = _run(["-m", "bench.roofline_sparse", "--json", "--check"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout)
    for card in ("H100", "H200"):
        assert result[card]["x_traffic"] <= 1.1, result[card]
    assert all(k["local_bytes"] == 0 for k in result["kernels"])


if __name__ == "__main__":
    main()
