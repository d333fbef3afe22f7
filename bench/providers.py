"""The implementations compared by the benchmark, each a ``loss(z, t)`` of logits ``(N, V)``.

- ``kdkernels``: ``kd.kd_loss(..., backend="auto")`` (Triton on CUDA, the torch backend on the CPU).
- ``eager``: the package's plain reference (``kd_loss_reference``), which materialises ``(N, V)`` tensors.
- ``compile``: ``torch.compile`` of that same reference.
- ``liger``: Liger-Kernel's JSD at beta 0 (forward KL) or 1 (reverse KL) on ``log_softmax`` inputs, only
  when ``liger-kernel`` is importable and the device is CUDA.

All but Liger return per-row losses (``reduction="none"``) so that their error can be measured per row; the
benchmark back-propagates ``1/N`` per row, the gradient of ``reduction="mean"``. Liger returns that mean.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

import kdkernels as kd
from kdkernels.torch_ops.reference import kd_loss_reference

LIGER_BETA = {"fkl": 0.0, "rkl": 1.0}  # generalised JSD(beta): beta 0 is KL(p||q), beta 1 is KL(q||p)


@dataclass
class Provider:
    name: str
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    per_row: bool  # the loss is (N,) row losses; else the scalar mean


@functools.cache
def _compiled_reference():
    return torch.compile(kd_loss_reference)


def _liger(divergence: str, temperature: float) -> Provider:
    from liger_kernel.transformers import LigerJSD

    jsd = LigerJSD(beta=LIGER_BETA[divergence])

    def loss(z, t):
        log_q = torch.log_softmax(z.float() / temperature, dim=-1)
        log_p = torch.log_softmax(t.float() / temperature, dim=-1)
        return jsd(log_q, log_p)

    return Provider("liger", loss, per_row=False)


def left_out(names: tuple[str, ...], device: str, divergences: tuple[str, ...]) -> list[str]:
    """Why requested providers will not run some or all of ``divergences`` on ``device``: one sentence each."""
    if "liger" not in names:
        return []
    if device != "cuda":
        return [f"liger runs on CUDA only (Liger-Kernel's Triton kernels), not on {device}"]
    if importlib.util.find_spec("liger_kernel") is None:
        return ["liger is not installed (pip install liger-kernel)"]
    others = [d for d in divergences if d not in LIGER_BETA]
    return [f"liger has no {', '.join(others)} (its JSD gives {' and '.join(LIGER_BETA)})"] if others else []


def providers(divergence: str, device: str, names: tuple[str, ...], temperature: float = 1.0) -> list[Provider]:
    """The providers among ``names`` that can run ``divergence`` on ``device``."""
    options = dict(temperature=temperature, reduction="none")
    out = []
    if "kdkernels" in names:
        out.append(Provider("kdkernels", lambda z, t: kd.kd_loss(z, t, divergence, backend="auto", **options), True))
    if "eager" in names:
        out.append(Provider("eager", lambda z, t: kd_loss_reference(z, t, divergence, **options), True))
    if "compile" in names:
        out.append(Provider("compile", lambda z, t: _compiled_reference()(z, t, divergence, **options), True))
    if ("liger" in names and device == "cuda" and divergence in LIGER_BETA
            and importlib.util.find_spec("liger_kernel") is not None):
        out.append(_liger(divergence, temperature))
    return out
