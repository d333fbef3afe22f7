"""Fused-linear benchmark: output layer + distillation loss, forward and backward, three ways.

- ``fused``: :func:`kdkernels.fused_linear_kd_loss` (logits made a chunk of tokens at a time);
- ``matmul``: ``h @ W.T`` for student and teacher, then :func:`kdkernels.kd_loss` on the full logits;
- ``eager``: the same full logits through the plain PyTorch reference (``backend="reference"``).

Each provider runs in a fresh subprocess that creates its inputs, runs the warm-up steps (first calls
allocate one-time state), hands free heap pages back (``malloc_trim``), resets the kernel's resident-set
high-water mark (``/proc/self/clear_refs``) and reports the peak resident memory above what it held before
the timed steps (CPU), or ``torch.cuda.max_memory_allocated`` above the allocation before the step (CUDA); the
inputs are not counted, the gradients and everything else the step allocates are.

``python -m bench.fused_linear`` (defaults: N=4096 tokens, hidden 1024, V=32000, fkl, float32) prints one
table row per provider: median seconds per forward+backward and peak extra memory in MiB.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

from kdkernels.torch_ops.reference import DIVERGENCES

PROVIDERS = ("fused", "matmul", "eager")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _release_free_heap() -> None:
    """Return glibc's free heap pages to the system (``malloc_trim``), where glibc is the allocator."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _inputs(args, device: str):
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen) * scale).to(device)

    scale = args.hidden ** -0.5
    return dict(
        h=randn(args.n, args.hidden).requires_grad_(),
        w=randn(args.vocab, args.hidden, scale=scale).requires_grad_(),
        g=randn(args.n, args.hidden),
        u=randn(args.vocab, args.hidden, scale=scale),
        labels=torch.randint(0, args.vocab, (args.n,), generator=gen).to(device),
    )


def _step(provider: str, x: dict, args) -> None:
    import kdkernels as kd

    options = dict(labels=x["labels"], temperature=args.temperature, kd_weight=args.kd_weight,
                   ce_weight=args.ce_weight)
    if provider == "fused":
        loss = kd.fused_linear_kd_loss(x["h"], x["w"], x["g"], x["u"], args.divergence,
                                       chunk_size=args.chunk_size, **options)
    else:
        with torch.no_grad():
            teacher = x["g"] @ x["u"].T
        backend = "reference" if provider == "eager" else "auto"
        loss = kd.kd_loss(x["h"] @ x["w"].T, teacher, args.divergence, backend=backend, **options)
    loss.backward()


def worker(provider: str, args) -> dict:
    """Time and peak extra memory of ``args.repeats`` steps of ``provider`` (after ``args.warmup`` steps)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    x = _inputs(args, device)
    for _ in range(args.warmup):
        _step(provider, x, args)
        x["h"].grad = x["w"].grad = None
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _release_free_heap()  # so that memory the warm-up freed but malloc kept is not reused unseen
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        base = _status_kib("VmRSS") * 1024
    times = []
    for _ in range(args.repeats):
        x["h"].grad = x["w"].grad = None
        start = time.perf_counter()
        _step(provider, x, args)
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _status_kib("VmHWM") * 1024
    return {"provider": provider, "seconds": statistics.median(times), "peak_bytes": peak - base}


def run_provider(provider: str, argv: list[str], env: dict[str, str] | None = None) -> dict:
    """``worker`` in a fresh ``python -m bench.fused_linear --worker provider`` process (``env`` added)."""
    proc = subprocess.run([sys.executable, "-m", "bench.fused_linear", *argv, "--worker", provider],
                          capture_output=True, text=True, check=False, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"{provider} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fused_linear", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="token rows")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--divergence", default="fkl", choices=DIVERGENCES, help="(default: fkl)")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset of " +
                        ",".join(PROVIDERS))
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--kd-weight", type=float, default=1.0)
    parser.add_argument("--ce-weight", type=float, default=0.0)
    parser.add_argument("--chunk-size", type=int, default=None, help="fused rows per chunk (default: automatic)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", choices=PROVIDERS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0
    print(f"fused-linear KD, {args.divergence}: N={args.n} hidden={args.hidden} V={args.vocab} float32 on "
          f"{args.device}, forward+backward, median of {args.repeats} (torch {torch.__version__})")
    print(f"{'provider':<10} {'seconds':>9} {'peak MiB':>10}")
    for provider in args.providers.split(","):
        result = run_provider(provider, argv)
        print(f"{provider:<10} {result['seconds']:>9.3f} {result['peak_bytes'] / 2**20:>10.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
