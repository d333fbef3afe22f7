"""Test set-up: run the Triton kernels through the interpreter when there is no GPU, poison new buffers."""

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

_empty = torch.empty
_empty_like = torch.empty_like


def _poison(x: torch.Tensor) -> torch.Tensor:
    return x.fill_(float("nan")) if x.dtype.is_floating_point else x


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    """``torch.empty``/``empty_like`` return NaN-filled float tensors, so an element no kernel wrote fails."""
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(_empty_like(*a, **k)))
