"""Where a benchmark runs: machine name and versions, a timer, and peak memory above a baseline.

Peak memory. On CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the call. On the
CPU torch has no allocator statistics, so the process's resident-set high-water mark is used: free heap
memory is handed back to the OS (``malloc_trim``), the kernel's high-water mark is reset
(``/proc/self/clear_refs``), and the peak is ``VmHWM`` after the call minus ``VmRSS`` before it. This counts
every page the call touched (tensors, allocator slack, compiled-code buffers), so it is an upper bound on
the tensor memory; it needs Linux, and elsewhere memory is reported as unknown.
"""

from __future__ import annotations

import ctypes
import gc
import platform
import time

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def machine(device: str) -> dict[str, str]:
    """Machine name (GPU or CPU model), torch and triton versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    return dict(machine=name, torch=torch.__version__, triton=triton_version)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Timer:
    """Elapsed seconds of a region: CUDA events on the GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            self.end.record()
        else:
            self.t1 = time.perf_counter()

    @property
    def seconds(self) -> float:
        if self.device == "cuda":
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3
        return self.t1 - self.t0


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak bytes allocated inside the ``with`` block above what was allocated when it started (None if
    this platform cannot tell)."""

    def __init__(self, device: str):
        self.device = device
        self.bytes: int | None = None

    def __enter__(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the resident-set high-water mark
            self.base = _status_kib("VmRSS") * 1024
        except OSError:
            self.base = None
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        elif self.base is not None:
            self.bytes = _status_kib("VmHWM") * 1024 - self.base
