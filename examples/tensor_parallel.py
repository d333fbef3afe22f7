"""Distillation with PyTorch's tensor parallelism: the student's output layer split by vocabulary (DTensor).

Run ``torchrun --standalone --nproc-per-node 2 examples/tensor_parallel.py`` (gloo on the CPU, NCCL on CUDA
devices; no downloads, no transformers).

Every process builds the same tiny teacher and student (an embedding, a residual MLP block and an output layer;
the same seeds, so the same weights) and trains the teacher briefly on a synthetic bigram language: the teacher is
whole on every process (replicated). The student's output layer is split by vocabulary with
``parallelize_module(student, mesh, {"lm_head": ColwiseParallel(use_local_output=False)})``: its weight becomes a
``DTensor`` placed ``Shard(0)`` (51 words: 26 and 25 rows on two processes, ``torch.chunk``'s split), and the
student's logits a ``DTensor`` placed ``Shard(-1)``. ``kd.kd_loss(student_logits, teacher_logits, "fkl", ...)``
reads the process group and each rank's slice of the vocabulary from the DTensor; the teacher's logits are
passed as this rank's slice of the same placement (``distribute_tensor(..., src_data_rank=None)``: every rank has
the whole teacher, so nothing is sent). The loss, a plain tensor, is that of the whole vocabulary on every rank,
and the ranks exchange per-row statistics only, never the logits. The gradient reaches the output weight's shard
as a ``DTensor``, and ``ColwiseParallel`` sums the hidden states' gradient over the group.

Rank 0 also trains the same student on one process, unsharded, on the same batches, and prints both losses at
every step. At the end the output weight is gathered (``full_tensor()``) into an unsharded copy of the student;
rank 0 computes the loss of a held-out batch with it on one process and checks that it equals the tensor-parallel
loss, that every step's losses agree and that the gathered weights equal the one-process student's: "matches one
process".
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

import kdkernels as kd

OPTIONS = dict(temperature=2.0, kd_weight=0.5, ce_weight=0.5)
TOLERANCE = 1e-5  # relative difference allowed between the tensor-parallel and the one-process loss


class TinyLM(nn.Module):
    """Embedding, one residual MLP block, a final norm and an output layer ``lm_head`` ``(V, H)``."""

    def __init__(self, vocab: int, hidden: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, hidden)
        self.block = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 4 * hidden), nn.GELU(),
                                   nn.Linear(4 * hidden, hidden))
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x = x + self.block(x)
        return self.lm_head(self.norm(x))


def bigram_batches(vocab: int, seq_len: int, batch_size: int, seed: int, device: torch.device):
    """Endless ``(B, S)`` token batches from a fixed random bigram chain (each word has a few likely successors);
    the same on every process."""
    gen = torch.Generator().manual_seed(seed)
    transition = torch.softmax(torch.randn(vocab, vocab, generator=gen) * 3.0, dim=-1)
    while True:
        ids = torch.empty(batch_size, seq_len, dtype=torch.int64)
        ids[:, 0] = torch.randint(vocab, (batch_size,), generator=gen)
        for s in range(1, seq_len):
            ids[:, s] = torch.multinomial(transition[ids[:, s - 1]], 1, generator=gen)[:, 0]
        yield ids.to(device)


def train_teacher(args, device: torch.device) -> TinyLM:
    """The teacher, trained on next-token cross-entropy for ``args.teacher_steps`` steps (alike on every rank)."""
    teacher = TinyLM(args.vocab, args.teacher_hidden, args.seed).to(device)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for _, ids in zip(range(args.teacher_steps), bigram_batches(args.vocab, args.seq_len, args.batch_size,
                                                                args.seed + 1, device)):
        logits = teacher(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, args.vocab), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return teacher.requires_grad_(False).eval()


def kd_step_loss(student: TinyLM, teacher: TinyLM, ids: torch.Tensor) -> torch.Tensor:
    """The loss of the next-token predictions of ``ids`` ``(B, S)``. With a tensor-parallel student its logits are
    a ``Shard(-1)`` DTensor, and the teacher's logits are given as the same placement of the replicated teacher's;
    else all plain tensors (the one-process loss)."""
    logits = student(ids[:, :-1])
    with torch.no_grad():
        teacher_logits = teacher(ids[:, :-1])
    if isinstance(logits, DTensor):  # this rank's slice of the teacher's logits: no communication
        teacher_logits = distribute_tensor(teacher_logits, logits.device_mesh, logits.placements, src_data_rank=None)
    return kd.kd_loss(logits, teacher_logits, "fkl", labels=ids[:, 1:], **OPTIONS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="student training steps")
    parser.add_argument("--teacher-steps", type=int, default=60, help="teacher training steps")
    parser.add_argument("--vocab", type=int, default=51, help="vocabulary size (any; need not divide evenly)")
    parser.add_argument("--hidden", type=int, default=16, help="student hidden size")
    parser.add_argument("--teacher-hidden", type=int, default=48, help="teacher hidden size")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def train(student: TinyLM, teacher: TinyLM, args, device: torch.device) -> list[float]:
    """The student's losses over ``args.steps`` AdamW steps (tensor-parallel or not, as ``student`` is)."""
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, foreach=False)
    losses = []
    batches = bigram_batches(args.vocab, args.seq_len, args.batch_size, args.seed + 3, device)
    for _, ids in zip(range(args.steps), batches):
        loss = kd_step_loss(student, teacher, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def relative_gap(a, b) -> float:
    return (torch.as_tensor(a) - torch.as_tensor(b)).abs().max().item() / torch.as_tensor(b).abs().max().item()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if "WORLD_SIZE" not in os.environ:
        sys.exit("run me under torchrun: torchrun --standalone --nproc-per-node 2 examples/tensor_parallel.py")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("tp",))

    teacher = train_teacher(args, device)
    student = TinyLM(args.vocab, args.hidden, args.seed + 2).to(device)
    parallelize_module(student, mesh, {"lm_head": ColwiseParallel(use_local_output=False)})
    parallel = train(student, teacher, args, device)
    held_out = next(bigram_batches(args.vocab, args.seq_len, args.batch_size, args.seed + 4, device))
    with torch.no_grad():
        parallel_held_out = kd_step_loss(student, teacher, held_out).item()
        # every rank takes part in gathering the sharded weights
        state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in student.state_dict().items()}
    if rank == 0:
        twin = TinyLM(args.vocab, args.hidden, args.seed + 2).to(device)
        single = train(twin, teacher, args, device)
        gathered = TinyLM(args.vocab, args.hidden, args.seed + 2).to(device)
        gathered.load_state_dict(state)
        with torch.no_grad():
            single_held_out = kd_step_loss(gathered, teacher, held_out).item()
        rows = [t.shape[0] for t in torch.arange(args.vocab).chunk(world)]
        print(f"FKL, {', '.join(f'{k}={v}' for k, v in OPTIONS.items())}; vocabulary of {args.vocab} split over "
              f"{world} ranks as {rows} (lm_head.weight: {student.lm_head.weight.placements})")
        print(f"{'step':>4}  {'tensor-parallel':>15}  {'one process':>11}")
        for step, (a, b) in enumerate(zip(parallel, single), 1):
            print(f"{step:>4}  {a:15.6f}  {b:11.6f}")
        gaps = {"held-out loss": relative_gap(parallel_held_out, single_held_out),
                "training losses": relative_gap(parallel, single),
                "output weight": relative_gap(state["lm_head.weight"], twin.lm_head.weight.detach())}
        print(f"held-out batch: tensor-parallel loss {parallel_held_out:.6f}, one process (gathered weights) "
              f"{single_held_out:.6f}")
        print("relative gaps: " + ", ".join(f"{name} {gap:.1e}" for name, gap in gaps.items()))
        if max(gaps.values()) > TOLERANCE:
            sys.exit(f"the tensor-parallel run differs from one process's by more than {TOLERANCE:g}: {gaps}")
        print("matches one process")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
