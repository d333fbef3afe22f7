"""``python -m bench.compile_report``: every Triton kernel variant compiles for sm_90a without spilling.

It runs in a subprocess without ``TRITON_INTERPRET`` (set by conftest; interpreted kernels cannot be
compiled). float16 shares the bfloat16 code paths, so bfloat16 and float32 cover every variant's code.
"""

import json
import os
import subprocess
import sys

from bench.compile_report import traffic_rows
from kdkernels.torch_ops.reference import DIVERGENCES


def test_no_kernel_spills_on_sm90a():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "bench.compile_report", "--json", "--dtypes", "bfloat16", "float32"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert {(r["divergence"], r["dtype"], r["has_ce"]) for r in rows} == {
        (d, dt, ce) for d in DIVERGENCES for dt in ("bfloat16", "float32") for ce in (False, True)}
    assert all(r["registers"] > 0 for r in rows)
    spills = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spills, spills


def test_traffic_counts_the_kernels_passes():
    by = {(r["divergence"], r["dtype"]): r for r in traffic_rows(["bfloat16", "float32"], 1000)}
    assert by["fkl", "bfloat16"]["total_bytes"] == 1000 * (2 + 2) * 2 + 1000 * 2  # 2 passes + gradient write
    assert by["fkl", "float32"]["min_bytes"] == 1000 * 4 * 3
    assert by["todi", "float32"]["fwd_passes_zt"] == 2
    assert (by["akl", "bfloat16"]["fwd_passes_t_only"], by["akl", "float32"]["fwd_passes_t_only"]) == (1, 3)
