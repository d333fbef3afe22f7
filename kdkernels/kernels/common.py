"""Triton helpers shared by the kdkernels kernel family: constants, loads, mixtures, order keys, AKL scratch columns."""

import os

import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from kdkernels.torch_ops import layout

# Divergence codes, compile-time switches of every kernel.
FKL = tl.constexpr(layout.DIVERGENCE_CODES["fkl"])
RKL = tl.constexpr(layout.DIVERGENCE_CODES["rkl"])
AKL = tl.constexpr(layout.DIVERGENCE_CODES["akl"])
TODI = tl.constexpr(layout.DIVERGENCE_CODES["todi"])
SFKL = tl.constexpr(layout.DIVERGENCE_CODES["sfkl"])
SRKL = tl.constexpr(layout.DIVERGENCE_CODES["srkl"])
JSD = tl.constexpr(layout.DIVERGENCE_CODES["jsd"])
TVD = tl.constexpr(layout.DIVERGENCE_CODES["tvd"])

# Columns of the (N, NUM_STATS) float32 statistics buffer.
NUM_STATS = tl.constexpr(layout.NUM_STATS)
MAX_Z = tl.constexpr(layout.MAX_Z)
LOGS_Z = tl.constexpr(layout.LOGS_Z)
MAX_T = tl.constexpr(layout.MAX_T)
LOGS_T = tl.constexpr(layout.LOGS_T)
MAX_CE = tl.constexpr(layout.MAX_CE)
LOGS_CE = tl.constexpr(layout.LOGS_CE)
MASS_P = tl.constexpr(layout.MASS_P)
MASS_Q = tl.constexpr(layout.MASS_Q)
FKL_COL = tl.constexpr(layout.FKL)
RKL_COL = tl.constexpr(layout.RKL)
TODI_S = tl.constexpr(layout.TODI_S)
R_HEAD = tl.constexpr(layout.R_HEAD)
R_TAIL = tl.constexpr(layout.R_TAIL)
CE = tl.constexpr(layout.CE)
Q_G = tl.constexpr(layout.Q_G)
FOUND_Z = tl.constexpr(layout.FOUND_Z)
FOUND_T = tl.constexpr(layout.FOUND_T)

# Columns of AKL's (N, AKL_COLS) float32 scratch (see akl.py for the cut search that fills them).
AKL_COLS = tl.constexpr(10)
AKL_LO = tl.constexpr(0)  # the cut's bracket: order keys [LO, HI) of teacher logits (uint32 bits, see store_key)
AKL_HI = tl.constexpr(1)
AKL_COUNT = tl.constexpr(2)  # entries in the bracket
AKL_BELOW = tl.constexpr(3)  # teacher mass below LO, from the last refinement round (the rank rule uses it)
AKL_MASS_BELOW = tl.constexpr(4)  # teacher mass below LO, summed by the finish pass
AKL_G_TAIL = tl.constexpr(5)  # sums of |p - q| over the entries settled as tail / head by the finish pass
AKL_G_HEAD = tl.constexpr(6)
AKL_ROUNDS = tl.constexpr(7)  # refinement rounds the row needed (read by the cost model)
AKL_CUT_INDEX = tl.constexpr(8)  # one-key brackets: index of the last tail entry among them (-1: none)
AKL_LISTED = tl.constexpr(9)  # entries listed so far by the finish pass (its atomic counter)

# Compiled kernels take log2 from the MUFU unit; Triton's interpreter (CPU tests) has no libdevice and uses tl.log2.
# The interpreter must be chosen before triton is imported, so this is fixed at import.
MUFU_LOG2 = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Where per-lane running maxima start: -finfo(float32).max, finite, so that no difference of a maximum and an entry
# is inf - inf; an entry of -inf never raises it, an entry of finfo.min equals it.
FLOOR = tl.constexpr(-3.4028234663852886e38)
MIN_NORMAL = tl.constexpr(1.1754943508222875e-38)  # the smallest normal float32


@triton.jit
def row_keep(labels_ptr, row, ignore_index, HAS_LABELS: tl.constexpr):
    """True unless the row's label is ``ignore_index``."""
    if HAS_LABELS:
        return tl.load(labels_ptr + row) != ignore_index
    return row >= 0


@triton.jit
def store_row_loss(loss_ptr, row, keep, div, stats_row, kd_weight, ce_weight, HAS_CE: tl.constexpr):
    """Row loss ``kd_weight * div + ce_weight * CE``, 0 for ignored rows."""
    value = kd_weight * div
    if HAS_CE:
        value += ce_weight * tl.load(stats_row + CE)
    tl.store(loss_ptr + row, tl.where(keep, value, 0.0))


