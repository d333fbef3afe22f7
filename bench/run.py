"""The benchmark loop: for each configuration and divergence, time, peak memory and error of each provider.

Per provider: ``warmup`` calls of forward + backward (the first is reported as ``first_call_s``: it includes
any compilation, and the progress display says so while it runs), then ``repeats`` timed calls, the providers
taking turns so that a busy machine slows them alike; forward, backward and forward + backward are the medians,
and the fastest and slowest forward + backward show their spread. One more call measures the peak memory
above the inputs (``machine.PeakMemory``; the gradient is part of it) and the error against the float64
reference on a fixed subsample of rows: ``||x - x64|| / ||x64||`` for row losses and gradient rows.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import threading
import time
from dataclasses import dataclass

import torch

from bench.machine import PeakMemory, Timer
from bench.providers import Provider, providers
from kdkernels.torch_ops.reference import kd_loss_reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Config:
    n: int
    v: int
    dtype: str
    device: str
    repeats: int
    warmup: int
    error_rows: int = 64
    temperature: float = 1.0
    seed: int = 0


def make_inputs(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits ``3 x`` and a correlated student ``0.8 teacher + 1.5 y`` (x, y standard normal)."""
    gen = torch.Generator(cfg.device).manual_seed(cfg.seed)
    t = 3.0 * torch.randn(cfg.n, cfg.v, device=cfg.device, generator=gen)
    z = 0.8 * t + 1.5 * torch.randn(cfg.n, cfg.v, device=cfg.device, generator=gen)
    dtype = DTYPES[cfg.dtype]
    return z.to(dtype).requires_grad_(True), t.to(dtype)


class Progress:
    """tqdm when installed, else one line per step on stderr."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=sys.stderr, leave=False)
        except ImportError:
            self.bar, self.done, self.total = None, 0, total

    @contextlib.contextmanager
    def waiting(self, label: str):
        """Show ``label`` while the block runs (a first call, which may compile for minutes).

        With tqdm the bar is redrawn every second so that its elapsed time keeps counting; without it a line is
        printed before and one with the seconds taken after.
        """
        if self.bar is None:
            print(f"[{self.done}/{self.total}] {label} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            yield
            print(f"[{self.done}/{self.total}] {label}: {time.perf_counter() - start:.1f} s", file=sys.stderr,
                  flush=True)
            return
        self.bar.set_description(label)
        stop = threading.Event()

        def tick():
            while not stop.wait(1.0):
                self.bar.refresh()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            yield
        finally:
            stop.set()
            ticker.join()

    def step(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description(label)
            self.bar.update(1)
        else:
            self.done += 1
            print(f"[{self.done}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _call(p: Provider, z: torch.Tensor, t: torch.Tensor, device: str):
    """One forward + backward: ``(forward_s, backward_s, loss, grad)``; backward seeds ``1/N`` per row."""
    z.grad = None
    with Timer(device) as fwd:
        loss = p.loss(z, t)
    seed = torch.full_like(loss, 1.0 / z.shape[0]) if p.per_row else None
    with Timer(device) as bwd:
        loss.backward(seed)
    return fwd.seconds, bwd.seconds, loss.detach(), z.grad


def _reference64(z, t, rows, divergence, temperature):
    z64 = z.detach()[rows].double().requires_grad_(True)
    loss = kd_loss_reference(z64, t[rows].double(), divergence, reduction="none", temperature=temperature)
    loss.backward(torch.full_like(loss, 1.0 / z.shape[0]))
    return loss.detach(), z64.grad


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def _is_oom(err: Exception) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def bench_divergence(cfg: Config, divergence: str, names: tuple[str, ...], z, t, progress: Progress) -> list[dict]:
    """Rows of results (one per provider) for one divergence on inputs ``z``, ``t``."""
    provs = providers(divergence, cfg.device, names, cfg.temperature)
    rows = {p.name: dict(divergence=divergence, provider=p.name, n=cfg.n, v=cfg.v, dtype=cfg.dtype, note="")
            for p in provs}
    live = []
    for p in provs:
        try:
            with progress.waiting(f"{divergence} {p.name}: first call (compiles, if it does)"):
                fwd, bwd, _, _ = _call(p, z, t, cfg.device)
            rows[p.name]["first_call_s"] = fwd + bwd
            progress.step(f"{divergence} {p.name} warm-up")
            for _ in range(cfg.warmup - 1):
                _call(p, z, t, cfg.device)
                progress.step(f"{divergence} {p.name} warm-up")
            live.append(p)
        except RuntimeError as err:  # out of memory, or a provider that cannot run this case
            rows[p.name]["note"] = "out of memory" if _is_oom(err) else f"error: {err}".splitlines()[0][:80]
            z.grad = None
            if cfg.device == "cuda":
                torch.cuda.empty_cache()
    samples = {p.name: [] for p in live}
    for _ in range(cfg.repeats):
        for p in live:
            fwd, bwd, _, _ = _call(p, z, t, cfg.device)
            samples[p.name].append((fwd, bwd, fwd + bwd))
            progress.step(f"{divergence} {p.name}")
    sub = torch.randperm(cfg.n, generator=torch.Generator().manual_seed(cfg.seed))[: cfg.error_rows].sort().values
    sub = sub.to(cfg.device)
    ref_loss, ref_grad = _reference64(z, t, sub, divergence, cfg.temperature)
    grad_bytes = z.numel() * z.element_size()
    for p in live:
        row = rows[p.name]
        for key, col in (("fwd_ms", 0), ("bwd_ms", 1), ("fwd_bwd_ms", 2)):
            row[key] = 1e3 * statistics.median(s[col] for s in samples[p.name])
        row["fwd_bwd_min_ms"] = 1e3 * min(s[2] for s in samples[p.name])
        row["fwd_bwd_max_ms"] = 1e3 * max(s[2] for s in samples[p.name])
        with PeakMemory(cfg.device) as mem:
            _, _, loss, grad = _call(p, z, t, cfg.device)
        if mem.bytes is not None:
            row["peak_mib"] = mem.bytes / 2**20
            row["extra_over_grad"] = (mem.bytes - grad_bytes) / grad_bytes
        row["loss_err"] = _rel(loss[sub], ref_loss) if p.per_row else float("nan")
        row["grad_err"] = _rel(grad[sub], ref_grad)
        del loss, grad
        z.grad = None
        progress.step(f"{divergence} {p.name} memory")
    return list(rows.values())


def steps(cfg: Config, divergences, names) -> int:
    """Progress steps of ``bench_divergence`` over ``divergences`` (an upper bound when providers fail)."""
    return sum(len(providers(d, cfg.device, names)) * (cfg.warmup + cfg.repeats + 1) for d in divergences)
