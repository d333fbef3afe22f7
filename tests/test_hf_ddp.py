"""``KDTrainer`` on a data-parallel student: 2 gloo processes on the CPU train like one process.

Each process runs ``KDTrainer.train()`` as ``torchrun`` would start it (``RANK``, ``WORLD_SIZE``, ... in the
environment): accelerate initialises the gloo group, the ``Trainer`` wraps the student in DDP, deals each process half
of the 4 sequences, counts ``num_items_in_batch`` over both processes, and the trainer multiplies the loss by the
number of processes (DDP averages the gradients). The halves hold different numbers of labelled tokens, so a plain
mean per process would not give the same step. Accelerate runs FSDP on GPUs only, so the FSDP copy (``fully_shard``,
the output layer a unit of its own so that its weight is gathered only inside its forward) is sharded by hand and
trained by a plain SGD loop through the same trainer's ``compute_loss``. After three SGD steps both copies must equal
one process training the student on the whole batch with ``KDTrainer``. A sharded teacher is refused.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it (the transformers extra installs it)
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from bench.vocab_parallel import leave_rank  # noqa: E402
from kdkernels.integrations.trainer import KDTrainer  # noqa: E402
from kdkernels.integrations.transformers import causal_lm_kd_loss, shifted_labels  # noqa: E402
from tests.utils import rel_err  # noqa: E402

WORLD = 2
STEPS = 3
LOSS = dict(divergence="todi", temperature=2.0, ce_weight=0.5)


def models():
    """The tiny student (trainable) and teacher, the same in every process."""

    def llama(hidden, seed):
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(vocab_size=40, hidden_size=hidden, intermediate_size=2 * hidden,
                                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                          max_position_embeddings=16, initializer_range=0.3)
        return transformers.LlamaForCausalLM(config)

    return llama(16, 0), llama(24, 1).eval().requires_grad_(False)


def rows() -> list[dict]:
    """4 sequences; the second is left-padded, so the processes' halves hold different numbers of labels."""
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 40, (4, 9), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    labels = torch.where(attention_mask.bool(), input_ids, -100)
    return [dict(input_ids=i, attention_mask=m, labels=y) for i, m, y in zip(input_ids, attention_mask, labels)]


def trainer(student, teacher, out: str, batch_size: int) -> KDTrainer:
    """The same batch every step (4 rows in all), SGD at a constant rate, no clipping: steps comparable exactly."""
    args = transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=batch_size, max_steps=STEPS, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=0.0, use_cpu=True, report_to=[],
        save_strategy="no", logging_strategy="no", disable_tqdm=True)
    return KDTrainer(model=student, args=args, train_dataset=rows(), teacher=teacher, **LOSS)


def _worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    student, teacher = models()
    ddp = trainer(student, teacher, out, batch_size=2)
    ddp.train()
    assert isinstance(ddp.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    results = {"ddp": {name: p.detach().clone() for name, p in student.named_parameters()}}

    student, _ = models()
    fully_shard(student.lm_head)
    model = fully_shard(student)
    batch = {key: torch.stack([row[key] for row in rows()]) for key in rows()[0]}
    count = (shifted_labels(batch["input_ids"], batch["attention_mask"], batch["labels"]) != -100).sum()
    half = {key: value[2 * rank:2 * rank + 2] for key, value in batch.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(STEPS):
        ddp.compute_loss(model, half, num_items_in_batch=count).backward()  # the trainer's loss, times WORLD
        optimizer.step()
        optimizer.zero_grad()
    results["fsdp"] = {name: p.full_tensor().detach().clone() for name, p in student.named_parameters()}
    with pytest.raises(TypeError, match="sharded .* teachers are not supported"):
        causal_lm_kd_loss(teacher, student, half)  # the teacher's weight is read outside its forward
    if rank == 0:
        torch.save(results, os.path.join(out, "params.pt"))
    dist.destroy_process_group()
    leave_rank()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD)
    student, teacher = models()
    start = {name: p.detach().clone() for name, p in student.named_parameters()}
    trainer(student, teacher, str(tmp_path), batch_size=4).train()
    results = torch.load(tmp_path / "params.pt")
    for kind, params in results.items():
        for name, param in student.named_parameters():
            step = param.detach() - start[name]
            assert rel_err(params[name] - start[name], step) < 1e-4, (kind, name)
