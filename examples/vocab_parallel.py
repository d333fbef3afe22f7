"""Distillation with a vocabulary-parallel student output layer (tensor parallelism), on the CPU.

Run ``torchrun --standalone --nproc-per-node 2 examples/vocab_parallel.py`` (gloo; 10 s measured on two quiet cores).

Every process builds the tiny teacher and student of ``distill_tiny.py`` (the same seeds, so the same weights) and
trains the teacher briefly. The student's output layer is then split by vocabulary over the processes, by hand, as
Megatron-LM's column-parallel output layer does it: rank ``r`` keeps rows ``[offset_r, offset_r + V_r)`` of the
weight (53 words: 27 and 26 rows), computes only its slice of the logits, and ``kd.kd_loss(..., process_group=)``
(AKL, with a hard-label term) returns on every rank the loss of the whole vocabulary, the ranks exchanging only
per-row statistics. The student's hidden states are replicated: their gradient is each rank's part, summed over the
group (:class:`CopyToVocabParallel`, Megatron's "copy to tensor-parallel region"). Rank 0 also trains the same
student on one process with the full output layer and prints both losses at every step, and the largest
difference of the final weights.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_tiny import WORDS, batches, corpus, llama, setup_parser, train_teacher  # noqa: E402

import kdkernels as kd  # noqa: E402

OPTIONS = dict(temperature=2.0, kd_weight=0.5, ce_weight=0.5)


class CopyToVocabParallel(torch.autograd.Function):
    """Identity in the forward; in the backward the gradient ``(..., H)`` summed over ``group``: each rank's slice
    of the logits contributes its part of the gradient of the replicated hidden states."""

    @staticmethod
    def forward(ctx, hidden, group):
        ctx.group = group
        return hidden

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def slice_of(rank: int, world: int, vocab: int) -> slice:
    """Rank ``rank``'s ids: ``vocab`` split as evenly as it goes, the larger slices first."""
    sizes = [vocab // world + (r < vocab % world) for r in range(world)]
    lo = sum(sizes[:rank])
    return slice(lo, lo + sizes[rank])


def student_loss(student, head_weight, teacher, ids, cols: slice, group):
    """Loss of the next-token predictions of ``ids`` ``(B, S)`` with the output rows ``cols`` of the vocabulary
    (all of them when ``group`` is None)."""
    hidden = student.model(input_ids=ids).last_hidden_state[:, :-1]
    if group is not None:
        hidden = CopyToVocabParallel.apply(hidden, group)
    logits = hidden @ head_weight.T  # (B, S - 1, V_r): this rank's slice
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids).logits[:, :-1, cols]
    return kd.kd_loss(logits, teacher_logits, "akl", labels=ids[:, 1:], process_group=group, **OPTIONS)


def train(args, teacher, stream, cols: slice, group) -> tuple[list[float], torch.Tensor]:
    """The student's losses over ``args.steps`` AdamW steps and its final output weight (this rank's rows)."""
    student = llama(args.student_hidden, 1, 2, args.seed + 1, args.seq_len)
    head_weight = torch.nn.Parameter(student.lm_head.weight.detach()[cols].clone())
    params = [p for name, p in student.named_parameters() if not name.startswith("lm_head")] + [head_weight]
    opt = torch.optim.AdamW(params, lr=args.lr)
    losses = []
    for _, ids in zip(range(args.steps), batches(stream, args.seq_len, args.batch_size, args.seed + 2)):
        loss = student_loss(student, head_weight, teacher, ids, cols, group)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, head_weight.detach()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return setup_parser(__doc__, steps=20, teacher_steps=100).parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if "WORLD_SIZE" not in os.environ:
        sys.exit("run me under torchrun: torchrun --standalone --nproc-per-node 2 examples/vocab_parallel.py")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    stream = corpus(20_000, args.seed)
    teacher = train_teacher(args, stream, None)
    cols = slice_of(rank, world, len(WORDS))
    parallel, weight = train(args, teacher, stream, cols, dist.group.WORLD)
    weights = [torch.empty(0)] * world
    dist.all_gather_object(weights, weight)
    if rank == 0:
        single, full_weight = train(args, teacher, stream, slice(None), None)
        print(f"AKL, T={OPTIONS['temperature']}, kd_weight={OPTIONS['kd_weight']}, ce_weight={OPTIONS['ce_weight']}; "
              f"vocabulary of {len(WORDS)} split over {world} ranks as "
              f"{[slice_of(r, world, len(WORDS)).stop - slice_of(r, world, len(WORDS)).start for r in range(world)]}")
        print(f"{'step':>4}  {'vocab-parallel':>14}  {'one process':>11}")
        for step, (a, b) in enumerate(zip(parallel, single), 1):
            print(f"{step:>4}  {a:14.6f}  {b:11.6f}")
        gap = max(abs(a - b) for a, b in zip(parallel, single))
        weight_gap = (torch.cat(weights) - full_weight).abs().max().item()
        print(f"largest loss difference {gap:.2e}; largest output-weight difference after training {weight_gap:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
