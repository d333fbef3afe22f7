"""Triton helpers shared by the kdkernels kernel family: constants, loads, AKL keys and histograms."""

import triton
import triton.language as tl

from kdkernels.torch_ops import layout

# Divergence codes, compile-time switches of every kernel.
FKL = tl.constexpr(layout.DIVERGENCE_CODES["fkl"])
RKL = tl.constexpr(layout.DIVERGENCE_CODES["rkl"])
AKL = tl.constexpr(layout.DIVERGENCE_CODES["akl"])
TODI = tl.constexpr(layout.DIVERGENCE_CODES["todi"])

# Columns of the (N, NUM_STATS) float32 statistics buffer.
NUM_STATS = tl.constexpr(layout.NUM_STATS)
LSE_Z = tl.constexpr(layout.LSE_Z)
LSE_T = tl.constexpr(layout.LSE_T)
MASS_P = tl.constexpr(layout.MASS_P)
MASS_Q = tl.constexpr(layout.MASS_Q)
FKL_COL = tl.constexpr(layout.FKL)
RKL_COL = tl.constexpr(layout.RKL)
TODI_S = tl.constexpr(layout.TODI_S)
R_HEAD = tl.constexpr(layout.R_HEAD)
R_TAIL = tl.constexpr(layout.R_TAIL)
AKL_BELOW = tl.constexpr(layout.AKL_BELOW)
LSE_CE = tl.constexpr(layout.LSE_CE)
CE = tl.constexpr(layout.CE)

# Initial running max: finite, so exp(m_old - m_new) never sees (-inf) - (-inf).
NEG_BIG = tl.constexpr(-3.0e38)
RADIX = tl.constexpr(256)  # AKL radix select: 8 bits of the key per level


@triton.jit
def row_keep(labels_ptr, row, ignore_index, HAS_LABELS: tl.constexpr):
    """True unless the row's label is ``ignore_index``."""
    if HAS_LABELS:
        return tl.load(labels_ptr + row) != ignore_index
    return row >= 0


@triton.jit
def load_block(row_ptr, offs, inb):
    """Load a block of one row in its own dtype; entries past V read as -inf."""
    return tl.load(row_ptr + offs, mask=inb, other=float("-inf"))


@triton.jit
def probs(x, lse):
    """``exp(x - lse)`` with 0 where ``x`` is -inf (also when the whole row is -inf and lse is -inf)."""
    return tl.where(x == float("-inf"), 0.0, tl.exp(x - lse))


@triton.jit
def order_key(x, KEY_BITS: tl.constexpr):
    """Unsigned key of ``x``'s bits (uint32) that orders like the values; -0.0 keys as +0.0.

    ``KEY_BITS`` is 16 for bfloat16/float16 inputs and 32 for float32.
    """
    if KEY_BITS == 16:
        bits = x.to(tl.uint16, bitcast=True).to(tl.uint32)
        key = tl.where((bits >> 15) != 0, bits ^ 0xFFFF, bits ^ 0x8000)
        zero = tl.full(x.shape, 0x8000, tl.uint32)
    else:
        bits = x.to(tl.uint32, bitcast=True)
        key = tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits ^ 0x80000000)
        zero = tl.full(x.shape, 0x80000000, tl.uint32)
    return tl.where(x == 0, zero, key)


@triton.jit
def mass_histogram(digit, mass):
    """Per-bucket sum of ``mass`` over the 256 values of ``digit`` (one block)."""
    buckets = tl.arange(0, RADIX)
    hit = digit.to(tl.int32)[:, None] == buckets[None, :]
    return tl.sum(tl.where(hit, mass[:, None], 0.0), axis=0)


@triton.jit
def select_bucket(hist, below, alpha):
    """First bucket at which ``below`` plus the cumulative mass exceeds ``alpha``.

    Returns the bucket and the mass strictly below it (``below`` plus the buckets before it).
    """
    buckets = tl.arange(0, RADIX)
    cum = below + tl.cumsum(hist, axis=0)
    bucket = tl.minimum(tl.sum((cum <= alpha).to(tl.int32), axis=0), RADIX - 1)
    new_below = tl.max(tl.where(buckets < bucket, cum, below), axis=0)
    return bucket, new_below