@triton.jit
def only(mask, x):
    """``x`` where ``mask``, else 0, for a finite ``x``: ``x`` times the mask as 0.0 / 1.0, which a sum takes as one
    fused multiply-add after a single ``FSET`` (a select costs a ``FSEL`` and an ``FADD``). A NaN ``x`` stays NaN."""
    return x * mask.to(tl.float32)


@triton.jit
def load_block(row_ptr, offs, inb):
    """Load a block of one row in its own dtype; entries past the read limit read as -inf."""
    return tl.load(row_ptr + offs, mask=inb, other=float("-inf"))


@triton.jit
def lane_batch(m, s, x, scale2):
    """Add ``R`` entries per lane (``x``: ``(L, R)``) to running per-lane maxima ``m`` and sums
    ``s = sum 2^((x_j - m) k)`` (``(L,)``, ``k = scale2``). Returns ``m' = max(m, max_r x)``,
    ``s' = s 2^shift + sum_r 2^c``, ``shift = (m - m') k`` (<= 0; clamped at ``FLOOR``, as when a lane's first
    finite entry follows its start or a ``finfo.min``) and the entries' centred log2 weights ``c = (x - m') k``
    with ``2^c``: one ``exp2`` an entry plus one a lane and ``R`` entries, and no block-wide reduction (the lanes are
    combined once per row, :func:`lane_total`). A -inf entry adds 0; a NaN or +inf entry makes ``s`` NaN
    (``c`` is NaN), so does :func:`lane_total`."""
    hi = tl.maximum(m, tl.max(x, axis=1))
    shift = tl.maximum((m - hi) * scale2, FLOOR)
    c = (x - hi[:, None]) * scale2
    e = tl.exp2(c)
    return hi, s * tl.exp2(shift) + tl.sum(e, axis=1), shift, c, e


@triton.jit
def lane_total(m, s, scale2):
    """Combine per-lane running maxima and sums (:func:`lane_batch`) into the row's: ``(M, S)`` with
    ``M = max m`` (``FLOOR`` for a row without a finite entry) and ``S = sum_lanes s 2^((m - M) k)``."""
    row_max = tl.max(m, axis=0)
    return row_max, tl.sum(s * tl.exp2((m - row_max) * scale2), axis=0)


@triton.jit
def stored_max(row_max, total):
    """The row maximum as stored in ``stats``: 0 for a row with nothing to sum (no finite entry, or ignored)."""
    return tl.where(total == 0, 0.0, row_max)


@triton.jit
def whole_blocks(limit, BLOCK_V: tl.constexpr):
    """Where a row's whole blocks end: ``limit`` rounded down to a multiple of ``BLOCK_V``.

    Every streaming loop reads ``[0, whole_blocks)`` block by block without a mask, in a ``tl.range`` with
    ``num_stages=STAGES``: Triton's pipeliner turns those loads into asynchronous copies to shared memory issued
    ``STAGES - 1`` blocks ahead (``cp.async``, no registers held while they are in flight), so the memory stays busy
    while a block is used (SPEC §6). The partial block ``[whole_blocks, limit)`` (and past it, -inf) is read once
    after the loop with :func:`load_block`'s mask."""
    return limit - limit % BLOCK_V


