"""``python -m bench.compile_report``: registers, spills and shared memory of every Triton kernel variant.

Each variant of ``kdkernels.kernels.aot.variants`` is compiled ahead of time for sm_90a (no GPU needed); its
PTX goes through the ``ptxas`` shipped in the triton wheel with ``-v``, whose report gives the registers per
thread and the spill stores/loads; the shared memory is Triton's (``metadata.shared``). A second table gives,
per divergence, the bytes each kernel moves per row against the minimum (one read of ``z`` and ``t``, one
gradient write), from ``bench.traffic``. ``--json`` prints one JSON object per kernel instead.
Run it without ``TRITON_INTERPRET=1`` (the interpreter's ``triton.jit`` functions cannot be compiled).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.traffic import passes, row_bytes
from kdkernels.torch_ops.reference import DIVERGENCES

ARCH = 90
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def ptxas_path() -> str:
    """The ptxas of the triton wheel (``TRITON_PTXAS_PATH`` if set)."""
    import triton
    from triton import knobs

    try:
        return knobs.nvidia.ptxas.path
    except (AttributeError, RuntimeError):
        return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def ptxas_usage(ptx: str, gpu_name: str = "sm_90a") -> dict[str, int]:
    """Registers and spill bytes that ``ptxas -v`` reports for one kernel's PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        out = subprocess.run([ptxas_path(), "-v", "--gpu-name", gpu_name, str(src), "-o", str(src.with_suffix(".o"))],
                             capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    found = {key: re.search(pattern, log) for key, pattern in (
        ("registers", r"Used (\d+) registers"), ("spill_stores", r"(\d+) bytes spill stores"),
        ("spill_loads", r"(\d+) bytes spill loads"), ("stack_bytes", r"(\d+) bytes stack frame"))}
    missing = [k for k, m in found.items() if m is None]
    if missing:
        raise RuntimeError(f"ptxas -v output lacks {missing}:\n{log}")
    return {k: int(m.group(1)) for k, m in found.items()}


def kernel_rows(dtypes, vocab: int) -> list[dict]:
    """One row per compiled kernel variant: every divergence, dtype, with and without the CE term."""
    from kdkernels.kernels.aot import variants

    rows = []
    for divergence in DIVERGENCES:
        for dtype in dtypes:
            for has_ce in (False, True):
                for v in variants(divergence, dtype, vocab, has_ce=has_ce, with_labels=True):
                    compiled = v.compile(ARCH)
                    rows.append(dict(divergence=divergence, dtype=dtype, has_ce=has_ce, kernel=v.name,
                                     block=v.constexprs["BLOCK_V"], warps=v.num_warps,
                                     shared_bytes=compiled.metadata.shared, **ptxas_usage(compiled.asm["ptx"])))
    return rows


def _table(rows: list[dict], columns: list[str]) -> str:
    cells = [columns] + [[str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(x.rjust(w) for x, w in zip(c, widths)) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def traffic_rows(dtypes, vocab: int) -> list[dict]:
    rows = []
    for divergence in DIVERGENCES:
        for dtype in dtypes:
            size = DTYPE_BYTES[dtype]
            p = passes(divergence, size)
            b = row_bytes(divergence, vocab, size, size)
            rows.append(dict(divergence=divergence, dtype=dtype, fwd_passes_zt=p.forward_zt,
                             fwd_passes_t_only=p.forward_t, bwd_passes=p.backward, fwd_bytes=b["forward"],
                             bwd_bytes=b["backward"], total_bytes=b["total"], min_bytes=b["minimum"],
                             over_min=f"{b['total'] / b['minimum']:.2f}x"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_report", description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPE_BYTES), default=list(DTYPE_BYTES))
    parser.add_argument("--vocab", type=int, default=128256, help="V (sets the block sizes), default 128256")
    parser.add_argument("--json", action="store_true", help="one JSON object per kernel, nothing else")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    rows = kernel_rows(args.dtypes, args.vocab)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(f"Triton kernels compiled for sm_{ARCH}a, V={args.vocab}; registers/spills from ptxas -v "
          f"({ptxas_path()})")
    print(_table(rows, ["divergence", "dtype", "has_ce", "kernel", "block", "warps", "registers", "spill_stores",
                        "spill_loads", "stack_bytes", "shared_bytes"]))
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    print(f"\n{len(rows)} kernels, {len(spilling)} with spills")
    print(f"\nBytes moved per row (V={args.vocab}, student and teacher in the same dtype), forward + backward:")
    print(_table(traffic_rows(args.dtypes, args.vocab), ["divergence", "dtype", "fwd_passes_zt", "fwd_passes_t_only",
                                                         "bwd_passes", "fwd_bytes", "bwd_bytes", "total_bytes",
                                                         "min_bytes", "over_min"]))
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main())
