"""``causal_lm_kd_loss`` on tiny causal LMs built from configs (no downloads) against full logits.

The reference runs both models to their logits (``model(...).logits``), shifts them and applies the float64
reference loss; the parameter gradients of the student must match those of the fused path. Also: packed
batches, gradient accumulation through ``num_items_in_batch`` (in :class:`~kdkernels.integrations.trainer.KDTrainer`),
padded heads.
"""

from __future__ import annotations

import math

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


def reference_loss(student, teacher, inputs, divergence, vocab=None, **options):
    """Shifted full logits of both models (their first ``vocab`` entries) through the float64 reference."""
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    z = student(**model_inputs).logits[:, :-1, :vocab].double()
    with torch.no_grad():
        t = teacher(**model_inputs).logits[:, :-1, :vocab].double()
    labels = shifted_labels(inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"])
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
    with pytest.raises(ValueError, match=f"vocabulary size.*pass vocab_size={VOCAB} "):
        causal_lm_kd_loss(student, tiny_llama(16, 1, vocab=VOCAB + 1), inputs)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        causal_lm_kd_loss(torch.nn.Linear(2, 2), student, inputs)
    with pytest.raises(TypeError, match="DataParallel is not supported; use DistributedDataParallel"):
        causal_lm_kd_loss(torch.nn.DataParallel(student), tiny_llama(16, 1), inputs)
    with pytest.raises(ValueError, match="input_ids"):
        causal_lm_kd_loss(student, tiny_llama(16, 1), {})


def test_real_softcapping_model_is_refused():
    config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, head_dim=8)
    gemma = transformers.Gemma2ForCausalLM(config)
    with pytest.raises(ValueError, match="student: config.final_logit_softcapping"):
        causal_lm_kd_loss(gemma, tiny_llama(16, 1), batch())


def packed_batch() -> dict:
    """Three sequences packed into one row by ``DataCollatorWithFlattening`` (``position_ids`` restart at 0)."""
    gen = torch.Generator().manual_seed(4)
    features = [{"input_ids": torch.randint(0, VOCAB, (n,), generator=gen).tolist()} for n in (6, 4, 7)]
    return transformers.DataCollatorWithFlattening()(features, return_tensors="pt")


def test_packed_batch_passes_position_ids():
    """With the batch's ``position_ids`` the CE term is the mean CE of the sequences run one by one.

    That is the model's own loss with ``use_cache=False`` (in transformers 5 a cache, on by default, turns off
    the packed-sequence attention mask). Weights drawn with a large ``initializer_range`` so that positions
    matter: without ``position_ids`` the CE differs by about 0.8 here.
    """
    student, teacher = tiny_llama(16, 0, initializer_range=0.5), tiny_llama(24, 1, initializer_range=0.5)
    inputs = packed_batch()
    ids, starts = inputs["input_ids"], (inputs["position_ids"][0] == 0).nonzero().flatten().tolist()
    separate = [ids[:, a:b] for a, b in zip(starts, starts[1:] + [ids.shape[1]])]
    ce_sum = sum(torch.nn.functional.cross_entropy(student(input_ids=x).logits[0, :-1], x[0, 1:], reduction="sum")
                 for x in separate)
    ce = causal_lm_kd_loss(student, teacher, inputs, kd_weight=0.0, ce_weight=1.0)
    torch.testing.assert_close(ce, ce_sum / (ids.shape[1] - len(separate)))
    torch.testing.assert_close(ce, student(**inputs, use_cache=False).loss)
    without = {k: v for k, v in inputs.items() if k != "position_ids"}
    assert (student(**without, use_cache=False).loss - ce).abs() > 0.1  # the test can tell
    fused = causal_lm_kd_loss(student, teacher, inputs, "todi", temperature=2.0, ce_weight=0.5)
    ref = reference_loss(student, teacher, dict(inputs, use_cache=False), "todi", temperature=2.0, ce_weight=0.5)
    assert rel_err(fused, ref) < 1e-5


def test_model_inputs_keeps_what_forward_accepts():
    from kdkernels.integrations.transformers import model_inputs

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    batch = dict(input_ids=1, attention_mask=2, position_ids=3, labels=4, cu_seq_lens_q=5)
    assert model_inputs(Fixed(), batch) == dict(input_ids=1, attention_mask=2)
    assert model_inputs(tiny_llama(16, 0), batch) == dict(input_ids=1, attention_mask=2, position_ids=3,
                                                          cu_seq_lens_q=5, use_cache=False)


