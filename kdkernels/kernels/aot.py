"""Ahead-of-time compilation of every kernel variant for a GPU architecture, with no GPU present.

``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` runs the real GPU compiler (through ``ptxas``),
so code that Triton's interpreter tolerates but the compiler rejects fails here. Used by the tests and by
``python -m bench.compile_report``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import triton
from triton.backends.compiler import GPUTarget

from kdkernels.kernels import launch
from kdkernels.kernels.backward import grad_kernel
from kdkernels.kernels.forward import akl_level_kernel, finish_kernel, stats_kernel
from kdkernels.torch_ops.layout import DIVERGENCE_CODES

TRITON_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
KEY_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}


@dataclass
class Variant:
    """One compiled specialisation: a kernel, its pointer types and its constexprs."""

    name: str
    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    meta: dict[str, object] = field(default_factory=dict)

    def compile(self, arch: int):
        source = triton.compiler.ASTSource(fn=self.kernel, signature=self.signature, constexprs=self.constexprs)
        return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": self.num_warps})


def _signature(kernel, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict[str, object]):
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def variants(
    divergence: str,
    dtype: str = "bfloat16",
    vocab: int = 128256,
    has_ce: bool = False,
    with_labels: bool = True,
) -> list[Variant]:
    """Every kernel launched for one divergence and input dtype (student and teacher alike)."""
    elem = TRITON_DTYPES[dtype]
    key_bits = KEY_BITS[dtype]
    code = DIVERGENCE_CODES[divergence]
    labels = "*i64" if with_labels else "*fp32"
    flags = dict(DIVERGENCE=code, HAS_LABELS=with_labels, HAS_CE=has_ce, KEY_BITS=key_bits)
    forward_ptrs = {"z_ptr": f"*{elem}", "t_ptr": f"*{elem}", "labels_ptr": labels, "loss_ptr": "*fp32",
                    "stats_ptr": "*fp32", "key_ptr": "*i64" if divergence == "akl" else "*fp32"}
    floats = ("inv_t", "kd_weight", "ce_weight", "akl_alpha", "todi_beta")
    out = []
    first = launch._block(vocab, launch.HIST_BLOCK if divergence == "akl" else launch.STREAM_BLOCK)
    ce = dict(flags, BLOCK_V=first)
    out.append(Variant("stats", stats_kernel, _signature(stats_kernel, forward_ptrs, floats, ce), ce,
                       launch.HIST_WARPS if divergence == "akl" else launch._warps(first)))
    if divergence == "akl":
        for shift in range(key_bits - 16, -1, -8):
            level = dict(HAS_LABELS=with_labels, KEY_BITS=key_bits, SHIFT=shift,
                         BLOCK_V=launch._block(vocab, launch.HIST_BLOCK))
            ptrs = {"t_ptr": f"*{elem}", "labels_ptr": labels, "stats_ptr": "*fp32", "key_ptr": "*i64"}
            out.append(Variant(f"akl_level_shift{shift}", akl_level_kernel,
                               _signature(akl_level_kernel, ptrs, floats, level), level, launch.HIST_WARPS))
    block = launch._block(vocab, launch.STREAM_BLOCK)
    if divergence in ("akl", "todi"):
        fin = dict(flags, BLOCK_V=block)
        out.append(Variant("finish", finish_kernel, _signature(finish_kernel, forward_ptrs, floats, fin), fin,
                           launch._warps(block)))
    grad = dict(DIVERGENCE=code, HAS_LABELS=with_labels, HAS_CE=has_ce, BLOCK_V=block)
    grad_ptrs = {"z_ptr": f"*{elem}", "t_ptr": f"*{elem}", "labels_ptr": labels, "grad_rows_ptr": "*fp32",
                 "stats_ptr": "*fp32", "dz_ptr": f"*{elem}"}
    out.append(Variant("grad", grad_kernel, _signature(grad_kernel, grad_ptrs, floats, grad), grad,
                       launch._warps(block)))
    for v in out:
        v.meta = dict(divergence=divergence, dtype=dtype, vocab=vocab, has_ce=has_ce)
    return out


def compile_all(archs: tuple[int, ...] = (80, 90), cases=None) -> list[dict]:
    """Compile the variants of ``cases`` (``(divergence, dtype, has_ce)`` triples, default: every one) per arch.

    Must run in a process without ``TRITON_INTERPRET=1``: under the interpreter, ``triton.jit`` gives
    functions that cannot be compiled (tests call ``python -m kdkernels.kernels.aot`` in a subprocess).
    """
    if cases is None:
        cases = [(d, dtype, ce) for d in DIVERGENCE_CODES for dtype in TRITON_DTYPES for ce in (False, True)]
    results = []
    for divergence, dtype, has_ce in cases:
        for variant in variants(divergence, dtype, has_ce=has_ce):
            for arch in archs:
                compiled = variant.compile(arch)
                results.append(dict(variant.meta, kernel=variant.name, arch=arch,
                                    cubin_bytes=len(compiled.asm.get("cubin", b"")),
                                    shared=compiled.metadata.shared, ptx=compiled.asm["ptx"]))
    return results


def main() -> None:
    """``python -m kdkernels.kernels.aot [ARCH ...]``: compile every variant, print one JSON line each."""
    import json
    import sys

    archs = tuple(int(a) for a in sys.argv[1:]) or (80, 90)
    for row in compile_all(archs):
        row.pop("ptx")
        print(json.dumps(row))


if __name__ == "__main__":
    main()