@triton.jit
def safe_max(m):
    """A row maximum usable as an exponent shift: ``m``, or 0 while the row has no finite entry."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def rescale(old_max, new_max, scale2):
    """``exp2((old - new) * scale2)``: the factor that moves sums from one (safe) maximum to a larger one. The
    exponent is clamped at 0: while a row has no finite entry its sums are 0 and its safe maximum (0) may lie
    above the first finite one."""
    return tl.exp2(tl.minimum((old_max - new_max) * scale2, 0.0))


@triton.jit
def safe_log(s):
    """``log s`` with 0 for an empty sum, so that ``(x - max) / T - log s`` stays -inf (not NaN) at -inf
    entries of a row without finite entries; a NaN sum stays NaN."""
    return tl.where(s == 0, 0.0, tl.log(s))


@triton.jit
def floored(x2):
    """``max(x2, FLOOR)`` for a log2 weight or probability ``x2`` that enters a product or a difference, NaN kept
    (``max.NaN``: one instruction).

    A finite logit far below its row's maximum (``finfo.min``, or ``-1e38`` at ``T < 1``) overflows
    ``(x - max) * log2(e) / T`` to -inf; its probability is 0 either way, but -inf would make its terms NaN
    (``0 * inf``, ``inf - inf`` where both distributions hold such an entry). At ``FLOOR`` the probability is still
    0 and every term is finite, so a masked sum may multiply its terms by a mask of 0.0 and 1.0. -inf logits (masked
    entries) also read ``FLOOR``: their terms are masked by the logits' values."""
    return tl.maximum(x2, FLOOR, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def log2_probs(x, row_max, log_sum, scale2):
    """``log2`` of the probabilities of a block: ``(x - max) / T * log2(e) - log s * log2(e)`` (-inf at -inf, and
    where it overflows: see :func:`floored`).

    ``scale2 = log2(e) / T``; ``row_max`` and ``log_sum`` are the row's ``MAX_*`` and ``LOGS_*`` columns.
    """
    return (x - row_max) * scale2 - log_sum * LOG2E


@triton.jit
def todi_weights(x2):
    """ToDi's ``w = sigmoid(-x)`` and ``c = sigmoid(x)`` (``x = beta d``) from ``x2 = beta (log2 q - log2 p)``
    (``x log2(e)``) and one ``u = exp(-|x|) = 2^-|x2|``: the larger is ``1 / (1 + u)``, the smaller ``u / (1 + u)``,
    both exact in the tails (neither is formed as ``1 - other``). ``1 + u`` lies in (1, 2], where the approximate
    reciprocal (:func:`fast_recip`) is accurate to 2 ulp."""
    u = tl.exp2(-tl.abs(x2))
    big = fast_recip(1.0 + u)
    small = u * big
    return tl.where(x2 >= 0, small, big), tl.where(x2 >= 0, big, small)


@triton.jit
def fast_recip(x):
    """``1 / x`` by ``div.approx`` (a MUFU reciprocal and a multiplication, 2 ulp for ``|x|`` in [2^-126, 2^126]),
    where ``tl.fdiv``'s ``div.full`` adds a range check and two conditional rescalings. Under the interpreter:
    ``1 / x``."""
    if MUFU_LOG2:
        return libdevice.fast_dividef(1.0, x)
    return 1.0 / x


@triton.jit
def fast_log2(x):
    """``log2 x`` in one MUFU op (``lg2.approx.ftz``: absolute error about 2^-22 for x in [0.5, 2], 2 ulp outside;
    denormals flush to 0), where ``tl.log2`` compiles to a libdevice routine of ~25 instructions, more than half of a
    streaming pass's budget per element. In :func:`mixture` that absolute error moves a row's loss by at most
    ~2e-7 per unit of probability mass. Under the interpreter: ``tl.log2``."""
    if MUFU_LOG2:
        return libdevice.fast_log2f(x)
    return tl.log2(x)


@triton.jit
def mixture(lx2, ly2, w_x, w_y, keep):
    """The mixture ``M = w_x X + w_y Y`` (``w_x + w_y = 1``) of two distributions, in log space with no epsilon, from
    ``lx2 = log2 X``, ``ly2 = log2 Y``: returns ``X``, ``Y``, ``lxm = log2(X / M)`` and ``lym = log2(Y / M)``.

    Three MUFU ops (two ``exp2``, one ``log2``) give both distributions and the mixture: with ``d = ly2 - lx2`` and
    ``e = 2^-|d|`` in [0, 1], the larger of ``X``, ``Y`` is ``2^max(lx2, ly2)`` and the smaller that times ``e``;
    ``M`` is the larger times ``s``, ``s = w_x + w_y e`` (``X`` larger) or ``w_x e + w_y`` (``Y`` larger), so
    ``lxm = -max(d, 0) - log2 s`` and ``lym = min(d, 0) - log2 s``. ``s`` lies in [min(w_x, w_y), 1] one rounding
    from exact: ``log2 s`` never underflows, no large log-probability is rounded into the mixture, and ``lym`` is not
    formed as ``d + lxm`` (which cancels when ``|d|`` is large). Equal ``X`` and ``Y`` give ``s = 1`` (when
    ``w_x + w_y`` rounds to 1), so ``lxm = log2 1``.

    Where one of ``X``, ``Y`` is 0 (a -inf log) it is 0 exactly; where both are, both are 0 and ``lxm``, ``lym`` NaN
    (callers floor the logs, :func:`floored`). A NaN makes ``e``, hence ``lxm`` and ``lym``, NaN. ``X`` and ``Y``
    come out times ``keep`` (1.0, or a pass's mask of 0.0 and 1.0: one multiplication masks both).
    """
    d = ly2 - lx2
    big = tl.exp2(tl.maximum(lx2, ly2)) * keep
    e = tl.exp2(-tl.abs(d))
    small = big * e
    y_larger = d > 0
    log_s = fast_log2(tl.where(y_larger, w_x, w_y) * e + tl.where(y_larger, w_y, w_x))
    x = tl.where(y_larger, small, big)
    y = tl.where(d < 0, small, big)
    return x, y, -tl.maximum(d, 0.0) - log_s, tl.minimum(d, 0.0) - log_s


@triton.jit
def order_key(x, KEY_BITS: tl.constexpr):
    """Unsigned key (uint32) of ``x``'s bits, in ``x``'s own dtype, that orders like the values; -0.0 keys as
    +0.0. ``KEY_BITS`` is 16 for bfloat16/float16 and 32 for float32."""
    if KEY_BITS == 16:
        bits = x.to(tl.uint16, bitcast=True).to(tl.uint32)
        key = tl.where((bits >> 15) != 0, bits ^ 0xFFFF, bits ^ 0x8000)
        zero = 0x8000
    else:
        bits = x.to(tl.uint32, bitcast=True)
        key = tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits ^ 0x80000000)
        zero = 0x80000000
    return tl.where(x == 0, zero, key)


