"""The torch backend's compiled chunk path (used for CPU inputs of at least ``COMPILE_MIN_ELEMENTS`` entries).

Small calls run eagerly, so the rest of the suite never compiles; here the threshold and chunk size are lowered to
reach the compiled path at a modest size: any row count on one compilation, and the numerics of
tests/test_torch_backend_numerics.py.
"""

import pytest
import torch

import kdkernels as kd
from kdkernels.torch_ops import torch_backend
from tests.utils import assert_matches_reference, loss_and_grad


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


def test_compiled_chunks_keep_the_numerics(monkeypatch):
    """Compiled, as eager (tests/test_torch_backend_numerics.py): logits around 1e4, teacher and student rows of
    -1e9 and the hard-label term match the reference; a label outside [0, V) gives a NaN row gradient."""
    monkeypatch.setattr(torch_backend, "COMPILE_MIN_ELEMENTS", 0)
    gen = torch.Generator().manual_seed(1)
    z = 2 * torch.randn(6, 301, generator=gen)
    t = 2 * torch.randn(6, 301, generator=gen)
    z[:3] += 1e4
    t[:3] += 1e4
    t[3] = -1e9
    z[4] = -1e9
    labels = torch.tensor([0, 17, -100, 300, 5, 150])
    options = dict(labels=labels, ce_weight=0.5, temperature=2.0, reduction="none")
    assert_matches_reference(lambda x: kd.kd_loss(x, t, "fkl", backend="torch", **options), z, t, "fkl", **options)
    labels[1] = 301
    loss, grad = loss_and_grad(lambda x: kd.kd_loss(x, t, "fkl", backend="torch", **options), z)
    assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all()
    assert torch.isfinite(grad[[0, 2, 3, 4, 5]]).all()
    assert not torch_backend._FAILED


def test_one_compilation_serves_every_row_count(monkeypatch):
    """The row count is dynamic: after the first call (one forward and one backward graph), other N, below or
    above the chunk size, compile nothing."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch_backend, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(torch_backend, "COMPILED_CHUNK_ELEMENTS", 8 * 300)  # 8 rows per chunk
    graphs = []
    for n in (9, 5, 20, 2):
        z = torch.randn(n, 300, requires_grad=True)
        kd.kd_loss(z, torch.randn(n, 300), "rkl", temperature=3.0, backend="torch").backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1:] == graphs[:1] * 3, graphs
