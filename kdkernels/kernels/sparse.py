"""Triton kernels and launchers of the sparse (top-k) teacher losses and of ``topk_teacher`` (SPEC §7).

One program per row streams the student's vocabulary; nothing of size ``(N, V)`` is made but the gradient.

- ``sparse_stats_kernel`` (forward, one pass over ``z``): a maximum ``m`` and ``log s``, ``s = sum_j exp((z_j - m)
  / T)``, over the whole row, or for ``tail="bucket"`` over the entries outside the K ids (the rest), read from a
  per-row bitmask of the ids (``(N, ceil(V / 32))`` int32, 1/16 of a bf16 row): the rest mass is a sum over those
  entries, never ``1 - sum_K q``, and the row's log-sum-exp adds the K gathered entries afterwards
  (``torch_ops/sparse_ops.py``), so each entry costs one ``exp2``. With the CE term at ``T != 1`` also the sum at T = 1.
- ``sparse_grad_kernel`` (backward, one pass over ``z`` writing ``dz``): every entry as if outside K,
  ``g / T (G_rest exp((z_j - m_r) / T) / s_r - S q_j)`` (+ the CE term); ``sparse_ids_kernel`` then overwrites the K
  entries of the row with ``g / T (G_k - S q_k)`` (+ CE). ``G`` is the gradient of the row loss w.r.t. the category
  log-probs and ``S`` its own correction (``torch_ops/sparse_ops.py`` derives both).
- ``topk_kernel``: the running top-k of each row (order keys ``value << 32 | ~id``, so equal values keep the lower
  id first) and its log-sum-exp, in one pass over ``t``; ``k`` up to ``TOPK_KERNEL_MAX_K``.

Every launch goes through ``launch._launch`` so that ``aot.py`` and the cost model can record it. The column
numbers of the statistics (``R_*``, ``S_*``) are ``torch_ops/layout.py``'s.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdkernels.kernels.common import LOG2E, load_block, rescale, row_keep, safe_log, safe_max
from kdkernels.kernels.launch import MAX_REGISTERS, STREAM_BLOCK, STREAM_WARPS, _block, _launch
from kdkernels.torch_ops import layout
from kdkernels.torch_ops.options import KDOptions

NUM_SPARSE_STATS = tl.constexpr(layout.NUM_SPARSE_STATS)
S_MAX = tl.constexpr(layout.S_MAX)
S_LOGS = tl.constexpr(layout.S_LOGS)
S_MAX_R = tl.constexpr(layout.S_MAX_R)
S_LOGS_R = tl.constexpr(layout.S_LOGS_R)
S_LOGS_CE = tl.constexpr(layout.S_LOGS_CE)
S_G_REST = tl.constexpr(layout.S_G_REST)
S_S = tl.constexpr(layout.S_S)
NUM_STREAM_STATS = tl.constexpr(layout.NUM_STREAM_STATS)
R_MAX = tl.constexpr(layout.R_MAX)
R_LOGS = tl.constexpr(layout.R_LOGS)
R_LOGS_CE = tl.constexpr(layout.R_LOGS_CE)
MIN_KEY = tl.constexpr(-(2**63))
ID_MASK = tl.constexpr(2**32 - 1)
TOPK_KERNEL_MAX_K = 256  # larger k runs the torch path in row chunks on the same device
TOPK_MAX_BLOCK = 1024
TOPK_WARPS = 8
# Register cap of topk_kernel (it uses 80-144 at K <= 256, by version): uncapped, the ptxas of Triton 3.8 and 3.9 aims
# at 80 and spills 8-16 bytes at K = 64 and 256; at the streaming kernels' 128, Triton 3.6's spills at K = 256 (fp32).
TOPK_MAX_REGISTERS = 160
IDS_BLOCK = 1024
# Entries per block of the stats pass: 16 per thread, so the per-block maximum (a cross-warp reduction) costs
# little per entry, and the pass stays memory-bound while it reads only z (2 bytes per entry in bf16).
STATS_BLOCK = 4096


@triton.jit
def sparse_stats_kernel(
    z_ptr, bits_ptr, labels_ptr, out_ptr,
    V, stride_z, n_words, inv_t, ignore_index,
    HAS_LABELS: tl.constexpr, HAS_REST: tl.constexpr, OWN_CE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """out: (N, NUM_STREAM_STATS) float32, over the streamed entries of each row (those outside K when HAS_REST,
    else all): the maximum (0 when none is finite), ``log sum exp((z - max) / T)`` (-inf when none) and, with
    ``OWN_CE`` (the CE term at T != 1), the same sum at T = 1.

    z: (N, V) at ``stride_z``; bits: (N, n_words) int32, bit ``j % 32`` of word ``j // 32`` set for the row's K ids.
    The block is a (BLOCK_V / 32, 32) tile, so each row of the tile reads one word of the bitmask and tests one bit
    per entry. One ``exp2`` per entry (two with OWN_CE). Ignored rows read nothing.
    """
    WORDS: tl.constexpr = BLOCK_V // 32
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    bits_row = bits_ptr + row * n_words
    out_row = out_ptr + row * NUM_STREAM_STATS
    keep = row_keep(labels_ptr, row, ignore_index, HAS_LABELS)
    limit = tl.where(keep, V, 0)
    scale2 = inv_t * LOG2E
    word = tl.arange(0, WORDS)
    bit = tl.arange(0, 32)
    m = float("-inf")
    s = tl.zeros([WORDS, 32], tl.float32)
    s_c = tl.zeros([WORDS, 32], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + word[:, None] * 32 + bit[None, :]
        z = load_block(z_row, offs, offs < limit).to(tl.float32)
        if HAS_REST:
            words = tl.load(bits_row + start // 32 + word, mask=start + word * 32 < limit, other=0)
            z = tl.where(((words[:, None] >> bit[None, :]) & 1) != 0, float("-inf"), z)
        m_new = tl.maximum(m, tl.max(tl.max(z, axis=1), axis=0))
        r_old = safe_max(m)
        r = safe_max(m_new)
        s = s * rescale(r_old, r, scale2) + tl.exp2((z - r) * scale2)
        if OWN_CE:
            s_c = s_c * rescale(r_old, r, LOG2E) + tl.exp2((z - r) * LOG2E)
        m = m_new
    tl.store(out_row + R_MAX, safe_max(m))
    tl.store(out_row + R_LOGS, tl.log(tl.sum(tl.sum(s, axis=1), axis=0)))
    if OWN_CE:
        tl.store(out_row + R_LOGS_CE, tl.log(tl.sum(tl.sum(s_c, axis=1), axis=0)))
    else:
        tl.store(out_row + R_LOGS_CE, 0.0)


@triton.jit
def _row_scales(labels_ptr, grad_rows_ptr, stats_row, row, V, inv_t, ignore_index, ce_weight,
                HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr):
    """The row's ``keep``, ``g / T``, ``g S / T``, ``g G_rest / T`` (0 for ignored rows), and the CE term's scale
    (``g ce_weight``, NaN for a label outside ``[0, V)``, 0 for ignored rows) and target (-1: none)."""
    keep = row_keep(labels_ptr, row, ignore_index, HAS_LABELS)
    g = tl.load(grad_rows_ptr + row)
    scale = tl.where(keep, g * inv_t, 0.0)
    a = tl.where(keep, g * inv_t * tl.load(stats_row + S_S), 0.0)
    b = tl.where(keep, g * inv_t * tl.load(stats_row + S_G_REST), 0.0)
    scale_ce = 0.0
    target = -1
    if HAS_CE:
        label = tl.load(labels_ptr + row)
        valid = (label >= 0) & (label < V)
        target = tl.where(valid, label, -1).to(tl.int32)
        scale_ce = tl.where(keep, tl.where(valid, g * ce_weight, float("nan")), 0.0)
    return keep, scale, a, b, scale_ce, target


@triton.jit
def sparse_grad_kernel(
    z_ptr, labels_ptr, grad_rows_ptr, stats_ptr, dz_ptr,
    V, stride_z, stride_dz, inv_t, ignore_index, ce_weight,
    HAS_LABELS: tl.constexpr, HAS_REST: tl.constexpr, HAS_CE: tl.constexpr, CE_SHARES_Z: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """dz: (N, V) in the student's dtype; every entry as if outside K (``sparse_ids_kernel`` then overwrites
    the K entries); grad_rows: (N,) float32; stats: the forward's (N, NUM_SPARSE_STATS) float32."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    dz_row = dz_ptr + row * stride_dz
    stats_row = stats_ptr + row * NUM_SPARSE_STATS
    keep, _, a, b, scale_ce, target = _row_scales(labels_ptr, grad_rows_ptr, stats_row, row, V, inv_t,
                                                  ignore_index, ce_weight, HAS_LABELS, HAS_CE)
    limit = tl.where(keep, V, 0)
    scale2 = inv_t * LOG2E
    shift = tl.load(stats_row + S_MAX)
    log2_s = tl.load(stats_row + S_LOGS) * LOG2E
    if HAS_REST:
        shift_r = tl.load(stats_row + S_MAX_R)
        log_r = tl.load(stats_row + S_LOGS_R)
        log2_r = tl.where(log_r == float("-inf"), 0.0, log_r) * LOG2E
    if HAS_CE and not CE_SHARES_Z:
        log2_c = tl.load(stats_row + S_LOGS_CE) * LOG2E
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = load_block(z_row, offs, offs < limit).to(tl.float32)
        q = tl.exp2((z - shift) * scale2 - log2_s)
        grad = -a * q
        if HAS_REST:
            grad += b * tl.exp2((z - shift_r) * scale2 - log2_r)
        if HAS_CE:
            if CE_SHARES_Z:
                soft = q
            else:
                soft = tl.exp2((z - shift) * LOG2E - log2_c)
            grad += scale_ce * (soft - tl.where(offs == target, 1.0, 0.0))
        grad = tl.where(keep, grad, 0.0)
        tl.store(dz_row + offs, grad.to(dz_ptr.dtype.element_ty), mask=offs < V)


