"""Launchers of the Triton kernel family: allocate outputs, pick block sizes, launch one program per row.

``kd_forward`` returns ``(row_loss, stats)``; ``kd_backward`` turns the gradient of the row losses into the
gradient w.r.t. the student logits. Inputs are ``(N, V)`` with unit stride over the vocabulary (rows may
be strided), in float32, bfloat16 or float16; labels are ``(N,)`` int64 or ``None``.

Every launch goes through :func:`_launch`, which :func:`recording` can divert into a list: that is how
``aot.py`` compiles exactly the variants these functions launch (same arguments, constexprs, warps and options).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton

from kdkernels.kernels.akl import akl_rank_kernel, akl_refine_kernel, akl_resolve_kernel
from kdkernels.kernels.backward import grad_kernel
from kdkernels.kernels.common import AKL_COLS
from kdkernels.kernels.forward import finish_kernel, stats_kernel
from kdkernels.torch_ops.layout import DIVERGENCE_CODES, NUM_STATS, Q_G, TODI_S
from kdkernels.torch_ops.options import KDOptions

STREAM_BLOCK = 2048  # entries per block of the streaming passes
# Entries per block of AKL's first pass (4 threshold sums per lane) and finish pass (7 sums): 2048 would need more
# than 128 registers
SMALL_BLOCK = 1024
SMALL_BLOCKS = {"stats_kernel": ("akl",), "finish_kernel": ("akl",), "grad_kernel": ()}
# The streaming loops (``common.whole_blocks``): Triton's pipeliner keeps STAGES - 1 blocks in flight as asynchronous
# copies to shared memory, and an iteration handles UNROLL blocks (fewer loop and barrier instructions an entry), or
# FEWER for the passes whose state or per-entry work leaves no room for more in 128 registers: with 2 resident
# blocks of 8 warps, 2 x 3 x 8 KB of bf16 z and t are in flight per SM, above the 22 KB an H200 needs at 600 ns
# (SPEC §6), with no register held for them.
STAGES = 4
UNROLL = {"finish_kernel": 2, "grad_kernel": 2, "akl_refine_kernel": 2}
FEWER = {**{("finish_kernel", d): 1 for d in ("akl", "todi", "sfkl", "srkl", "jsd")},
         **{("grad_kernel", d): 1 for d in ("todi", "sfkl", "srkl", "jsd")}}
# The stats pass (:func:`stats_tile`) takes tiles of STATS_LANES lanes of a few consecutive entries each, the lanes'
# maxima raised once a tile (``common.lane_batch``), STATS_UNROLL tiles an iteration.
STATS_LANES = 256
STATS_UNROLL = 4
STREAM_WARPS = 8
# Register cap of the streaming kernels: 2 resident blocks of 8 warps per SM; without one ptxas aims some variants
# at 3-4 blocks per SM with 64-80 registers and spills a few bytes.
MAX_REGISTERS = 128
HINT_BINS = 4  # AKL: thresholds of the stats pass's bracket, ...
HINT_NATS = 1.0  # ... HINT_NATS apart in t / T
REFINE_WAYS = 8  # AKL refinement: splits per round, half of them evenly in key (4 parts: 2 bits a round)
REFINE_BLOCK = 1024
CAPACITY = 1024  # AKL: most bracket entries ordered by akl_resolve_kernel...
# ...64 under Triton's interpreter (CPU tests), where a 1024-entry sort costs about a second per row; the
# smaller list sends more test rows through the refinement passes.
INTERPRETER_CAPACITY = 64
RESOLVE_WARPS = 8
# Every launch chooses FP fusion (``a * b + c`` as one FMA) explicitly, as :func:`_launch` passes it: on, as Triton
# 3.6-3.9 default to and as the cost model and the zero-spill tests compile; Triton 3.10 turns the default off.
FP_FUSION = True


@dataclass
class Launch:
    """One kernel launch: the kernel, its grid, its positional arguments and its keyword (meta) arguments."""

    kernel: object
    grid: tuple[int, ...]
    args: tuple
    meta: dict


_records: list[Launch] | None = None


@contextlib.contextmanager
def recording():
    """Collect the launches of the calls inside instead of running them (a list of :class:`Launch`)."""
    global _records
    previous, _records = _records, []
    try:
        yield _records
    finally:
        _records = previous


def _launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    meta = dict(meta, enable_fp_fusion=FP_FUSION)
    if _records is not None:
        _records.append(Launch(kernel, grid, args, meta))
    else:
        kernel[grid](*args, **meta)


def _block(vocab: int, cap: int) -> int:
    return max(16, min(triton.next_power_of_2(vocab), cap))


def capacity() -> int:
    """AKL's list size: ``CAPACITY`` on GPUs, ``INTERPRETER_CAPACITY`` under Triton's interpreter."""
    return INTERPRETER_CAPACITY if os.environ.get("TRITON_INTERPRET") == "1" else CAPACITY


def _key_bits(teacher: torch.Tensor) -> int:
    return 16 if teacher.element_size() == 2 else 32


def pass_block(kernel: str, divergence: str, vocab: int, own_ce: bool = False) -> int:
    """Entries per block of a streaming pass: ``SMALL_BLOCK`` for the passes of ``SMALL_BLOCKS``, else
    ``STREAM_BLOCK``, halved for a stats pass that also sums the CE term's own log-sum (``own_ce``: T != 1; more
    state a lane), and at most the vocabulary rounded up to a power of 2."""
    small = divergence in SMALL_BLOCKS[kernel]
    return _block(vocab, SMALL_BLOCK if small else STREAM_BLOCK // 2 if own_ce else STREAM_BLOCK)


def refine_rounds(key_bits: int) -> int:
    """Most AKL refinement rounds: each keeps at most ``1 / (REFINE_WAYS / 2)`` of the key range (``akl.py``), so
    ``ceil(key_bits / log2(REFINE_WAYS / 2))`` rounds reach one key: 8 for 16-bit teachers, 16 for float32."""
    bits_per_round = (REFINE_WAYS // 2).bit_length() - 1
    return -(-key_bits // bits_per_round)


def _aligned(vocab: int, *tensors: torch.Tensor) -> bool:
    """Rows that start on 16-element boundaries and span a multiple of 16 entries: vectorised loads."""
    return vocab % 16 == 0 and all(t.stride(0) % 16 == 0 for t in tensors)


def unroll(kernel: str, divergence: str, vocab: int, *tensors: torch.Tensor) -> int:
    """Blocks one iteration of a pass's pipelined loop handles (``loop_unroll_factor``) for aligned rows
    (:func:`_aligned`) of 16-bit ``z`` and ``t`` (AKL's refinement: ``t``): ``FEWER`` or ``UNROLL``; else 1: the
    other variants spill with more in 128 registers."""
    if not _aligned(vocab, *tensors) or any(t.element_size() != 2 for t in tensors):
        return 1
    return FEWER.get((kernel, divergence), UNROLL[kernel])


def stats_tile(divergence: str, vocab: int, z: torch.Tensor, t: torch.Tensor,
               own_ce: bool = False) -> tuple[int, int, int]:
    """``(BATCH, BLOCK_V, UNROLL)`` of ``stats_kernel``: for aligned rows (:func:`_aligned`), ``BATCH`` consecutive
    entries a lane, as many as one 16-byte load of the wider dtype holds (8 for 16-bit rows, 4 for float32: the
    reshape to ``(BLOCK_V, BATCH)`` then keeps a lane's entries in its thread), ``STATS_LANES`` lanes and
    ``STATS_UNROLL`` tiles an iteration. Vocabularies under ``STREAM_WARPS x 32`` lanes of ``BATCH``, and rows not
    16-aligned, take 1 entry a lane in :func:`pass_block`'s blocks, one an iteration."""
    batch = 16 // max(z.element_size(), t.element_size())
    lanes = _block(-(-vocab // batch), STATS_LANES)
    if not _aligned(vocab, z, t) or lanes < STREAM_WARPS * 32:
        return 1, pass_block("stats_kernel", divergence, vocab, own_ce=own_ce), 1
    return batch, lanes, STATS_UNROLL


def _ce_square(opts: KDOptions) -> bool:
    """The CE term at T = 2: its weights are the squares of the student's (``CE_SQUARE``)."""
    return opts.ce_weight != 0.0 and opts.temperature == 2.0


def mixture_weights(opts: KDOptions) -> tuple[float, float]:
    """``(w, 1 - w)``: the mixture weights ``(w_x, w_y)`` of sfkl/srkl (``w = skew_lambda``) and jsd
    (``w = jsd_beta``) for ``finish_kernel`` and ``grad_kernel``; zeros for the other divergences, which ignore them.
    ``1 - w`` is formed here in float64: in the kernel, from a float32 ``w`` near 1, it would keep few digits."""
    if opts.divergence not in ("sfkl", "srkl", "jsd"):
        return 0.0, 0.0
    w = opts.jsd_beta if opts.divergence == "jsd" else opts.skew_lambda
    return w, 1.0 - w


def _stats_pass(z, t, labels, loss, stats, akl, opts: KDOptions, divergence: str) -> None:
    """Launch ``stats_kernel`` (compiled for ``divergence``) on ``z``, ``t`` ``(N, V)``."""
    temperature, has_ce = opts.temperature, opts.ce_weight != 0.0
    vocab = z.shape[1]
    own_ce = has_ce and temperature != 1.0
    batch, block, tiles = stats_tile(divergence, vocab, z, t, own_ce=own_ce)
    _launch(stats_kernel, (z.shape[0],),
            z, t, loss if labels is None else labels, loss, stats, akl,
            vocab, z.stride(0), t.stride(0), 1.0 / temperature, opts.ignore_index, opts.kd_weight, opts.ce_weight,
            opts.akl_alpha, HINT_NATS * temperature,
            DIVERGENCE=DIVERGENCE_CODES[divergence], HAS_LABELS=labels is not None, HAS_CE=has_ce,
            CE_SHARES_Z=temperature == 1.0, CE_SQUARE=_ce_square(opts), KEY_BITS=_key_bits(t),
            HINT_BINS=HINT_BINS,
            BLOCK_V=block, BATCH=batch, STAGES=STAGES, UNROLL=tiles,
            num_warps=STREAM_WARPS, maxnreg=MAX_REGISTERS)


def _finish_pass(z, t, labels, loss, stats, akl, listed, opts: KDOptions) -> None:
    """Launch ``finish_kernel`` on ``z``, ``t`` ``(N, V)`` with the rows' final maxima and log-sums in ``stats``."""
    divergence, vocab = opts.divergence, z.shape[1]
    block = pass_block("finish_kernel", divergence, vocab)
    _launch(finish_kernel, (z.shape[0],),
            z, t, loss if labels is None else labels, loss, stats, akl, listed,
            vocab, z.stride(0), t.stride(0), 1.0 / opts.temperature, opts.ignore_index, opts.kd_weight,
            opts.ce_weight, opts.akl_alpha, opts.todi_beta, *mixture_weights(opts),
            DIVERGENCE=DIVERGENCE_CODES[divergence], HAS_LABELS=labels is not None, HAS_CE=opts.ce_weight != 0.0,
            KEY_BITS=_key_bits(t), CAPACITY=capacity(), BLOCK_V=block,
            STAGES=STAGES, UNROLL=unroll("finish_kernel", divergence, vocab, z, t),
            num_warps=STREAM_WARPS, maxnreg=MAX_REGISTERS)


def kd_forward(z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
               opts: KDOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Row losses ``(N,)`` float32 and statistics ``(N, NUM_STATS)`` float32 of ``z``, ``t`` ``(N, V)``."""
    divergence, ignore_index, akl_alpha = opts.divergence, opts.ignore_index, opts.akl_alpha
    inv_t = 1.0 / opts.temperature
    n_rows, vocab = z.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=z.device)
    stats = torch.empty((n_rows, NUM_STATS), dtype=torch.float32, device=z.device)
    if n_rows == 0:
        return loss, stats
    is_akl = divergence == "akl"
    akl = torch.empty((n_rows, AKL_COLS.value), dtype=torch.float32, device=z.device) if is_akl else stats
    list_size = capacity()
    listed = torch.empty((n_rows, list_size), dtype=torch.int32, device=z.device) if is_akl else stats
    labels_arg = labels if labels is not None else loss
    has_labels = labels is not None
    block = _block(vocab, STREAM_BLOCK)
    refine_block = _block(vocab, REFINE_BLOCK)
    grid = (n_rows,)
    _stats_pass(z, t, labels, loss, stats, akl, opts, divergence)
    if is_akl:
        _launch(akl_refine_kernel, grid,
                t, labels_arg, stats, akl,
                vocab, t.stride(0), inv_t, ignore_index, akl_alpha,
                HAS_LABELS=has_labels, KEY_BITS=_key_bits(t), WAYS=REFINE_WAYS, CAPACITY=list_size,
                MAX_ROUNDS=refine_rounds(_key_bits(t)), BLOCK_V=refine_block,
                STAGES=STAGES, UNROLL=unroll("akl_refine_kernel", divergence, vocab, t),
                num_warps=STREAM_WARPS, maxnreg=MAX_REGISTERS)
        _launch(akl_rank_kernel, grid,
                t, labels_arg, stats, akl,
                vocab, t.stride(0), inv_t, ignore_index, akl_alpha,
                HAS_LABELS=has_labels, KEY_BITS=_key_bits(t), CAPACITY=list_size, BLOCK_V=block,
                num_warps=STREAM_WARPS, maxnreg=MAX_REGISTERS)
    if divergence not in ("fkl", "rkl"):
        _finish_pass(z, t, labels, loss, stats, akl, listed, opts)
    if is_akl:
        _launch(akl_resolve_kernel, grid,
                z, t, labels_arg, loss, stats, akl, listed,
                z.stride(0), t.stride(0), inv_t, ignore_index, opts.kd_weight, opts.ce_weight, akl_alpha,
                HAS_LABELS=has_labels, HAS_CE=opts.ce_weight != 0.0, KEY_BITS=_key_bits(t), CAPACITY=list_size,
                num_warps=RESOLVE_WARPS, maxnreg=MAX_REGISTERS)
    return loss, stats


# Vocabulary slices (``torch_ops/vocab_parallel.py``): each pass on the slice alone; the caller combines the rows'
# statistics over the ranks between them. The first pass of a divergence other than fkl and rkl keeps only maxima
# and sums, as tvd's stats pass does (AKL's bracket search is not run on a slice).
SHARD_STATS_DIVERGENCE = {"fkl": "fkl", "rkl": "rkl"}


def shard_stats(z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, opts: KDOptions) -> torch.Tensor:
    """``(N, NUM_STATS)`` float32: the slice's own ``MAX_*``, ``LOGS_*``, ``FOUND_*`` of ``z``, ``t`` ``(N, V_r)``,
    fkl's ``MASS_P``, ``FKL``, rkl's ``MASS_Q``, ``RKL`` and, with a hard-label term, ``LOGS_CE`` (as
    ``torch_backend.shard_stats``; the ``CE`` column is not meaningful for a slice)."""
    loss = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    stats = torch.full((z.shape[0], NUM_STATS), float("nan"), dtype=torch.float32, device=z.device)
    if z.shape[0]:
        _stats_pass(z, t, labels, loss, stats, stats, opts, SHARD_STATS_DIVERGENCE.get(opts.divergence, "tvd"))
    return stats


def shard_finish(z: torch.Tensor, t: torch.Tensor, stats: torch.Tensor, opts: KDOptions) -> torch.Tensor:
    """``(N, 2)`` float32: the slice's part of ToDi's or a baseline's ``(loss, S)`` (``S``: ``TODI_S`` or ``Q_G``)
    from the rows' global maxima and log-sums in ``stats`` (not modified), as ``torch_backend.shard_finish``."""
    scratch = stats.to(torch.float32, copy=True)
    loss = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    if z.shape[0]:
        _finish_pass(z, t, None, loss, scratch, scratch, scratch, opts._replace(kd_weight=1.0, ce_weight=0.0))
    col = TODI_S if opts.divergence == "todi" else Q_G
    return torch.stack([loss, scratch[:, col]], 1)


def kd_backward(grad_rows: torch.Tensor, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
                stats: torch.Tensor, opts: KDOptions) -> torch.Tensor:
    """Gradient ``(N, V)`` w.r.t. ``z``, in ``z``'s dtype, from the row-loss gradient ``grad_rows`` ``(N,)``."""
    divergence, ignore_index, temperature = opts.divergence, opts.ignore_index, opts.temperature
    todi_beta, kd_weight, ce_weight = opts.todi_beta, opts.kd_weight, opts.ce_weight
    n_rows, vocab = z.shape
    dz = torch.empty((n_rows, vocab), dtype=z.dtype, device=z.device)
    if n_rows == 0:
        return dz
    block = pass_block("grad_kernel", divergence, vocab)
    grad_rows = grad_rows.to(torch.float32).contiguous()
    _launch(grad_kernel, (n_rows,),
            z, t, labels if labels is not None else grad_rows, grad_rows, stats, dz,
            vocab, z.stride(0), t.stride(0), dz.stride(0), 1.0 / temperature, ignore_index,
            kd_weight, ce_weight, todi_beta, *mixture_weights(opts),
            DIVERGENCE=DIVERGENCE_CODES[divergence], HAS_LABELS=labels is not None, HAS_CE=ce_weight != 0.0,
            CE_SHARES_Z=temperature == 1.0, CE_SQUARE=_ce_square(opts), BLOCK_V=block,
            STAGES=STAGES, UNROLL=unroll("grad_kernel", divergence, vocab, z, t),
            num_warps=STREAM_WARPS, maxnreg=MAX_REGISTERS)
    return dz
