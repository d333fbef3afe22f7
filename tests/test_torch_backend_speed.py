"""The torch backend's compiled chunk path (used for large CPU inputs) and its fixed chunk shape.

Small calls run eagerly (``COMPILE_MIN_ELEMENTS``), so the rest of the suite never compiles; here the threshold
and chunk size are lowered to reach the compiled path once, at a modest size, for one divergence.
"""

import pytest
import torch

import kdkernels as kd
from kdkernels.torch_ops import torch_backend
from tests.utils import assert_matches_reference


def test_row_ranges_have_one_shape_when_aligned():
    assert list(torch_backend._row_ranges(10, 4, aligned=True)) == [(0, 4), (4, 8), (6, 10)]
    assert list(torch_backend._row_ranges(10, 4, aligned=False)) == [(0, 4), (4, 8), (8, 10)]


def test_small_inputs_stay_eager():
    z = torch.zeros(64, 1000)
    assert not torch_backend._use_compiled(z, z)
    assert not torch_backend._use_compiled(z.double(), z.double())


@pytest.mark.parametrize("divergence", ["todi", "akl"])
def test_compiled_chunks_match_reference_for_any_row_count(monkeypatch, divergence):
    monkeypatch.setattr(torch_backend, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(torch_backend, "COMPILED_CHUNK_ELEMENTS", 8 * 500)  # 8 rows per chunk
    gen = torch.Generator().manual_seed(0)
    z_all = 3 * torch.randn(27, 500, generator=gen)
    t_all = 3 * torch.randn(27, 500, generator=gen)
    z_all[1, :7] = float("-inf")
    t_all[2, 3:9] = float("-inf")
    labels_all = torch.randint(0, 500, (27,), generator=gen)
    labels_all[::4] = -100
    for n in (27, 19):  # two row counts, one compiled shape (the last chunk overlaps)
        z, t, labels = z_all[:n], t_all[:n], labels_all[:n]
        options = dict(labels=labels, temperature=2.0, reduction="none")
        assert_matches_reference(lambda x, t=t, o=options: kd.kd_loss(x, t, divergence, backend="torch", **o), z, t,
                                 divergence, **options)
    assert not torch_backend._FAILED
