"""``causal_lm_kd_loss`` on tiny causal LMs built from configs (no downloads) against full logits.

The reference runs both models to their logits (``model(...).logits``), shifts them and applies the float64
reference loss; the parameter gradients of the student must match those of the fused path.
"""

from __future__ import annotations

import pytest
import torch

from kdkernels.torch_ops.reference import kd_loss_reference
from tests.utils import rel_err

transformers = pytest.importorskip("transformers")
from kdkernels.integrations.transformers import causal_lm_kd_loss, shifted_labels  # noqa: E402

VOCAB = 40


def tiny_llama(hidden: int, seed: int, vocab: int = VOCAB, **config) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=32, **config)
    return transformers.LlamaForCausalLM(cfg).eval()


def with_head_bias(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Replace the output layer by one with a bias (the model's forward uses it too)."""
    head = model.lm_head
    torch.manual_seed(seed)
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
    model.lm_head = biased
    return model


def batch() -> dict:
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, VOCAB, (2, 9), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding
    labels = input_ids.clone()
    labels[0, 4] = -100
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def reference_loss(student, teacher, inputs, divergence, **options):
    """Shifted full logits of both models through the float64 reference."""
    model_inputs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    z = student(**model_inputs).logits[:, :-1].double()
    with torch.no_grad():
        t = teacher(**model_inputs).logits[:, :-1].double()
    labels = shifted_labels(inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
    return kd_loss_reference(z, t, divergence, labels=labels, **options)


def student_grads(student, loss):
    student.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("divergence,options,bias", [
    ("fkl", dict(), False),
    ("todi", dict(temperature=2.0, kd_weight=0.5, ce_weight=0.5), True),
    ("akl", dict(ce_weight=0.2, reduction="sum"), False),
    ("rkl", dict(temperature=1.5), True),
])
def test_gradients_match_full_logits(divergence, options, bias):
    student, teacher = tiny_llama(16, 0), tiny_llama(24, 1)
    if bias:
        student, teacher = with_head_bias(student, 2), with_head_bias(teacher, 3)
    inputs = batch()
    fused = causal_lm_kd_loss(student, teacher, inputs, divergence, chunk_size=5, **options)
    fused_grads = student_grads(student, fused)
    ref = reference_loss(student, teacher, inputs, divergence, **options)
    ref_grads = student_grads(student, ref)
    assert rel_err(fused, ref) < 1e-5
    assert fused_grads.keys() == ref_grads.keys() and "lm_head.weight" in fused_grads
    assert not bias or "lm_head.bias" in fused_grads
    for name, grad in ref_grads.items():
        assert rel_err(fused_grads[name], grad) < 1e-4, (name, rel_err(fused_grads[name], grad))
    assert all(p.grad is None for p in teacher.parameters())


def test_shifted_labels_masks_padding_and_ignored():
    inputs = batch()
    labels = shifted_labels(inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
    assert labels.shape == (2, 8)
    assert labels[0, 3] == -100  # target position 4 was unlabelled
    assert (labels[1, :3] == -100).all()  # padding, or padding predicting the first token
    assert torch.equal(labels[1, 3:], inputs["input_ids"][1, 4:])


def test_refuses_softcapping_logit_scale_and_vocab_mismatch():
    inputs = batch()
    student = tiny_llama(16, 0)
    capped = tiny_llama(16, 1)
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        causal_lm_kd_loss(student, capped, inputs)
    scaled = tiny_llama(16, 1)
    scaled.config.logit_scale = 0.0625
    with pytest.raises(ValueError, match="teacher: config.logit_scale"):
        causal_lm_kd_loss(student, scaled, inputs)
    with pytest.raises(ValueError, match="vocabulary size"):
        causal_lm_kd_loss(student, tiny_llama(16, 1, vocab=VOCAB + 1), inputs)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        causal_lm_kd_loss(torch.nn.Linear(2, 2), student, inputs)
    with pytest.raises(ValueError, match="input_ids"):
        causal_lm_kd_loss(student, tiny_llama(16, 1), {})


def test_real_softcapping_model_is_refused():
    config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, head_dim=8)
    gemma = transformers.Gemma2ForCausalLM(config)
    with pytest.raises(ValueError, match="student: config.final_logit_softcapping"):
        causal_lm_kd_loss(gemma, tiny_llama(16, 1), batch())
