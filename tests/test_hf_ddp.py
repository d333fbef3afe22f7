"""``causal_lm_kd_loss`` on a data-parallel student: 2 gloo processes on the CPU train like one process.

Each process trains a DDP-wrapped copy and an FSDP-sharded copy (``fully_shard``, the output layer a unit of
its own so that its weight is gathered only inside its forward) of the tiny student on its half of the batch,
as the README's ``Trainer`` recipe does it: ``num_items_in_batch`` is the count of labelled tokens of the whole
batch and the loss is multiplied by the number of processes (their gradients are averaged). The halves hold
different numbers of labelled tokens, so a plain mean per process would not give the same step. After three
SGD steps both copies must equal one process trained on the whole batch with the plain mean. A sharded
teacher is refused.
"""

from __future__ import annotations

import datetime

import pytest
import torch

transformers = pytest.importorskip("transformers")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from kdkernels.integrations.transformers import causal_lm_kd_loss, shifted_labels  # noqa: E402
from tests.utils import rel_err  # noqa: E402

WORLD = 2
STEPS = 3


def models():
    """The tiny student (trainable) and teacher, the same in every process."""

    def llama(hidden, seed):
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(vocab_size=40, hidden_size=hidden, intermediate_size=2 * hidden,
                                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                          max_position_embeddings=16, initializer_range=0.3)
        return transformers.LlamaForCausalLM(config)

    return llama(16, 0), llama(24, 1).eval().requires_grad_(False)


def full_batch() -> dict:
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 40, (4, 9), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # the first half has fewer labelled tokens than the second
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids.clone())


def train(model, teacher, batch, scale=1, num_items_in_batch=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(STEPS):
        loss = causal_lm_kd_loss(model, teacher, batch, "todi", temperature=2.0, ce_weight=0.5,
                                 num_items_in_batch=num_items_in_batch)
        (loss * scale).backward()
        optimizer.step()
        optimizer.zero_grad()


def _worker(rank: int, store: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    batch = full_batch()
    count = (shifted_labels(batch["input_ids"], batch["attention_mask"], batch["labels"]) != -100).sum()
    half = {key: value[2 * rank:2 * rank + 2] for key, value in batch.items()}
    results = {}
    for kind in ("ddp", "fsdp"):
        student, teacher = models()
        if kind == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(student)
        else:
            fully_shard(student.lm_head)
            model = fully_shard(student)
        train(model, teacher, half, scale=WORLD, num_items_in_batch=count)
        results[kind] = {name: (p.full_tensor() if kind == "fsdp" else p).detach().clone()
                         for name, p in student.named_parameters()}
    with pytest.raises(TypeError, match="sharded .* teachers are not supported"):
        causal_lm_kd_loss(teacher, student, half)  # the teacher's weight is read outside its forward
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def test_two_processes_train_like_one(tmp_path):
    out = tmp_path / "params.pt"
    torch.multiprocessing.spawn(_worker, args=(str(tmp_path / "store"), str(out)), nprocs=WORLD)
    student, teacher = models()
    start = {name: p.detach().clone() for name, p in student.named_parameters()}
    train(student, teacher, full_batch())
    results = torch.load(out)
    for kind, params in results.items():
        for name, param in student.named_parameters():
            step = param.detach() - start[name]
            assert rel_err(params[name] - start[name], step) < 1e-4, (kind, name)
