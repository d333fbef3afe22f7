"""``kdkernels.integrations.torchtune`` against torchtune's chunked-output KD losses (torchtune 0.6.1).

torchtune's ``ForwardKLLoss`` is the cross-entropy ``-sum p log q`` (forward KL plus the teacher's entropy): the
kdkernels module must equal it minus the mean teacher entropy, with the same gradients; reverse KL must equal
torchtune's exactly. Every divergence is checked against the float64 reference on the concatenated chunks, and a
tiny torchtune Llama 3 (chunked output, as the KD recipes set it) trains a few steps with the module.
"""

from __future__ import annotations

import pytest
import torch

from kdkernels.integrations import torchtune as kd_torchtune
from kdkernels.torch_ops.reference import kd_loss_reference
from tests.utils import rel_err

try:
    from torchtune.models.llama3 import llama3
    from torchtune.modules import loss as tt_loss
except Exception as err:  # torchtune needs torchao at import; either may be missing or incompatible
    tt_loss = None
    TORCHTUNE_MISSING = f"torchtune does not import ({type(err).__name__}: {err}); pip install 'kdkernels[torchtune]'"
needs_torchtune = pytest.mark.skipif(tt_loss is None, reason=TORCHTUNE_MISSING if tt_loss is None else "")

B, S, V, CHUNKS = 2, 23, 50, 4


def chunked(seed: int = 0, scale: float = 3.0):
    """Student and teacher logits ``(B, S, V)`` cut into ``CHUNKS`` along the sequence, and labels with ignored
    tokens."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(B, S, V, generator=gen) * scale
    t = torch.randn(B, S, V, generator=gen) * scale
    labels = torch.randint(0, V, (B, S), generator=gen)
    labels[0, :5] = -100
    labels[1, -3:] = -100
    return z, t, labels


def loss_and_grad(module, z, t, labels):
    leaf = z.clone().requires_grad_(True)
    loss = module(list(leaf.chunk(CHUNKS, dim=1)), list(t.chunk(CHUNKS, dim=1)), labels)
    loss.backward()
    return loss.detach(), leaf.grad


@needs_torchtune
def test_forward_kl_equals_torchtune_minus_teacher_entropy():
    z, t, labels = chunked()
    ours, ours_grad = loss_and_grad(kd_torchtune.ForwardKLWithChunkedOutputLoss(CHUNKS), z, t, labels)
    theirs, theirs_grad = loss_and_grad(tt_loss.ForwardKLWithChunkedOutputLoss(CHUNKS), z, t, labels)
    p = t.double().softmax(-1)
    entropy = -(p * p.log()).sum(-1)[labels != -100].mean()
    assert rel_err(ours, theirs - entropy) < 1e-5
    assert rel_err(ours_grad, theirs_grad) < 1e-5


@needs_torchtune
def test_reverse_kl_equals_torchtune():
    z, t, labels = chunked(1)
    ours, ours_grad = loss_and_grad(kd_torchtune.ReverseKLWithChunkedOutputLoss(CHUNKS), z, t, labels)
    theirs, theirs_grad = loss_and_grad(tt_loss.ReverseKLWithChunkedOutputLoss(CHUNKS), z, t, labels)
    assert rel_err(ours, theirs) < 1e-5
    assert rel_err(ours_grad, theirs_grad) < 1e-5


@pytest.mark.parametrize("divergence,options", [
    ("fkl", dict(temperature=2.0)), ("rkl", {}), ("akl", dict(akl_alpha=0.3)), ("todi", dict(todi_beta=2.0)),
    ("sfkl", dict(skew_lambda=0.2)), ("srkl", {}), ("jsd", dict(jsd_beta=0.3)), ("tvd", dict(ce_weight=0.5)),
])
def test_every_divergence_by_formula(divergence, options):
    z, t, labels = chunked(2, scale=1.0)
    ours, ours_grad = loss_and_grad(kd_torchtune.KDWithChunkedOutputLoss(divergence, CHUNKS, **options), z, t, labels)
    leaf = z.double().requires_grad_(True)
    ref = kd_loss_reference(leaf, t.double(), divergence, labels=labels, **options)
    ref.backward()
    assert rel_err(ours, ref.detach()) < 1e-5
    assert rel_err(ours_grad, leaf.grad) < 1e-5


def test_all_ignored_is_zero_and_refusals():
    z, t, labels = chunked()
    loss, grad = loss_and_grad(kd_torchtune.ForwardKLWithChunkedOutputLoss(CHUNKS), z, t, torch.full_like(labels, -100))
    assert loss == 0 and not grad.any()
    with pytest.raises(ValueError, match="3 student and 4 teacher logit chunks"):
        kd_torchtune.ForwardKLWithChunkedOutputLoss(CHUNKS)(list(z.chunk(3, dim=1)), list(t.chunk(CHUNKS, dim=1)),
                                                            labels)
    with pytest.raises(TypeError, match="reduction"):
        kd_torchtune.KDWithChunkedOutputLoss("fkl", reduction="sum")


@needs_torchtune
def test_torchtune_model_trains_with_the_module():
    """As torchtune's KD recipe: chunked student output, the teacher's under no_grad, shifted labels,
    ``(1 - kd_ratio) * CE + kd_ratio * KD`` (torchtune's own chunked CE, ``kd_ratio=0.5``); 10 AdamW steps lower the KD
    loss."""
    torch.manual_seed(0)
    student = llama3(vocab_size=V, num_layers=1, num_heads=2, num_kv_heads=2, embed_dim=16, max_seq_len=32)
    teacher = llama3(vocab_size=V, num_layers=2, num_heads=2, num_kv_heads=2, embed_dim=32, max_seq_len=32).eval()
    with torch.no_grad():
        teacher.output.weight.mul_(10)  # a confident teacher, far from the initial student
    kd_fn = kd_torchtune.KDWithChunkedOutputLoss("akl", num_output_chunks=CHUNKS, temperature=2.0)
    ce_fn = tt_loss.CEWithChunkedOutputLoss(num_output_chunks=CHUNKS)
    for model in (student, teacher):
        model.set_num_output_chunks(kd_fn.num_output_chunks)
    tokens = torch.randint(0, V, (4, 24), generator=torch.Generator().manual_seed(1))
    labels = torch.cat([tokens[:, 1:], torch.full((4, 1), -100)], dim=1)
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.05)
    kd_losses = []
    for _ in range(10):
        logits = student(tokens)
        assert isinstance(logits, list) and len(logits) == CHUNKS
        with torch.no_grad():
            teacher_logits = teacher(tokens)
        kd = kd_fn(logits, teacher_logits, labels)
        (0.5 * ce_fn(logits, labels) + 0.5 * kd).backward()
        optimizer.step()
        optimizer.zero_grad()
        kd_losses.append(kd.item())
    assert kd_losses[-1] < 0.9 * kd_losses[0], kd_losses
