"""Ahead-of-time compilation of every variant the launcher runs, for sm_80 and sm_90a, without a GPU.

The interpreter accepts code that the GPU compiler rejects (type mismatches, unsupported ops, layouts); this
compiles, down to a cubin through ptxas, exactly what ``kernels/launch.py`` launches (its constexprs, warps
and the runtime specialisation of aligned pointers and sizes; ``kernels/aot.py``) for every divergence x
(student, teacher) dtype pair x label mode (none, labels, CE at T = 1 and T = 2) x vocabulary (divisible by 16
or not), and checks that none spills; the quick run compiles the variants of one case per divergence, which take
every kernel and every value of the other dimensions (``aot.sample_cases``). It runs in a subprocess: under
``TRITON_INTERPRET=1`` (set by conftest) ``triton.jit`` makes functions that cannot be compiled.
"""

import json
import os
import subprocess
import sys

import pytest

from kdkernels.kernels.aot import DTYPE_PAIRS, LABEL_MODES, VOCABS
from kdkernels.torch_ops.layout import DIVERGENCE_CODES

KERNELS = {
    "fkl": {"stats_kernel", "grad_kernel"},
    "rkl": {"stats_kernel", "grad_kernel"},
    "todi": {"stats_kernel", "finish_kernel", "grad_kernel"},
    "akl": {"stats_kernel", "akl_refine_kernel", "akl_rank_kernel", "finish_kernel", "akl_resolve_kernel",
            "grad_kernel"},
    # the baselines of SPEC §2b: log-sum-exps, then the loss and Q_G, then the gradient
    **{d: {"stats_kernel", "finish_kernel", "grad_kernel"} for d in ("sfkl", "srkl", "jsd", "tvd")},
}


@pytest.mark.parametrize("cases", [pytest.param("--sample", id="sample"),
                                   pytest.param(None, id="every", marks=pytest.mark.full)])
def test_every_launched_variant_compiles_without_spills(cases):
    """Quick run: each divergence once, the cases rotating through the other dimensions (``aot.sample_cases``);
    exhaustive run: every case."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "kdkernels.kernels.aot", *filter(None, [cases]), "80", "90"], env=env,
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert {(r["arch"], r["divergence"], r["kernel"]) for r in rows} == {
        (arch, d, k) for arch in (80, 90) for d, kernels in KERNELS.items() for k in kernels}
    # every case contributes: each dtype pair, label mode and vocabulary appears among the first users
    for field, values in (("student", {s for s, _ in DTYPE_PAIRS}), ("labels", set(LABEL_MODES)),
                          ("vocab", set(VOCABS))):
        assert {r[field] for r in rows} == values
    assert all(r["reg"] > 0 for r in rows)
    spills = [r for r in rows if r["local"] or r["stack"]]
    assert not spills, spills
    assert set(DIVERGENCE_CODES) == set(KERNELS)
