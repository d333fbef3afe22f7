"""``python -m bench --gpu-check`` (or ``bench/gpu_check.sh``): everything to run the day a GPU is available.

Within about 8 minutes, no network needed:

1. the CUDA tests (``tests/test_cuda.py``: the compiled kernels against the float64 reference, and
   ``tests/test_host_sync.py`` under ``torch.cuda.set_sync_debug_mode("error")``); the rest of the suite
   targets CPU tensors through Triton's interpreter and is CI's job;
2. the copy bandwidth of the card (``dst.copy_(src)`` of 1 GiB: read + write bytes over time);
3. kdkernels at N=8192, V in {32000, 128256, 256000}, bfloat16 and float32: forward, backward and forward +
   backward, each against the bandwidth floor of its passes (``bench.roofline.pass_bytes`` / copy bandwidth);
4. the full benchmark (eager, ``torch.compile``, Liger when installed) at the target shape, V=128256 bf16.

Each step checks the time left and is skipped, saying so, when the budget is spent.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from bench import report
from bench.machine import machine
from bench.roofline import pass_bytes
from bench.run import Config, Progress, bench_divergence, make_inputs, steps
from kdkernels.torch_ops.reference import DIVERGENCES

VOCABS = (32000, 128256, 256000)
DTYPES = ("bfloat16", "float32")


def copy_bandwidth(gib: float = 1.0, repeats: int = 10) -> float:
    """Bytes per second of a device-to-device copy (each copy reads and writes ``gib`` GiB)."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / statistics.median(times[2:])


def floor_ratios(rows: list[dict], bandwidth: float) -> None:
    """Add ``fwd/bwd/fwd_bwd_over_floor``: each time over the bytes of its passes at the copy bandwidth."""
    for r in rows:
        if r.get("provider") != "kdkernels" or r.get("fwd_ms") is None:
            continue
        short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[r["dtype"]]
        b = pass_bytes(r["divergence"], r["v"], short, short)
        for key, part in (("fwd", "forward"), ("bwd", "backward"), ("fwd_bwd", "total")):
            floor_ms = 1e3 * r["n"] * b[part] / bandwidth
            r[f"{key}_over_floor"] = r[f"{key}_ms"] / floor_ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench --gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=470.0, help="seconds for the whole check (default 470)")
    parser.add_argument("--test-budget", type=float, default=200.0, help="seconds for the test suite")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device; nothing to do")
        return 1
    deadline = time.monotonic() + args.budget
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    print("== tests on CUDA (compiled kernels)", flush=True)
    try:
        tests = subprocess.run([sys.executable, "-m", "pytest", "tests/test_cuda.py", "tests/test_host_sync.py", "-q",
                                "-p", "no:cacheprovider"], env=env, timeout=args.test_budget)
        tests_ok = tests.returncode == 0
    except subprocess.TimeoutExpired:
        print(f"tests: stopped after {args.test_budget:.0f} s (time budget)")
        tests_ok = False
    bandwidth = copy_bandwidth()
    info = machine("cuda")
    print(f"== copy bandwidth: {bandwidth / 1e9:.0f} GB/s on {info['machine']}", flush=True)
    configs = [(Config(8192, v, dt, "cuda", repeats=10, warmup=3), ("kdkernels",)) for dt in DTYPES for v in VOCABS]
    configs.append((Config(8192, 128256, "bfloat16", "cuda", repeats=10, warmup=3), ("compile", "eager", "liger")))
    rows = []
    progress = Progress(sum(steps(cfg, DIVERGENCES, names) for cfg, names in configs))
    for cfg, names in configs:
        vocab, dtype = cfg.v, cfg.dtype
        z, t = make_inputs(cfg)
        for divergence in DIVERGENCES:
            if time.monotonic() > deadline - 30:
                rows.append(dict(divergence=divergence, provider=",".join(names), n=cfg.n, v=vocab, dtype=dtype,
                                 note="skipped: time budget"))
                continue
            rows += bench_divergence(cfg, divergence, names, z, t, progress)
        del z, t
        torch.cuda.empty_cache()
    progress.close()
    floor_ratios(rows, bandwidth)
    report.COLUMNS[-1:-1] = [(f"{k}_over_floor", f"{k} / floor", "{:.2f}") for k in ("fwd", "bwd", "fwd_bwd")]
    print(report.table(rows, info))
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; tests {'passed' if tests_ok else 'FAILED or incomplete'}")
    print("saved " + ", ".join(str(p) for p in report.save(rows, dict(info, bandwidth_gbs=f"{bandwidth / 1e9:.0f}"),
                                                            "gpu-check")))
    return 0 if tests_ok else 1
