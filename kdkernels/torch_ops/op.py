"""The registered ops ``kdkernels::kd_forward`` / ``kdkernels::kd_backward`` and their autograd.

``kd_forward(z, t, labels, params, divergence, ignore_index, backend) -> (row_loss (N,), stats (N, NUM_STATS))``
on ``(N, V)`` logits with unit stride over the vocabulary, and
``kd_backward(grad_rows, z, t, labels, stats, params, divergence, ignore_index, backend) -> dz (N, V)``, each
dispatching to the Triton kernels or the torch backend. Being ``torch.library`` custom ops with fake
implementations, they trace under ``torch.compile(fullgraph=True)`` without graph breaks. The reduction
over rows happens outside (``rows.reduce_rows``, called by the API), so the backward always gets one gradient per
row.

``(params, divergence, ignore_index)`` are :class:`~kdkernels.torch_ops.options.KDOptions` flattened by
``options.op_args``: the float options travel as a CPU tensor, so ``torch.compile`` takes a temperature or weight
schedule as a graph input rather than compiling a graph per value. The backward is first-order only:
with ``create_graph=True`` it raises :data:`SECOND_DERIVATIVE` at once.
"""

from __future__ import annotations

import torch

from kdkernels.torch_ops import layout, torch_backend
from kdkernels.torch_ops.options import from_op

SECOND_DERIVATIVE = (
    "kdkernels computes the gradient of its loss analytically and has no second derivative, so its backward "
    "cannot run with create_graph=True (double backward, e.g. a gradient penalty or torch.autograd.grad "
    "with create_graph=True): leave create_graph off, or use backend='reference', which autograd differentiates"
)


def _backend_module(backend: str):
    if backend == "triton":
        from kdkernels.kernels import launch  # imported on first use: importing kdkernels needs no triton

        return launch
    return torch_backend


def _result_dtype(z: torch.Tensor, t: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (z.dtype, t.dtype) else torch.float32


@torch.library.custom_op("kdkernels::kd_forward", mutates_args=())
def kd_forward(
    z: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    params: torch.Tensor,
    divergence: str,
    ignore_index: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _backend_module(backend).kd_forward(z, t, labels, from_op(params, divergence, ignore_index))


@kd_forward.register_fake
def _(z, t, labels, params, divergence, ignore_index, backend):
    dtype = _result_dtype(z, t)
    return z.new_empty((z.shape[0],), dtype=dtype), z.new_empty((z.shape[0], layout.NUM_STATS), dtype=dtype)


@torch.library.custom_op("kdkernels::kd_backward", mutates_args=())
def kd_backward(
    grad_rows: torch.Tensor,
    z: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    stats: torch.Tensor,
    params: torch.Tensor,
    divergence: str,
    ignore_index: int,
    backend: str,
) -> torch.Tensor:
    opts = from_op(params, divergence, ignore_index)
    return _backend_module(backend).kd_backward(grad_rows, z, t, labels, stats, opts)


@kd_backward.register_fake
def _(grad_rows, z, t, labels, stats, params, divergence, ignore_index, backend):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    z, t, labels, params, divergence, ignore_index, backend = inputs
    ctx.save_for_backward(z, t, labels, output[1], params)
    ctx.options = (divergence, ignore_index, backend)


def _backward(ctx, grad_loss, grad_stats):
    # Autograd enables grad mode in a backward only for create_graph=True, i.e. to differentiate the gradient.
    if torch.is_grad_enabled():
        raise RuntimeError(SECOND_DERIVATIVE)
    z, t, labels, stats, params = ctx.saved_tensors
    dz = kd_backward(grad_loss, z, t, labels, stats, params, *ctx.options)
    return dz, None, None, None, None, None, None


kd_forward.register_autograd(_backward, setup_context=_setup_context)


# The two passes of a vocabulary slice (``vocab_parallel.py``), registered alike so that a compiled training step
# captures the vocabulary-parallel loss whole: the collectives between them are traced, these are opaque.
@torch.library.custom_op("kdkernels::shard_stats", mutates_args=())
def shard_stats(z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, params: torch.Tensor, divergence: str,
                ignore_index: int, backend: str) -> torch.Tensor:
    """``(N, NUM_STATS)``: the slice's own statistics (``torch_backend.shard_stats``, ``launch.shard_stats``)."""
    return _backend_module(backend).shard_stats(z, t, labels, from_op(params, divergence, ignore_index))


@shard_stats.register_fake
def _(z, t, labels, params, divergence, ignore_index, backend):
    return z.new_empty((z.shape[0], layout.NUM_STATS), dtype=_result_dtype(z, t))


@torch.library.custom_op("kdkernels::shard_finish", mutates_args=())
def shard_finish(z: torch.Tensor, t: torch.Tensor, stats: torch.Tensor, params: torch.Tensor, divergence: str,
                 ignore_index: int, backend: str) -> torch.Tensor:
    """``(N, 2)``: the slice's part of ToDi's or a baseline's ``(loss, S)`` from the global ``stats``."""
    return _backend_module(backend).shard_finish(z, t, stats, from_op(params, divergence, ignore_index))


@shard_finish.register_fake
def _(z, t, stats, params, divergence, ignore_index, backend):
    return z.new_empty((z.shape[0], 2), dtype=_result_dtype(z, t))