def test_num_items_in_batch_divides_the_sum():
    student, teacher = tiny_llama(16, 0), tiny_llama(24, 1)
    inputs = batch()
    total = causal_lm_kd_loss(student, teacher, inputs, "akl", ce_weight=0.5, reduction="sum")
    scaled = causal_lm_kd_loss(student, teacher, inputs, "akl", ce_weight=0.5, num_items_in_batch=torch.tensor(7))
    torch.testing.assert_close(scaled, total / 7)
    with pytest.raises(ValueError, match="num_items_in_batch.*reduction must be 'mean'"):
        causal_lm_kd_loss(student, teacher, inputs, reduction="sum", num_items_in_batch=7)


def test_trainer_gradient_accumulation_1x8_equals_4x2(tmp_path):
    """One SGD step on 8 sequences of different lengths: batch 8 equals 4 accumulated micro-batches of 2.

    The micro-batches hold different numbers of labelled tokens, so a mean per micro-batch would weigh their
    tokens differently (and the Trainer, trusting ``num_items_in_batch``, would not divide by 4).
    """
    pytest.importorskip("accelerate")  # Trainer needs it (the transformers extra installs it)
    from kdkernels.integrations.trainer import KDTrainer

    gen = torch.Generator().manual_seed(5)
    rows = []
    for length in (9, 3, 5, 9, 2, 7, 4, 8):
        ids = torch.randint(0, VOCAB, (9,), generator=gen)
        mask = (torch.arange(9) < length).long()
        rows.append(dict(input_ids=ids, attention_mask=mask, labels=torch.where(mask.bool(), ids, -100)))

    def trained(batch_size, accumulation):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
            max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
            use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True)
        student = tiny_llama(16, 0)
        trainer = KDTrainer(model=student, args=args, train_dataset=rows, teacher=tiny_llama(24, 1), divergence="todi",
                            temperature=2.0, kd_weight=0.5, ce_weight=0.5)
        trainer.train()
        return trainer, dict(student.named_parameters())

    (trainer, whole), (_, accumulated) = trained(8, 1), trained(2, 4)
    assert math.isfinite(trainer.evaluate(rows[:2])["eval_loss"])  # the trainer evaluates too
    start = dict(tiny_llama(16, 0).named_parameters())
    for name, param in whole.items():
        assert rel_err(accumulated[name] - start[name], param - start[name]) < 1e-5, name


def test_vocab_size_uses_first_rows_of_padded_heads():
    """Student head of 40 rows, teacher head of 48 (padded) over one 40-token vocabulary."""
    student, teacher = tiny_llama(16, 0), tiny_llama(24, 1, vocab=VOCAB + 8)
    inputs = batch()
    fused = causal_lm_kd_loss(student, teacher, inputs, "rkl", ce_weight=0.5, vocab_size=VOCAB)
    fused_grads = student_grads(student, fused)
    ref = reference_loss(student, teacher, inputs, "rkl", vocab=VOCAB, ce_weight=0.5)
    ref_grads = student_grads(student, ref)
    assert rel_err(fused, ref) < 1e-5
    for name, grad in ref_grads.items():
        assert rel_err(fused_grads[name], grad) < 1e-4, name


def test_trainer_counts_what_the_loss_counts_and_checks_options(tmp_path):
    """``num_items_in_batch`` is the count of positions the loss keeps (not ``Trainer``'s ``labels[:, 1:] != -100``,
    which takes the left padding of ``batch()`` too); bad loss options fail when the trainer is built."""
    pytest.importorskip("accelerate")
    from kdkernels.integrations.trainer import KDTrainer

    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no")
    trainer = KDTrainer(model=tiny_llama(16, 0), args=args, teacher=tiny_llama(24, 1), divergence="akl",
                        akl_alpha=0.3)
    inputs = batch()
    _, count = trainer.get_batch_samples(iter([inputs, inputs]), 2, torch.device("cpu"))
    kept = (shifted_labels(inputs["input_ids"], inputs["attention_mask"], inputs["labels"]) != -100).sum()
    assert count == 2 * kept and kept < (inputs["labels"][:, 1:] != -100).sum()
    with pytest.raises(ValueError, match="akl_alpha"):
        KDTrainer(model=tiny_llama(16, 0), args=args, teacher=tiny_llama(24, 1), divergence="akl", akl_alpha=2.0)