@triton.jit
def key_value(key, dtype: tl.constexpr, KEY_BITS: tl.constexpr):
    """The value (as float32) of ``dtype`` whose :func:`order_key` is ``key`` (an int64 key)."""
    if KEY_BITS == 16:
        k = key.to(tl.uint32)
        bits = tl.where(k >= 0x8000, k ^ 0x8000, k ^ 0xFFFF)
        return bits.to(tl.uint16).to(dtype, bitcast=True).to(tl.float32)
    else:
        k = key.to(tl.uint32)
        bits = tl.where(k >= 0x80000000, k ^ 0x80000000, k ^ 0xFFFFFFFF)
        return bits.to(tl.float32, bitcast=True)


@triton.jit
def key_bound(key, dtype: tl.constexpr, KEY_BITS: tl.constexpr):
    """A float32 ``b`` such that ``x < b`` exactly when ``order_key(x) < key``, for every ``x`` of ``dtype`` that is
    neither NaN nor a float32 subnormal: the value of ``key`` (:func:`key_value`), or, when that is 0 or a float32
    subnormal, the smallest normal float32 if it is positive, else 0 (no other value lies between). So the passes
    classify entries against a bracket of keys with float comparisons, strict ones only (a key between -0.0's and
    +0.0's has no value of its own). Subnormal entries (bfloat16 or float32 teachers) compare as zeros, as their
    probabilities do; the test is on the key's bits, which no flush-to-zero touches."""
    k = key.to(tl.uint32)
    value = key_value(key, dtype, KEY_BITS)
    if KEY_BITS == 32:
        bits = tl.where(k >= 0x80000000, k ^ 0x80000000, k ^ 0xFFFFFFFF)
        tiny = (bits & 0x7F800000) == 0
        positive = (bits < 0x80000000) & ((bits & 0x7FFFFF) != 0)
        value = tl.where(tiny, tl.where(positive, MIN_NORMAL, 0.0), value)
    elif dtype == tl.bfloat16:  # a float16 is a normal float32 or zero
        bits = tl.where(k >= 0x8000, k ^ 0x8000, k ^ 0xFFFF)
        tiny = (bits & 0x7F80) == 0
        positive = (bits < 0x8000) & ((bits & 0x7F) != 0)
        value = tl.where(tiny, tl.where(positive, MIN_NORMAL, 0.0), value)
    return value


@triton.jit
def store_key(ptr, key):
    """Store a uint32 key in a float32 slot, bit for bit."""
    tl.store(ptr, key.to(tl.uint32).to(tl.float32, bitcast=True))


@triton.jit
def load_key(ptr):
    """Load a key stored by :func:`store_key` (uint32)."""
    return tl.load(ptr).to(tl.uint32, bitcast=True)


@triton.jit
def pick(values, index, i):
    """``values[i]`` of a small vector (``index`` is its ``tl.arange``)."""
    return tl.sum(tl.where(index == i, values, 0), axis=0)
