"""``common.key_bound``: a float comparison against a key's bound classifies an entry as its order key does.

AKL's passes compare teacher values with the bounds of the bracket's keys (``x < key_bound(k)``) instead of building
each entry's order key. For every key ``k`` and every value ``x`` that is neither NaN nor a float32 subnormal (every
bfloat16 and float16 bit pattern, and float32 values around every binade edge), ``x < key_bound(k)`` must hold
exactly when ``order_key(x) < k``. Both sides are prefixes in the order of the values, so it suffices that they count
the same number of values below each key.
"""

import pytest
import torch

from kdkernels.torch_ops.akl_select import order_keys
from tests.utils import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its interpreter runs the kernels)")

if HAS_TRITON:
    import triton
    import triton.language as tl

    from kdkernels.kernels.common import key_bound

    @triton.jit
    def _bounds_kernel(keys_ptr, out_ptr, like_ptr, n, KEY_BITS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        keys = tl.load(keys_ptr + offs, mask=offs < n, other=0)
        tl.store(out_ptr + offs, key_bound(keys, like_ptr.dtype.element_ty, KEY_BITS), mask=offs < n)


def kernel_bounds(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``key_bound`` of int64 ``keys`` (unsigned order keys) for a teacher of ``dtype``, as float64."""
    out = torch.full(keys.shape, float("nan"))
    block = 4096
    _bounds_kernel[(triton.cdiv(keys.numel(), block),)](
        keys, out, torch.empty(1, dtype=dtype), keys.numel(), KEY_BITS=16 if dtype.itemsize == 2 else 32, BLOCK=block
    )
    return out.double()


def values_of(dtype: torch.dtype) -> torch.Tensor:
    """The values checked: every 16-bit pattern, or float32 values at and around every binade edge, signed."""
    if dtype.itemsize == 2:
        return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    edges = torch.tensor([2.0**e for e in range(-126, 128)])
    near = torch.cat([edges, torch.nextafter(edges, torch.tensor(0.0)), torch.nextafter(edges, torch.tensor(1e39))])
    return torch.cat([near, -near, torch.tensor([0.0, -0.0, float("inf"), float("-inf")])])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_bounds_classify_like_keys(dtype):
    x = values_of(dtype)
    value = x.double()
    x = x[~value.isnan() & ~((value.abs() < 2.0**-126) & (value != 0))]  # no NaN, no float32 subnormal
    signed, bits = order_keys(x)
    unsigned = signed.long() + 2 ** (bits - 1)  # the kernels' keys (``common.order_key``)
    if bits == 16:
        keys = torch.arange(0, 2**16 + 1)
    else:  # each value's key, its neighbours and the keys of the -0.0 / +0.0 gap
        keys = torch.cat([unsigned, unsigned - 1, unsigned + 1, torch.tensor([2**31 - 1, 2**31, 2**31 + 1])])
        keys = keys.clamp(0, 2**32 - 1).unique()
    keys = keys[(keys >= unsigned.min()) & (keys <= unsigned.max())]  # keys of values: from -inf's to +inf's
    bounds = kernel_bounds(keys, dtype)
    by_key = torch.searchsorted(unsigned.sort().values, keys)
    by_value = torch.searchsorted(x.double().sort().values, bounds)
    wrong = (by_key != by_value).nonzero().flatten()
    assert wrong.numel() == 0, [(int(keys[i]), float(bounds[i]), int(by_key[i]), int(by_value[i])) for i in wrong[:5]]
