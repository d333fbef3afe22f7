"""Sparse teachers end to end (issue 12): the fused output layer, the top-k dump and the Hugging Face loss.

- ``fused_linear_kd_loss`` with ``teacher_indices``/``teacher_logprobs`` equals ``sparse_kd_loss`` of the
  materialised logits (loss and gradients of hidden states, weight and bias), over several chunks.
- ``dump_topk`` then ``read_topk`` gives back, bit for bit, the int32 ids and bfloat16 log-probs of the teacher's
  top-k and the float32 log of its mass outside them, with its metadata; ``causal_lm_sparse_kd_loss`` on a read
  batch equals ``sparse_kd_loss`` of the student's shifted logits with that rest, and without it for a shard that
  has none (written before the rest existed).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdkernels as kd
from tests.utils import BACKENDS, rel_err

VOCAB = 40


def fused_inputs(n=21, hidden=12, k=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen)
    w = torch.randn(VOCAB, hidden, generator=gen) / hidden**0.5
    b = torch.randn(VOCAB, generator=gen)
    t = 2 * torch.randn(n, VOCAB, generator=gen)
    ids, lp = kd.topk_teacher(t, k)
    lp[3, 2] = float("-inf")  # padding
    labels = torch.randint(0, VOCAB, (n,), generator=gen)
    labels[5] = -100
    return h, w, b, ids.to(torch.int32), lp, labels


def grads_of(fn, *tensors):
    leaves = [x.detach().clone().requires_grad_(True) for x in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("divergence", "tail", "options"), [
    ("fkl", "bucket", dict(temperature=2.0, ce_weight=0.5, kd_weight=0.5)),
    ("todi", "renormalize", dict(reduction="sum")),
    ("fkl", "truncate", dict(reduction="mean")),
])
def test_fused_path_equals_materialised_logits(divergence, tail, options, backend):
    h, w, b, ids, lp, labels = fused_inputs()
    common = dict(tail=tail, labels=labels, backend=backend, **options)
    fused = grads_of(lambda h, w, b: kd.fused_linear_kd_loss(h, w, divergence=divergence, student_bias=b,
                                                             teacher_indices=ids, teacher_logprobs=lp,
                                                             chunk_size=8, **common), h, w, b)
    dense = grads_of(lambda h, w, b: kd.sparse_kd_loss(F.linear(h, w, b), ids, lp, divergence, **common), h, w, b)
    assert rel_err(fused[0], dense[0]) <= 1e-6
    for got, want in zip(fused[1], dense[1]):
        assert rel_err(got, want) <= 1e-5


def test_fused_module_and_row_losses():
    """``FusedLinearKDLoss`` takes the sparse teacher too; ``reduction="none"`` recomputes in its backward."""
    h, w, b, ids, lp, labels = fused_inputs(seed=1)
    module = kd.FusedLinearKDLoss("rkl", tail="renormalize", reduction="none", chunk_size=5)
    got = grads_of(lambda h: module(h, w, teacher_indices=ids, teacher_logprobs=lp, labels=labels).sum(), h)
    want = grads_of(lambda h: kd.sparse_kd_loss(F.linear(h, w), ids, lp, "rkl", tail="renormalize",
                                                labels=labels, reduction="none").sum(), h)
    assert rel_err(got[0], want[0]) <= 1e-6 and rel_err(got[1][0], want[1][0]) <= 1e-5
    with pytest.raises(ValueError, match="sparse teacher"):
        kd.fused_linear_kd_loss(h, w, teacher_logits=torch.zeros(21, VOCAB), teacher_indices=ids,
                                teacher_logprobs=lp)
    with pytest.raises(ValueError, match="teacher_logprobs"):
        kd.fused_linear_kd_loss(h, w, teacher_indices=ids, teacher_logprobs=lp[:, :2])


transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from kdkernels.integrations.topk_dump import (  # noqa: E402
    describe,
    dump_topk,
    read_topk,
    teacher_topk,
    topk_metadata,
    write_topk,
)
from kdkernels.integrations.transformers import causal_lm_sparse_kd_loss, shifted_labels  # noqa: E402


def tiny_llama(hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


def batches(n: int):
    gen = torch.Generator().manual_seed(3)
    for _ in range(n):
        input_ids = torch.randint(0, VOCAB, (2, 9), generator=gen)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, :2] = 0
        yield dict(input_ids=input_ids, attention_mask=attention_mask)


def test_dump_round_trip_is_bit_exact(tmp_path):
    teacher = tiny_llama(24, seed=0)
    paths = dump_topk(teacher, batches(5), tmp_path, 8, temperature=2.0, batches_per_shard=2)
    assert [p.name for p in paths] == ["topk-00000.safetensors", "topk-00001.safetensors", "topk-00002.safetensors"]
    meta = topk_metadata(tmp_path)
    assert (meta["k"], meta["vocab_size"], meta["temperature"], meta["logprob_dtype"]) == (8, VOCAB, 2.0, "bfloat16")
    assert '"batches": 5' in describe(tmp_path)
    read = list(read_topk(tmp_path))
    assert len(read) == 5
    for got, batch in zip(read, batches(5)):
        ids, lp, rest = teacher_topk(teacher, batch, 8, temperature=2.0, return_rest=True)  # what the dump computed
        assert got["teacher_rest_logprob"].dtype == torch.float32
        assert torch.equal(got["teacher_rest_logprob"], rest)
        assert torch.equal(got["input_ids"], batch["input_ids"])
        assert torch.equal(got["attention_mask"], batch["attention_mask"])
        assert got["teacher_indices"].dtype == torch.int32 and got["teacher_logprobs"].dtype == torch.bfloat16
        assert torch.equal(got["teacher_indices"], ids.to(torch.int32))
        assert torch.equal(got["teacher_logprobs"].view(torch.int16), lp.to(torch.bfloat16).view(torch.int16))
        # and that is the top-k of the teacher's logits (up to the chunked matmul's rounding)
        with torch.no_grad():
            full_ids, full_lp, full_rest = kd.topk_teacher(teacher(**batch).logits, 8, temperature=2.0,
                                                           return_rest=True)
        assert torch.equal(ids, full_ids) and (lp - full_lp).abs().max() <= 1e-5
        assert (rest - full_rest).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="already holds"):
        dump_topk(teacher, batches(1), tmp_path, 8)


@pytest.mark.parametrize("with_rest", [True, False])
def test_causal_lm_sparse_loss_equals_the_loss_of_its_logits(tmp_path, with_rest):
    teacher, student = tiny_llama(24, seed=0), tiny_llama(16, seed=1)
    dump_topk(teacher, batches(1), tmp_path / "dump", 6)
    (batch,) = read_topk(tmp_path / "dump")
    if not with_rest:  # a shard as written before the rest existed
        write_topk(tmp_path / "old", batch["input_ids"], batch["teacher_indices"], batch["teacher_logprobs"],
                   attention_mask=batch["attention_mask"], temperature=1.0, vocab_size=VOCAB)
        (batch,) = read_topk(tmp_path / "old")
        assert "teacher_rest_logprob" not in batch
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][0, 3] = -100
    options = dict(tail="bucket", temperature=2.0, ce_weight=0.5, kd_weight=0.5)
    got = causal_lm_sparse_kd_loss(student, batch, "todi", **options)
    got_grads = torch.autograd.grad(got, student.lm_head.weight)
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = shifted_labels(batch["input_ids"], batch["attention_mask"], batch["labels"])
    rest = batch["teacher_rest_logprob"][:, :-1] if with_rest else None
    want = kd.sparse_kd_loss(logits, batch["teacher_indices"][:, :-1], batch["teacher_logprobs"][:, :-1], "todi",
                             labels=labels, teacher_rest_logprob=rest, **options)
    want_grads = torch.autograd.grad(want, student.lm_head.weight)
    assert rel_err(got, want) <= 1e-6 and rel_err(got_grads[0], want_grads[0]) <= 1e-5
    if with_rest:  # the batch's rest is used: bfloat16 log-probs sum to 1 only to ~1e-3
        floored = kd.sparse_kd_loss(logits, batch["teacher_indices"][:, :-1], batch["teacher_logprobs"][:, :-1],
                                    "todi", labels=labels, **options)
        assert rel_err(got, floored) > 1e-6
    with pytest.raises(ValueError, match="teacher_indices"):
        causal_lm_sparse_kd_loss(student, {"input_ids": batch["input_ids"]}, "fkl")
