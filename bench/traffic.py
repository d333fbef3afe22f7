"""Memory traffic of each kdkernels kernel: passes over ``z``/``t`` and bytes per row (SPEC §6).

The least possible traffic of a forward + backward is one read of ``z``, one of ``t`` and one write of the
gradient. The kernels make more passes (``kernels/forward.py``): fkl/rkl 1 forward pass, todi 2, akl 3 for
16-bit teacher logits (5 for float32; its level passes read ``t`` only); the backward makes 1 pass that
also writes the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Passes:
    """Forward passes over both ``z`` and ``t``, extra forward passes over ``t`` alone, backward passes."""

    forward_zt: int
    forward_t: int
    backward: int = 1


def passes(divergence: str, teacher_bytes: int) -> Passes:
    """Pass counts of one divergence; ``teacher_bytes`` is 2 for bfloat16/float16 teachers, 4 for float32."""
    if divergence in ("fkl", "rkl"):
        return Passes(1, 0)
    if divergence == "todi":
        return Passes(2, 0)
    if divergence == "akl":
        return Passes(2, 1 if teacher_bytes == 2 else 3)  # stats + finish over z and t; the level passes
    raise ValueError(f"unknown divergence {divergence!r}")


def row_bytes(divergence: str, vocab: int, student_bytes: int, teacher_bytes: int) -> dict[str, int]:
    """Bytes one row moves: ``forward``, ``backward`` (reads plus the gradient write) and their ``total``,
    beside ``minimum`` (one read of ``z``, one of ``t``, one write of the gradient)."""
    p = passes(divergence, teacher_bytes)
    zt = vocab * (student_bytes + teacher_bytes)
    forward = p.forward_zt * zt + p.forward_t * vocab * teacher_bytes
    backward = p.backward * (zt + vocab * student_bytes)
    return dict(forward=forward, backward=backward, total=forward + backward, minimum=zt + vocab * student_bytes)
