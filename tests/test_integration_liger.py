"""``kdkernels.integrations.liger`` against Liger-Kernel's ``LigerFusedLinearJSDLoss`` and against the formulas.

Liger's chunked loss is plain torch (``torch.func`` per chunk), so it runs on the CPU: with liger-kernel installed
the JSD module must give Liger's loss (1e-5) and gradients (1e-4) on the same inputs, at ``beta`` 0, 0.5 and 1, with
a temperature, biases, ignored rows and both weights. Without it (and for the other divergences, which Liger does
not have) the modules are checked against the float64 reference on the full logits.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kdkernels.integrations import liger as kd_liger
from kdkernels.torch_ops.reference import kd_loss_reference
from tests.utils import rel_err

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
N, H_S, H_T, V = 37, 16, 24, 50
STUDENT = ("student_input", "student_weight", "student_bias")  # the tensors that take a gradient


def inputs(bias: bool = True, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::5] = -100
    return dict(
        student_input=torch.randn(N, H_S, generator=gen), student_weight=torch.randn(V, H_S, generator=gen) / 2,
        teacher_input=torch.randn(N, H_T, generator=gen), teacher_weight=torch.randn(V, H_T, generator=gen) / 2,
        true_labels=labels, student_bias=torch.randn(V, generator=gen) if bias else None,
        teacher_bias=torch.randn(V, generator=gen) if bias else None)


def run(module, tensors: dict):
    """``module(**tensors)`` and the gradients of the student's input, weight and bias."""
    leaves = {name: tensors[name].clone().requires_grad_(True) for name in STUDENT if tensors[name] is not None}
    out = module(**{**tensors, **leaves})
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return out, {name: leaf.grad for name, leaf in leaves.items()}


def reference(tensors: dict, divergence: str, vocab: int | None = None, weight_hard_loss=0.5, weight_soft_loss=0.5,
              **options):
    """The float64 reference on the full logits (their first ``vocab`` entries) and its student gradients."""
    leaves = {name: tensors[name].double().requires_grad_(True) for name in STUDENT if tensors[name] is not None}
    z = leaves["student_input"] @ leaves["student_weight"].T
    t = tensors["teacher_input"].double() @ tensors["teacher_weight"].double().T
    if "student_bias" in leaves:
        z, t = z + leaves["student_bias"], t + tensors["teacher_bias"].double()
    loss = kd_loss_reference(z[:, :vocab], t[:, :vocab], divergence, labels=tensors["true_labels"],
                             kd_weight=weight_soft_loss, ce_weight=weight_hard_loss, **options)
    loss.backward()
    return loss.detach(), {name: leaf.grad for name, leaf in leaves.items()}


def assert_close(ours, expected):
    (loss, grads), (ref_loss, ref_grads) = ours, expected
    loss = loss[0] if isinstance(loss, tuple) else loss
    assert rel_err(loss, ref_loss) < 1e-5, (loss.item(), ref_loss.item())
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert rel_err(grads[name], grad) < 1e-4, (name, rel_err(grads[name], grad))


@pytest.mark.skipif(not HAS_LIGER, reason="liger-kernel is not installed: pip install 'kdkernels[liger]'")
@pytest.mark.parametrize("beta,temperature,weights,bias", [
    (0.0, 1.0, (0.5, 0.5), True),
    (0.5, 2.0, (0.3, 0.7), True),
    (1.0, 1.0, (0.0, 1.0), False),
    (0.5, 1.0, (1.0, 0.0), False),
])
def test_jsd_equals_liger(beta, temperature, weights, bias):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    hard, soft = weights
    tensors = inputs(bias)
    theirs = LigerFusedLinearJSDLoss(hard, soft, beta, -100, temperature, compiled=False, chunk_size=8)
    ours = kd_liger.FusedLinearJSDLoss(hard, soft, beta, -100, temperature, compiled=False)
    assert_close(run(ours, tensors), run(theirs, tensors))


@pytest.mark.skipif(not HAS_LIGER, reason="liger-kernel is not installed: pip install 'kdkernels[liger]'")
def test_soft_and_hard_losses_equal_liger():
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    tensors = inputs()
    theirs = LigerFusedLinearJSDLoss(0.3, 0.7, 0.2, temperature=1.5, compiled=False, return_soft_hard_loss=True)
    ours = kd_liger.FusedLinearJSDLoss(0.3, 0.7, 0.2, temperature=1.5, return_soft_hard_loss=True)
    (theirs_out, theirs_grads), (ours_out, ours_grads) = run(theirs, tensors), run(ours, tensors)
    for mine, liger in zip(ours_out, theirs_out):
        assert rel_err(mine.detach(), liger.detach()) < 1e-5
    assert_close((ours_out, ours_grads), (theirs_out[0].detach(), theirs_grads))


@pytest.mark.parametrize("cls,divergence,params", [
    (kd_liger.FusedLinearJSDLoss, "jsd", dict(jsd_beta=0.3)),
    (kd_liger.FusedLinearForwardKLLoss, "fkl", {}),
    (kd_liger.FusedLinearReverseKLLoss, "rkl", {}),
    (kd_liger.FusedLinearAKLLoss, "akl", dict(akl_alpha=0.3)),
    (kd_liger.FusedLinearToDiLoss, "todi", dict(todi_beta=2.0)),
    (kd_liger.FusedLinearSkewedForwardKLLoss, "sfkl", dict(skew_lambda=0.2)),
    (kd_liger.FusedLinearSkewedReverseKLLoss, "srkl", dict(skew_lambda=0.2)),
    (kd_liger.FusedLinearTVDLoss, "tvd", {}),
])
def test_every_divergence_by_formula(cls, divergence, params):
    """``weight_hard_loss * CE + weight_soft_loss * D`` at T = 2, mean over the labelled rows."""
    tensors = inputs()
    ours = cls(0.25, 0.75, temperature=2.0, **params)
    expected = reference(tensors, divergence, weight_hard_loss=0.25, weight_soft_loss=0.75, temperature=2.0, **params)
    assert_close(run(ours, tensors), expected)


def test_heads_of_different_sizes_need_vocab_size():
    tensors = inputs(bias=False)
    padded = dict(tensors, teacher_weight=torch.cat([tensors["teacher_weight"], torch.randn(6, H_T)]))
    with pytest.raises(ValueError, match="pass vocab_size=50 .*Liger pads"):
        kd_liger.FusedLinearJSDLoss()(**padded)
    ours = kd_liger.FusedLinearJSDLoss(beta=0.5, vocab_size=V)
    assert_close(run(ours, padded), reference(padded, "jsd", vocab=V, jsd_beta=0.5))


def test_without_labels_and_refusals():
    tensors = dict(inputs(bias=False), true_labels=None)
    ours = kd_liger.FusedLinearReverseKLLoss(weight_hard_loss=0.0, weight_soft_loss=1.0)
    expected = reference(dict(tensors, true_labels=None), "rkl", weight_hard_loss=0.0, weight_soft_loss=1.0)
    assert_close(run(ours, tensors), expected)
    with pytest.raises(ValueError, match="weight_hard_loss needs true_labels"):
        kd_liger.FusedLinearReverseKLLoss()(**tensors)
    with pytest.raises(ValueError, match="jsd_beta"):
        kd_liger.FusedLinearJSDLoss(beta=1.5)
    assert kd_liger.FusedLinearJSDLoss(jsd_beta=0.1).options.jsd_beta == 0.1
