"""Launchers of the Triton kernel family: allocate outputs, pick block sizes, launch one program per row.

``kd_forward`` returns ``(row_loss, stats)``; ``kd_backward`` turns the gradient of the row losses into the
gradient w.r.t. the student logits. Inputs are ``(N, V)`` with unit stride over the vocabulary (rows may
be strided), in float32, bfloat16 or float16; labels are ``(N,)`` int64 or ``None``.
"""

import os

import torch
import triton

from kdkernels.kernels.backward import grad_kernel
from kdkernels.kernels.forward import akl_level_kernel, finish_kernel, stats_kernel
from kdkernels.torch_ops.layout import DIVERGENCE_CODES, NUM_STATS

STREAM_BLOCK = 4096  # entries per block in the streaming passes
HIST_BLOCK = 32  # entries per block in the passes that build AKL's 256-bucket histograms...
HIST_WARPS = 2  # ...on 2 warps: the (block x 256) one-hot compare then fits in registers without spills
# Triton's interpreter (CPU tests) has no registers to spare but pays per block: wider histogram blocks.
INTERPRETER_HIST_BLOCK = 1024


def _block(vocab: int, cap: int) -> int:
    return max(16, min(triton.next_power_of_2(vocab), cap))


def hist_block() -> int:
    """Block of the AKL histogram passes: ``HIST_BLOCK`` on GPUs, wider under the interpreter."""
    return INTERPRETER_HIST_BLOCK if os.environ.get("TRITON_INTERPRET") == "1" else HIST_BLOCK


def _warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def _key_bits(teacher: torch.Tensor) -> int:
    return 16 if teacher.element_size() == 2 else 32


def kd_forward(
    z: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    divergence: str,
    ignore_index: int,
    temperature: float,
    akl_alpha: float,
    todi_beta: float,
    kd_weight: float,
    ce_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row losses ``(N,)`` float32 and statistics ``(N, NUM_STATS)`` float32 of ``z``, ``t`` ``(N, V)``."""
    n_rows, vocab = z.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=z.device)
    stats = torch.empty((n_rows, NUM_STATS), dtype=torch.float32, device=z.device)
    if n_rows == 0:
        return loss, stats
    code = DIVERGENCE_CODES[divergence]
    is_akl = divergence == "akl"
    key = torch.empty(n_rows, dtype=torch.int64, device=z.device) if is_akl else loss
    key_bits = _key_bits(t)
    flags = dict(
        DIVERGENCE=code,
        HAS_LABELS=labels is not None,
        HAS_CE=ce_weight != 0.0,
        KEY_BITS=key_bits,
    )
    labels_arg = labels if labels is not None else loss
    inv_t = 1.0 / temperature
    first_block = _block(vocab, hist_block() if is_akl else STREAM_BLOCK)
    stats_kernel[(n_rows,)](
        z, t, labels_arg, loss, stats, key,
        vocab, z.stride(0), t.stride(0), inv_t, ignore_index, kd_weight, ce_weight, akl_alpha,
        BLOCK_V=first_block, num_warps=HIST_WARPS if is_akl else _warps(first_block), **flags,
    )
    if is_akl:
        level_block = _block(vocab, hist_block())
        for shift in range(key_bits - 16, -1, -8):
            akl_level_kernel[(n_rows,)](
                t, labels_arg, stats, key,
                vocab, t.stride(0), inv_t, ignore_index, akl_alpha,
                HAS_LABELS=labels is not None, KEY_BITS=key_bits, SHIFT=shift, BLOCK_V=level_block,
                num_warps=HIST_WARPS,
            )
    if divergence in ("akl", "todi"):
        block = _block(vocab, STREAM_BLOCK)
        finish_kernel[(n_rows,)](
            z, t, labels_arg, loss, stats, key,
            vocab, z.stride(0), t.stride(0), inv_t, ignore_index, kd_weight, ce_weight, akl_alpha, todi_beta,
            BLOCK_V=block, num_warps=_warps(block), **flags,
        )
    return loss, stats


def kd_backward(
    grad_rows: torch.Tensor,
    z: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    stats: torch.Tensor,
    divergence: str,
    ignore_index: int,
    temperature: float,
    todi_beta: float,
    kd_weight: float,
    ce_weight: float,
) -> torch.Tensor:
    """Gradient ``(N, V)`` w.r.t. ``z``, in ``z``'s dtype, from the row-loss gradient ``grad_rows`` ``(N,)``."""
    n_rows, vocab = z.shape
    dz = torch.empty((n_rows, vocab), dtype=z.dtype, device=z.device)
    if n_rows == 0:
        return dz
    grad_rows = grad_rows.to(torch.float32).contiguous()
    block = _block(vocab, STREAM_BLOCK)
    grad_kernel[(n_rows,)](
        z, t, labels if labels is not None else grad_rows, grad_rows, stats, dz,
        vocab, z.stride(0), t.stride(0), dz.stride(0), 1.0 / temperature, ignore_index,
        kd_weight, ce_weight, todi_beta,
        DIVERGENCE=DIVERGENCE_CODES[divergence], HAS_LABELS=labels is not None, HAS_CE=ce_weight != 0.0,
        BLOCK_V=block, num_warps=_warps(block),
    )
    return dz
