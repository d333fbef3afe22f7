"""No host synchronisation in the op path (issue 6, item 6).

A sync (``.item()``, ``.cpu()``, ``.tolist()``, a Python ``if`` on a tensor) stalls the CUDA stream and breaks
CUDA graphs. Three checks: on CUDA, the op runs under ``torch.cuda.set_sync_debug_mode("error")``;
everywhere, a source check of the op modules; and everywhere, a dispatch-level check that the torch
backend's forward and backward never read a tensor value back to Python.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kdkernels as kd
from kdkernels.torch_ops import options, torch_backend
from kdkernels.torch_ops.reference import DIVERGENCES

PACKAGE = Path(kd.__file__).parent
# The modules a training step runs through (the reference and the AOT helper are not in the op path).
OP_MODULES = [
    "torch_ops/functional.py",
    "torch_ops/modules.py",
    "torch_ops/rows.py",
    "torch_ops/op.py",
    "torch_ops/options.py",
    "torch_ops/validate.py",
    "torch_ops/torch_backend.py",
    "torch_ops/layout.py",
    "torch_ops/vocab_parallel.py",
    "torch_ops/dtensor.py",
    "kernels/launch.py",
    "kernels/forward.py",
    "kernels/akl.py",
    "kernels/backward.py",
    "kernels/common.py",
]
SYNC_METHODS = {"item", "cpu", "tolist", "numpy", "synchronize", "nonzero"}
# The allowed reads: the ops' float options travel as a CPU tensor (options.py), which ``from_op`` reads on the host
# (it checks that the tensor is on the CPU, so no device is involved); and the vocabulary-parallel path's validation
# mode reads the ranks' shape table (``vocab_range`` and DTensors skip it).
ALLOWED = {("torch_ops/options.py", "from_op", "tolist"), ("torch_ops/vocab_parallel.py", "table_shard", "cpu"),
           ("torch_ops/vocab_parallel.py", "table_shard", "tolist")}


@pytest.mark.parametrize("module", OP_MODULES)
def test_op_modules_call_no_sync_method(module):
    """No ``.item()``, ``.cpu()``, ``.tolist()``, ``.numpy()``, ``.nonzero()`` or ``synchronize()`` call in the
    op modules' source."""
    tree = ast.parse((PACKAGE / module).read_text())
    allowed = {
        (node.func.attr, node.lineno)
        for function in ast.walk(tree) if isinstance(function, ast.FunctionDef)
        for node in ast.walk(function)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and (module, function.name, node.func.attr) in ALLOWED
    }
    calls = [
        f"line {node.lineno}: .{node.func.attr}()"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SYNC_METHODS
        and (node.func.attr, node.lineno) not in allowed
    ]
    assert not calls, f"{module} syncs with the host: {calls}"


class ScalarReads(TorchDispatchMode):
    """Records every aten op that copies a tensor value to the host or has a data-dependent output shape."""

    SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique",
               "aten::_unique2", "aten::item", "aten::equal", "aten::is_nonzero"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCING:
            self.seen.append(func._schema.name)
        if func.namespace == "kdkernels":
            # The mode is off inside this call, so run the op's torch-backend body with the mode on, to see the
            # aten ops inside it. The op's last four arguments are the flattened options and the backend name:
            # the options are rebuilt outside the mode, as reading their CPU tensor involves no device.
            body = getattr(torch_backend, func._schema.name.split("::")[1])
            *tensors, params, divergence, ignore_index, _ = args
            opts = options.from_op(params, divergence, ignore_index)
            with self:
                return body(*tensors, opts)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_torch_backend_reads_no_values(divergence):
    """The torch backend's forward and backward (labels, CE, mean over kept rows) run without any aten op
    that would sync a CUDA stream."""
    z = torch.randn(3, 2, 20, requires_grad=True)
    t = torch.randn(3, 2, 20)
    labels = torch.tensor([[1, -100], [3, 4], [-100, -100]])
    with ScalarReads() as mode:
        loss = kd.kd_loss(z, t, divergence, labels=labels, ce_weight=0.5, backend="torch")
        loss.backward()
    assert not mode.seen, mode.seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_sync_on_cuda(divergence, backend):
    """Forward and backward on CUDA tensors raise no error under ``set_sync_debug_mode("error")``."""
    z = torch.randn(4, 3, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(4, 3, 256, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, 256, (4, 3), device="cuda")
    labels[0, 0] = -100
    module = kd.KDLoss(divergence, temperature=2.0, ce_weight=0.5, backend=backend)
    kd.kd_loss(z, t, divergence, labels=labels, backend=backend).backward()  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kd.kd_loss(z, t, divergence, labels=labels, backend=backend).backward()
        module(z, t, labels).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
