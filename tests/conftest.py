"""Test set-up: run the Triton kernels through the interpreter when there is no GPU, poison new buffers, and
leave the exhaustive matrix to CI.

A test or a parameter marked ``full`` (``@pytest.mark.full``, or ``tests.utils.full_only(...)`` in a parametrize
list) is a point of the exhaustive matrix that the quick run's other points already cover in kind: a further
size, dtype, divergence or Triton variant of a check made elsewhere. Such tests run only when ``KDKERNELS_FULL=1``
(``.ci/run`` sets it); otherwise they are deselected, and pytest's summary counts them.
"""

import os
import tempfile

import pytest
import torch

# Before anything imports triton: without CUDA, Triton kernels run on the CPU through the interpreter.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
# A fresh inductor cache per run: a cached graph keeps the output shapes of the ops' fake implementations, so a
# graph cached before a change of the statistics layout would be replayed with the old shapes.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="kdkernels-inductor-"))

FULL = os.environ.get("KDKERNELS_FULL") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "full: a point of the exhaustive matrix, run only with KDKERNELS_FULL=1 (CI)")


def pytest_report_header(config):
    return f"exhaustive matrix (tests marked full): {'on' if FULL else 'off; KDKERNELS_FULL=1 runs it'}"


def pytest_collection_modifyitems(config, items):
    if FULL:
        return
    full = [item for item in items if item.get_closest_marker("full")]
    if full:
        config.hook.pytest_deselected(items=full)
        items[:] = [item for item in items if not item.get_closest_marker("full")]


_empty = torch.empty
_empty_like = torch.empty_like


def _poison(x: torch.Tensor) -> torch.Tensor:
    return x.fill_(float("nan")) if x.dtype.is_floating_point else x


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    """``torch.empty``/``empty_like`` return NaN-filled float tensors, so an element no kernel wrote fails."""
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(_empty_like(*a, **k)))