@triton.jit
def sparse_ids_kernel(
    z_ptr, ids_ptr, lp_ptr, grad_k_ptr, labels_ptr, grad_rows_ptr, stats_ptr, dz_ptr,
    V, K, stride_z, stride_dz, inv_t, ignore_index, ce_weight,
    HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr, CE_SHARES_Z: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Overwrite the row's valid K entries of dz (written by ``sparse_grad_kernel``) with
    ``g / T (G_k - S q_k)`` (+ CE); ids, lp: (N, K) int64 / float (``lp = -inf``: padding, not written);
    grad_k: (N, K) float32, ``G_k`` per unit row gradient. Ids outside ``[0, V)`` are never written (their row is
    NaN already); ignored rows keep the zeros."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    dz_row = dz_ptr + row * stride_dz
    stats_row = stats_ptr + row * NUM_SPARSE_STATS
    keep, scale, a, _, scale_ce, target = _row_scales(labels_ptr, grad_rows_ptr, stats_row, row, V, inv_t,
                                                      ignore_index, ce_weight, HAS_LABELS, HAS_CE)
    scale2 = inv_t * LOG2E
    shift = tl.load(stats_row + S_MAX)
    log2_s = tl.load(stats_row + S_LOGS) * LOG2E
    if HAS_CE and not CE_SHARES_Z:
        log2_c = tl.load(stats_row + S_LOGS_CE) * LOG2E
    for start in range(0, K, BLOCK_K):
        offs = start + tl.arange(0, BLOCK_K)
        inb = offs < K
        ids = tl.load(ids_ptr + row * K + offs, mask=inb, other=-1)
        lp = tl.load(lp_ptr + row * K + offs, mask=inb, other=float("-inf"))
        # an ignored row writes nothing: its bound is 0 (a scalar bool in the mask is refused by the 3.9 interpreter)
        write = inb & (lp != float("-inf")) & (ids >= 0) & (ids < tl.where(keep, V, 0))
        z = tl.load(z_row + ids, mask=write, other=float("-inf")).to(tl.float32)
        g_k = tl.load(grad_k_ptr + row * K + offs, mask=inb, other=0.0)
        q = tl.exp2((z - shift) * scale2 - log2_s)
        grad = scale * g_k - a * q
        if HAS_CE:
            if CE_SHARES_Z:
                soft = q
            else:
                soft = tl.exp2((z - shift) * LOG2E - log2_c)
            grad += scale_ce * (soft - tl.where(ids == target, 1.0, 0.0))
        tl.store(dz_row + ids, grad.to(dz_ptr.dtype.element_ty), mask=write)


@triton.jit
def _first(sorted_keys, N: tl.constexpr, KP: tl.constexpr):
    """The first ``KP`` of ``N`` keys (``N`` a multiple of ``KP``), as a ``(KP,)`` vector."""
    grid = tl.reshape(sorted_keys, [N // KP, KP])
    first_row = tl.arange(0, N // KP)[:, None] == 0
    return tl.max(tl.where(first_row, grid, MIN_KEY), axis=0)


@triton.jit
def topk_kernel(t_ptr, ids_ptr, lp_ptr, V, stride_t, inv_t, K, KP: tl.constexpr, BLOCK_V: tl.constexpr):
    """ids: (N, K) int64, lp: (N, K) float32, the K largest ``log_softmax(t / T)`` of each row, descending.

    Keys ``(order key of t) * 2**32 + (2**32 - 1 - j)`` (int64) are distinct and order like ``(t, -j)``; a block
    that holds a key above the current k-th is sorted and its first ``KP`` merged with the running top ``KP``.
    """
    row = tl.program_id(0).to(tl.int64)
    t_row = t_ptr + row * stride_t
    scale2 = inv_t * LOG2E
    best = tl.full([KP], MIN_KEY, tl.int64)
    kth = tl.min(best, axis=0)
    m = float("-inf")
    s = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        inb = offs < V
        x = load_block(t_row, offs, inb).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        r = safe_max(m_new)
        s = s * rescale(safe_max(m), r, scale2) + tl.exp2((x - r) * scale2)
        m = m_new
        bits = tl.where(x == 0, 0.0, x).to(tl.int32, bitcast=True)  # -0.0 keys as +0.0
        key32 = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        key = key32.to(tl.int64) * 4294967296 + (ID_MASK - offs.to(tl.int64))
        key = tl.where(inb, key, MIN_KEY)
        if tl.max(key, axis=0) > kth:
            top = _first(tl.sort(key, descending=True), BLOCK_V, KP)
            both = tl.reshape(tl.join(best, top), [2 * KP])
            best = _first(tl.sort(both, descending=True), 2 * KP, KP)
            kth = tl.min(best, axis=0)
    j = tl.arange(0, KP)
    ids = ID_MASK - (best & ID_MASK)
    out = j < K
    x = tl.load(t_row + ids, mask=out, other=0.0).to(tl.float32)
    lp = (x - safe_max(m)) * inv_t - safe_log(tl.sum(s, axis=0))
    tl.store(ids_ptr + row * K + j, ids, mask=out)
    tl.store(lp_ptr + row * K + j, lp, mask=out)


def id_bitmask(ids: torch.Tensor, use: torch.Tensor, vocab: int) -> torch.Tensor:
    """``(N, ceil(V / 32))`` int32 with bit ``j % 32`` of word ``j // 32`` set for each id ``j`` where ``use``.

    ``ids`` ``(N, K)`` int64 must be in ``[0, V)`` where ``use`` (0 elsewhere). Distinct bits of a word add up to
    their OR (int32 wraps at bit 31), so a deterministic ``scatter_add`` builds it; repeated ids, which make a row
    invalid (NaN) anyway, would not.
    """
    bits = torch.ones_like(ids, dtype=torch.int32) << (ids & 31).to(torch.int32)
    words = torch.zeros((ids.shape[0], triton.cdiv(vocab, 32)), dtype=torch.int32, device=ids.device)
    return words.scatter_add_(1, ids >> 5, torch.where(use, bits, 0))


def sparse_stats(z: torch.Tensor, ids: torch.Tensor, use: torch.Tensor, labels: torch.Tensor | None,
                 opts: KDOptions, rest: bool) -> torch.Tensor:
    """``(N, NUM_STREAM_STATS)`` float32 statistics of ``z`` ``(N, V)`` over the entries outside the ids ``(N, K)``
    where ``use`` (``rest``), or over all entries; see ``sparse_stats_kernel``."""
    n_rows, vocab = z.shape
    out = torch.empty((n_rows, layout.NUM_STREAM_STATS), dtype=torch.float32, device=z.device)
    if n_rows == 0:
        return out
    bits = id_bitmask(ids, use, vocab) if rest else out
    _launch(sparse_stats_kernel, (n_rows,),
            z, bits, labels if labels is not None else out, out,
            vocab, z.stride(0), bits.shape[1] if rest else 0, 1.0 / opts.temperature, opts.ignore_index,
            HAS_LABELS=labels is not None, HAS_REST=rest,
            OWN_CE=opts.ce_weight != 0.0 and opts.temperature != 1.0, BLOCK_V=max(32, _block(vocab, STATS_BLOCK)),
            num_warps=STREAM_WARPS, maxnreg=MAX_REGISTERS)
    return out


def sparse_backward(grad_rows: torch.Tensor, z: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor,
                    labels: torch.Tensor | None, stats: torch.Tensor, grad_k: torch.Tensor, opts: KDOptions,
                    rest: bool) -> torch.Tensor:
    """Gradient ``(N, V)`` w.r.t. ``z`` in ``z``'s dtype: one streaming pass, then the K entries of each row."""
    n_rows, vocab = z.shape
    dz = torch.empty((n_rows, vocab), dtype=z.dtype, device=z.device)
    if n_rows == 0:
        return dz
    grad_rows = grad_rows.to(torch.float32).contiguous()
    labels_arg = labels if labels is not None else grad_rows
    common = dict(HAS_LABELS=labels is not None, HAS_CE=opts.ce_weight != 0.0, CE_SHARES_Z=opts.temperature == 1.0)
    inv_t = 1.0 / opts.temperature
    _launch(sparse_grad_kernel, (n_rows,),
            z, labels_arg, grad_rows, stats, dz,
            vocab, z.stride(0), dz.stride(0), inv_t, opts.ignore_index, opts.ce_weight,
            HAS_REST=rest, BLOCK_V=_block(vocab, STREAM_BLOCK), num_warps=STREAM_WARPS, maxnreg=MAX_REGISTERS,
            **common)
    k = ids.shape[1]
    _launch(sparse_ids_kernel, (n_rows,),
            z, ids, lp, grad_k, labels_arg, grad_rows, stats, dz,
            vocab, k, z.stride(0), dz.stride(0), inv_t, opts.ignore_index, opts.ce_weight,
            BLOCK_K=_block(k, IDS_BLOCK), num_warps=4, **common)
    return dz


def topk(t: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (N, k) int64, lp (N, k) float32)`` of ``t`` ``(N, V)`` for ``k <= TOPK_KERNEL_MAX_K``."""
    n_rows, vocab = t.shape
    ids = torch.empty((n_rows, k), dtype=torch.int64, device=t.device)
    lp = torch.empty((n_rows, k), dtype=torch.float32, device=t.device)
    if n_rows == 0:
        return ids, lp
    kp = max(16, triton.next_power_of_2(k))
    block = max(kp, _block(vocab, TOPK_MAX_BLOCK))
    _launch(topk_kernel, (n_rows,), t, ids, lp, vocab, t.stride(0), 1.0 / temperature, k, KP=kp, BLOCK_V=block,
            num_warps=TOPK_WARPS, maxnreg=TOPK_MAX_REGISTERS)
    return ids, lp
