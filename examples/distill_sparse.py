"""Offline distillation from a top-k dump of the teacher, on the CPU, with no downloads.

1. The corpus and teacher of ``examples/distill_tiny.py`` (a synthetic grammar; a 2-layer Llama trained briefly).
2. The teacher's top-k log-probs over every training batch the students will see are dumped to safetensors shards
   (:mod:`kdkernels.integrations.topk_dump`: int32 ids, bfloat16 log-probs, and the float32 log of the mass outside
   the top-k, which the bucket tail uses), then the teacher is no longer needed.
3. Students (the same initialisation and batches) trained from the dump with each tail of
   :func:`kdkernels.integrations.transformers.causal_lm_sparse_kd_loss` (forward KL), beside one distilled from the
   dense teacher (:func:`~kdkernels.integrations.transformers.causal_lm_kd_loss`) and one on cross-entropy only.
4. A table of held-out CE / perplexity / KL(teacher || student) of each.

Run ``python examples/distill_sparse.py`` (18 s measured, imports included, on this project's quiet two-core CPU
machine); ``--help`` lists the settings and their defaults.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_tiny import WORDS, batches, corpus, evaluate, llama, setup_parser, train_teacher  # noqa: E402

from kdkernels.integrations.topk_dump import describe, dump_topk, read_topk  # noqa: E402
from kdkernels.integrations.transformers import causal_lm_kd_loss, causal_lm_sparse_kd_loss  # noqa: E402

RUNS = {"dense teacher": None, "top-k bucket": "bucket", "top-k renormalize": "renormalize",
        "top-k truncate": "truncate", "ce only": None}


def train_student(args, name: str, teacher, train: torch.Tensor, dump: Path) -> torch.nn.Module:
    """One student on the same batches: from the dense teacher, from the dump with ``RUNS[name]``, or on CE."""
    student = llama(args.student_hidden, 1, 2, args.seed + 1, args.seq_len)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    windows = batches(train, args.seq_len, args.batch_size, args.seed + 2)
    for ids, stored in zip(itertools.islice(windows, args.steps), read_topk(dump)):
        assert torch.equal(ids, stored["input_ids"])  # the dump is aligned with the student's tokens
        if name == "dense teacher":
            loss = causal_lm_kd_loss(student, teacher, {"input_ids": ids}, "fkl", temperature=args.temperature)
        elif name == "ce only":
            loss = causal_lm_sparse_kd_loss(student, stored, "fkl", kd_weight=0.0, ce_weight=1.0)
        else:
            loss = causal_lm_sparse_kd_loss(student, stored, "fkl", tail=RUNS[name], temperature=args.temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = setup_parser(__doc__)
    parser.add_argument("--k", type=int, default=16, help="teacher entries kept per token (of 53)")
    parser.add_argument("--temperature", type=float, default=2.0,
                        help="distillation temperature (of the dump's log-probs and of the student)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for models this small)")
    parser.add_argument("--dump", type=Path, default=None,
                        help="keep the top-k shards in this directory; without it they go to a temporary directory, "
                             "removed at the end")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train = corpus(200_000, args.seed)
    held_out = corpus(64 * args.seq_len, args.seed + 100).reshape(64, args.seq_len)
    teacher = train_teacher(args, train, held_out)
    print(f"vocabulary {len(WORDS)} words; teacher trained in {time.perf_counter() - start:.0f} s")
    with tempfile.TemporaryDirectory(prefix="kdkernels-topk-") as scratch:
        distill(args, teacher, train, held_out, args.dump or Path(scratch), start)


def distill(args, teacher, train: torch.Tensor, held_out: torch.Tensor, dump: Path, start: float) -> None:
    """Dump the teacher's top-k to ``dump``, train a student per run from it, print the table."""
    windows = batches(train, args.seq_len, args.batch_size, args.seed + 2)  # the students' batches
    dump_topk(teacher, ({"input_ids": ids} for ids in itertools.islice(windows, args.steps)), dump, args.k,
              temperature=args.temperature)
    print(f"top-{args.k} dump in {dump}: {describe(dump)}")
    results = {name: evaluate(train_student(args, name, teacher, train, dump), teacher, held_out) for name in RUNS}
    teacher_ce = evaluate(teacher, None, held_out)[0]
    print(f"\n{'model':<18} {'held-out CE':>12} {'perplexity':>11} {'KL(teacher||model)':>19}")
    print(f"{'teacher':<18} {teacher_ce:>12.4f} {math.exp(teacher_ce):>11.3f} {0.0:>19.4f}")
    for name, (ce, kl) in results.items():
        print(f"{name:<18} {ce:>12.4f} {math.exp(ce):>11.3f} {kl:>19.4f}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
