"""The vocabulary-parallel benchmarks: ``python -m bench.vocab_parallel`` (CPU, gloo) at a tiny shape, its
``--compare`` table, and ``python -m bench.roofline_parallel``'s all-reduce model (pure Python); the cost model's
compile of the kernels (sm_90a, no GPU) is a ``full`` test, as in ``test_roofline.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import roofline_parallel as rp
from bench import vocab_parallel as vp
from tests.utils import HAS_TRITON

ROOT = Path(__file__).resolve().parents[1]


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


def test_slices_partition_the_vocabulary():
    z, t, labels = vp.inputs(8, 41, 0, 1)
    parts = [vp.inputs(8, 41, rank, 3) for rank in range(3)]
    assert [p[0].shape[1] for p in parts] == [14, 14, 13]
    assert torch.equal(torch.cat([p[0] for p in parts], 1), z) and torch.equal(torch.cat([p[1] for p in parts], 1), t)
    assert all(torch.equal(p[2], labels) for p in parts)
    assert (labels == -100).any() and ((labels >= 0) & (labels < 41)).sum() == 8 - (labels == -100).sum()


@pytest.mark.skipif(not _distributed(), reason="torch.distributed with gloo is not available")
def test_vocab_parallel_benchmark_writes_its_json(tmp_path):
    """Two gloo processes, N=8, V=40, every divergence, one timed call each way (about 5 s on 2 cores)."""
    out = tmp_path / "vp.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.vocab_parallel", "--rows", "8", "--vocab", "40", "--world",
                           "2", "--repeat", "1", "--warmup", "1", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert (data["rows"], data["vocab"], data["world"]) == (8, 40, 2)
    assert data["threads"] >= 1 and data["torch"] == torch.__version__
    assert Path(data["kdkernels_path"]) == ROOT / "kdkernels"
    assert data["commit"] is None or len(data["commit"]) == 40
    assert list(data["results"]) == list(vp.DIVERGENCES)
    for row in data["results"].values():
        assert row["forward_ms"] > 0 and row["forward_backward_ms"] > 0
        assert len(row["forward_samples_ms"]) == 1 == len(row["forward_backward_samples_ms"])
    for divergence in vp.DIVERGENCES:
        assert divergence in proc.stdout
    table = vp.compare(data, data)
    assert table.count("| 1.00 |") == 2 * len(vp.DIVERGENCES) and "warning" not in table


def test_compare_flags_different_shapes():
    a = dict(rows=8, vocab=40, world=2, threads=1, torch="x", results={"fkl": dict(forward_ms=2.0,
                                                                                      forward_backward_ms=4.0)})
    b = dict(a, world=3, results={"fkl": dict(forward_ms=1.0, forward_backward_ms=6.0), "rkl": {}})
    table = vp.compare(a, b)
    assert "| fkl | 2.0 | 1.0 | 0.50 | 4.0 | 6.0 | 1.50 |" in table
    assert "warning: world differs" in table and "in one file only: rkl" in table


def test_ring_allreduce_time():
    assert rp.allreduce_seconds(1e9, 1, 3) == 0.0
    two = rp.allreduce_seconds(450e6, 2, 3, latency_us=15.0, bandwidth=450e9)
    assert two == pytest.approx(3 * 15e-6 + 2 * (1 / 2) * 1e-3)
    eight = rp.allreduce_seconds(450e6, 8, 2, latency_us=10.0, bandwidth=450e9)
    assert eight == pytest.approx(2 * 10e-6 + 2 * (7 / 8) * 1e-3)
    assert [rp.collectives(d) for d in ("fkl", "rkl", "todi", "jsd", "akl")] == [2, 2, 3, 3, 3 + 2 * 2]
    assert rp.collectives("akl", teacher_bytes=4) == 3 + 2 * 4
    assert rp._bytes_per_row_fallback("fkl", 2) == (4 + 2) * 4
    assert rp._bytes_per_row_fallback("akl", 4) == (4 + 6 + 256 * 2) * 4 + 4 * 4
    comm = rp.allreduce("fkl", 1000, 4)
    per_row, _ = rp.bytes_per_row("fkl", 4)
    assert comm["bytes_per_row"] == per_row and comm["collectives"] == 2 + rp.LAYOUT_COLLECTIVES
    payload = 1000 * per_row + rp.LAYOUT_COLLECTIVES * rp.LAYOUT_BYTES_PER_RANK * 4
    assert comm["payload_bytes"] == payload
    assert comm["seconds"] == pytest.approx(rp.allreduce_seconds(payload, 4, comm["collectives"]))


def test_akl_torch_ops_are_counted():
    counted = rp.akl_torch_traffic(rows=2, width=512)
    assert counted["ops"] > 10 and counted["read_bytes_per_elem"] > counted["write_bytes_per_elem"] > 10


@pytest.mark.full
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_cost_model_compiles_the_rank_kernels():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.roofline_parallel", "--vocab", "16384", "--world", "2,4",
                           "--divergences", "fkl,todi,akl", "--json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert {(r["card"], r["world"], r["divergence"]) for r in data["results"]} == {
        (c, w, d) for c in ("H100", "H200") for w in (2, 4) for d in ("fkl", "todi", "akl")}
    for r in data["results"]:
        assert r["width"] == 16384 // r["world"]
        assert set(r["kernels"]) == set(rp.kernels_of(r["divergence"]))
        assert r["total_ms"] == pytest.approx(r["kernel_ms"] + r["torch_ms"] + r["allreduce"]["ms"])
        assert r["kernel_x_floor"] > 1.0 and r["x_floor"] > r["kernel_x_floor"]
        assert (r["torch_ms"] > 0) == (r["divergence"] == "akl")
