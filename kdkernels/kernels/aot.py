"""Ahead-of-time compilation of exactly the kernels ``launch.py`` launches, for a GPU architecture, with no GPU.

:func:`launched` runs the launcher on ``meta`` tensors (shapes, strides and dtypes, no data) while
``launch.recording()`` collects the launches; :func:`compile_launch` then binds each launch's arguments the
way ``triton.jit`` does at run time (the same constexprs, ``num_warps`` and runtime specialisation: pointers,
``V`` and strides divisible by 16 get the divisibility attribute that vectorises their loads) and runs the
real compiler down to a cubin through ``ptxas``, for ``GPUTarget("cuda", arch, 32)`` (90: sm_90a). Meta tensors
report address 0, as aligned as the caching allocator's blocks. Code that Triton's interpreter tolerates but
the compiler rejects fails here.

Must run in a process without ``TRITON_INTERPRET=1`` (under the interpreter ``triton.jit`` gives functions
that cannot be compiled): tests call ``python -m kdkernels.kernels.aot`` in a subprocess.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from kdkernels.kernels import launch
from kdkernels.torch_ops.layout import DIVERGENCE_CODES
from kdkernels.torch_ops.options import KDOptions

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (student, teacher) dtypes: the three plain ones and both mixes.
DTYPE_PAIRS = (("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32"), ("bf16", "fp32"), ("fp32", "bf16"))
# Label modes: no labels; labels only (ignore_index); labels and the CE term at T = 1 (it shares the
# student's log-sum-exp) and at T = 2.
LABEL_MODES = ("none", "labels", "ce_t1", "ce_t2")
VOCABS = (128256, 50257)  # one divisible by 16 (vectorised loads), one not


@dataclass(frozen=True)
class Case:
    """One call of the op: the shapes and options that decide which binaries the launcher runs."""

    divergence: str
    student: str = "bf16"
    teacher: str = "bf16"
    labels: str = "labels"
    vocab: int = 128256
    rows: int = 8192

    def options(self) -> KDOptions:
        return KDOptions(self.divergence, temperature=2.0 if self.labels == "ce_t2" else 1.0,
                         ce_weight=0.5 if self.labels.startswith("ce") else 0.0)


def all_cases() -> list[Case]:
    """Every launched variant: divergence x dtype pair x label mode x vocabulary alignment."""
    return [Case(d, s, t, lab, v) for d, (s, t), lab, v in
            itertools.product(DIVERGENCE_CODES, DTYPE_PAIRS, LABEL_MODES, VOCABS)]


def sample_cases() -> list[Case]:
    """Each divergence once, the cases rotating through the dtype pairs, label modes and vocabularies, so that every
    kernel and every value of each of these appears (the quick test run; :func:`all_cases` in the exhaustive one)."""
    return [Case(d, *DTYPE_PAIRS[i % len(DTYPE_PAIRS)], LABEL_MODES[i % len(LABEL_MODES)], VOCABS[i % len(VOCABS)])
            for i, d in enumerate(DIVERGENCE_CODES)]


def launched(case: Case) -> list[launch.Launch]:
    """The launches of one forward + backward of ``case``, recorded on meta tensors."""
    meta = torch.device("meta")
    z = torch.empty((case.rows, case.vocab), dtype=DTYPES[case.student], device=meta)
    t = torch.empty((case.rows, case.vocab), dtype=DTYPES[case.teacher], device=meta)
    labels = None if case.labels == "none" else torch.empty(case.rows, dtype=torch.int64, device=meta)
    opts = case.options()
    with launch.recording() as records:
        _, stats = launch.kd_forward(z, t, labels, opts)
        launch.kd_backward(torch.empty(case.rows, device=meta), z, t, labels, stats, opts)
    return records


def bind(record: launch.Launch, arch: int) -> tuple[ASTSource, GPUTarget, dict]:
    """What ``triton.jit`` compiles for one recorded launch on ``sm_{arch}``: source, target and options."""
    kernel = record.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    meta = dict(record.meta, debug=False)
    bound, specialization, options = binder(*record.args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), target, options.__dict__


def compile_launch(record: launch.Launch, arch: int):
    """Compile one recorded launch as ``triton.jit`` would at run time, for ``sm_{arch}`` (90: sm_90a)."""
    source, target, options = bind(record, arch)
    return triton.compile(source, target=target, options=options)


def binary_key(record: launch.Launch, arch: int) -> str:
    """A key that two launches share exactly when they run the same binary."""
    source, _, options = bind(record, arch)
    return f"{arch}-{source.hash()}-{sorted(options.items())}"


def tool(name: str) -> str:
    """Path of a CUDA binary utility shipped in the triton wheel (``cuobjdump``, ``nvdisasm``)."""
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool("cuobjdump"), flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def resources(cubin: bytes) -> dict[str, int]:
    """Registers per thread, stack frame and local (spill) bytes of a cubin's kernel (``cuobjdump -res-usage``)."""
    out = _cuobjdump(cubin, "-res-usage")
    found = {key: re.search(rf"\b{key}:(\d+)", out) for key in ("REG", "STACK", "LOCAL", "SHARED")}
    missing = [k for k, m in found.items() if m is None]
    if missing:
        raise RuntimeError(f"cuobjdump -res-usage lacks {missing}:\n{out}")
    return {k.lower(): int(m.group(1)) for k, m in found.items()}


def sass(cubin: bytes) -> str:
    """The SASS of a cubin (``cuobjdump -sass``)."""
    return _cuobjdump(cubin, "-sass")


def kernel_name(record: launch.Launch) -> str:
    return record.kernel.fn.__name__


def unique_launches(cases: list[Case], archs: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """``(case index, launch index, arch)`` for each distinct binary that ``cases`` launch (first use only)."""
    seen = set()
    out = []
    for i, case in enumerate(cases):
        for j, record in enumerate(launched(case)):
            for arch in archs:
                key = binary_key(record, arch)
                if key not in seen:
                    seen.add(key)
                    out.append((i, j, arch))
    return out


def _compile_one(job: tuple[Case, int, int]) -> dict:
    case, index, arch = job
    record = launched(case)[index]
    compiled = compile_launch(record, arch)
    return dict(case.__dict__, kernel=kernel_name(record), arch=arch, num_warps=record.meta["num_warps"],
                **resources(compiled.asm["cubin"]))


def main() -> None:
    """``python -m kdkernels.kernels.aot [--sample] [ARCH ...]``: compile every launched variant once (on every
    core), one JSON line each: the first case that launches it, the kernel, the arch, its warps, registers and the
    stack/local (spill) bytes. ``--sample``: the variants of :func:`sample_cases` only."""
    import json
    import os
    import sys
    from concurrent.futures import ProcessPoolExecutor

    args = sys.argv[1:]
    archs = tuple(int(a) for a in args if a != "--sample") or (80, 90)
    cases = sample_cases() if "--sample" in args else all_cases()
    jobs = [(cases[i], j, arch) for i, j, arch in unique_launches(cases, archs)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        for row in pool.map(_compile_one, jobs, chunksize=4):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
