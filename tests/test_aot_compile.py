"""Ahead-of-time compilation of every kernel variant for sm_80 and sm_90a, without a GPU.

The interpreter accepts code that the GPU compiler rejects (type mismatches, unsupported ops, layouts); this
runs the real compiler down to a cubin through ptxas for both architectures. It runs in a subprocess:
under ``TRITON_INTERPRET=1`` (set by conftest) ``triton.jit`` makes functions that cannot be compiled.
"""

import json
import os
import subprocess
import sys

from kdkernels.kernels.aot import TRITON_DTYPES
from kdkernels.torch_ops.layout import DIVERGENCE_CODES


def test_every_kernel_compiles_for_sm80_and_sm90a():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "kdkernels.kernels.aot", "80", "90"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert all(row["cubin_bytes"] > 0 for row in rows)
    built = {(r["divergence"], r["dtype"], r["has_ce"], r["arch"]) for r in rows}
    expected = {(d, dt, ce, a) for d in DIVERGENCE_CODES for dt in TRITON_DTYPES for ce in (False, True)
                for a in (80, 90)}
    assert built == expected
    kernels = {(r["divergence"], r["kernel"]) for r in rows}
    assert ("akl", "akl_level_shift0") in kernels and ("todi", "finish") in kernels
