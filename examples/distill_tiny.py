"""A complete small distillation run on the CPU, with no downloads.

1. A corpus from a synthetic grammar (noun/verb number agreement, adjectives, prepositional phrases),
   generated here and split into training and held-out token streams.
2. A teacher causal LM built from a ``transformers.LlamaConfig`` and trained briefly on next-token CE.
3. Students (a smaller Llama, all from the same initialisation) trained on the same batches through the
   fused output layer + loss (:func:`kdkernels.integrations.transformers.causal_lm_kd_loss`): one per
   divergence (fkl, rkl, akl, todi and the baselines sfkl, srkl, jsd, tvd), and one with the hard-label
   cross-entropy only, for comparison.
4. A table of held-out CE / perplexity / KL(teacher || student), and a PNG of the held-out CE curves, written
   to the system's temporary directory unless ``--out`` names a path (``--out examples/distill_tiny.png``
   regenerates the README's figure).

Run ``python examples/distill_tiny.py`` (about 30 s: 29 s measured, imports included, on this project's quiet
two-core CPU machine); ``--help`` lists the settings and their defaults.
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kdkernels as kd
from kdkernels.integrations.transformers import causal_lm_kd_loss
from kdkernels.torch_ops.reference import DIVERGENCES

DETERMINERS = {"sg": ["the", "a", "every", "this"], "pl": ["the", "some", "many", "these", "two"]}
NOUNS = {"sg": ["cat", "dog", "bird", "child", "robot", "farmer", "river", "tree"],
         "pl": ["cats", "dogs", "birds", "children", "robots", "farmers", "rivers", "trees"]}
VERBS = {"sg": ["sees", "likes", "follows", "paints", "finds", "hears"],
         "pl": ["see", "like", "follow", "paint", "find", "hear"]}
INTRANSITIVE = {"sg": ["sleeps", "runs", "sings"], "pl": ["sleep", "run", "sing"]}
ADJECTIVES = ["red", "small", "old", "happy", "quiet", "green"]
PREPOSITIONS = ["near", "under", "behind", "with"]
WORDS = sorted({w for group in (DETERMINERS, NOUNS, VERBS, INTRANSITIVE) for ws in group.values() for w in ws}
               | set(ADJECTIVES) | set(PREPOSITIONS) | {"."})
TOKEN = {w: i for i, w in enumerate(WORDS)}
# One student per divergence (each with its default parameters), and one on the hard labels only.
RUNS = {**{name: dict(divergence=name) for name in DIVERGENCES},
        "ce only": dict(divergence="fkl", kd_weight=0.0, ce_weight=1.0)}
LINES = {"sfkl": "-.", "srkl": "-.", "jsd": "-.", "tvd": "-.", "ce only": "--"}  # baselines dash-dotted


def noun_phrase(rng: random.Random, depth: int = 0) -> list[str]:
    number = rng.choice(("sg", "pl"))
    words = [rng.choice(DETERMINERS[number])]
    words += rng.sample(ADJECTIVES, k=rng.choice((0, 0, 1, 2)))
    words.append(rng.choice(NOUNS[number]))
    if depth == 0 and rng.random() < 0.3:
        words += [rng.choice(PREPOSITIONS), *noun_phrase(rng, depth + 1)]
    return words


def sentence(rng: random.Random) -> list[str]:
    """Subject, a verb agreeing with the subject's noun in number, an optional object, a full stop."""
    subject = noun_phrase(rng, depth=1)
    number = "pl" if subject[-1] in NOUNS["pl"] else "sg"
    if rng.random() < 0.25:
        return [*subject, rng.choice(INTRANSITIVE[number]), "."]
    return [*subject, rng.choice(VERBS[number]), *noun_phrase(rng), "."]


def corpus(n_tokens: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += [TOKEN[w] for w in sentence(rng)]
    return torch.tensor(ids[:n_tokens])


def batches(stream: torch.Tensor, seq_len: int, batch_size: int, seed: int):
    """Endless random windows ``(batch_size, seq_len)`` of the token stream."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, stream.numel() - seq_len, (batch_size,), generator=gen)
        yield stream[starts[:, None] + torch.arange(seq_len)]


def llama(hidden: int, layers: int, heads: int, seed: int, seq_len: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=seq_len, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


@torch.no_grad()
def evaluate(model, teacher, held_out: torch.Tensor) -> tuple[float, float]:
    """Held-out next-token CE and forward KL(teacher || model), per token."""
    model.eval()
    logits = model(input_ids=held_out).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), held_out[:, 1:].reshape(-1))
    kl = kd.kd_loss(logits, teacher(input_ids=held_out).logits[:, :-1], "fkl") if teacher is not None else 0.0
    model.train()
    return float(ce), float(kl)


def train_teacher(args, train, held_out) -> LlamaForCausalLM:
    teacher = llama(args.teacher_hidden, 2, 4, args.seed, args.seq_len)
    opt = torch.optim.AdamW(teacher.parameters(), lr=args.lr)
    for _, ids in zip(range(args.teacher_steps), batches(train, args.seq_len, args.batch_size, args.seed)):
        loss = teacher(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return teacher.eval().requires_grad_(False)


def distill(args, name, options, teacher, train, held_out) -> list[tuple[int, float]]:
    """Train one student; returns ``(step, held-out CE)`` every ``eval_every`` steps."""
    student = llama(args.student_hidden, 1, 2, args.seed + 1, args.seq_len)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    curve = [(0, evaluate(student, None, held_out)[0])]
    options = dict(temperature=args.temperature, **options)
    stream = batches(train, args.seq_len, args.batch_size, args.seed + 2)  # the same batches for every run
    for step, ids in zip(range(1, args.steps + 1), stream):
        loss = causal_lm_kd_loss(student, teacher, {"input_ids": ids}, **options)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.eval_every == 0:
            curve.append((step, evaluate(student, None, held_out)[0]))
    args.results[name] = evaluate(student, teacher, held_out)
    return curve


def plot(curves: dict, teacher_ce: float, path: Path) -> None:
    """The whole held-out CE curves (left) and their second half, where the runs separate, enlarged (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    last = max(step for curve in curves.values() for step, _ in curve)
    for ax, first in zip(axes, (0, last // 2)):
        for name, curve in curves.items():
            steps, ce = zip(*[(step, value) for step, value in curve if step >= first])
            ax.plot(steps, ce, label=name, linestyle=LINES.get(name, "-"))
        ax.axhline(teacher_ce, color="black", linewidth=0.8, linestyle=":", label="teacher")
        ax.set_xlabel("student step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out cross-entropy (nats)")
    axes[0].set_title("whole run", fontsize=9)
    axes[1].set_title("second half, enlarged", fontsize=9)
    axes[1].legend(ncol=2, fontsize=8)
    fig.suptitle("Distilling a tiny Llama on a synthetic grammar (kdkernels fused loss)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def setup_parser(doc: str, steps: int = 150, teacher_steps: int = 300) -> argparse.ArgumentParser:
    """The options every tiny-Llama example shares (corpus, models, training), with ``doc``'s first line."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=steps, help="training steps per student")
    parser.add_argument("--teacher-steps", type=int, default=teacher_steps, help="training steps of the teacher")
    parser.add_argument("--teacher-hidden", type=int, default=96, help="teacher hidden size (2 layers)")
    parser.add_argument("--student-hidden", type=int, default=32, help="student hidden size (1 layer)")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per training window")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus, the models and the batches")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = setup_parser(__doc__)
    parser.add_argument("--temperature", type=float, default=2.0, help="distillation temperature (the README recipe's)")
    parser.add_argument("--eval-every", type=int, default=10, help="student steps between held-out evaluations")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for models this small)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "distill_tiny.png",
                        help="where to write the PNG of the held-out CE curves")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train = corpus(200_000, args.seed)
    held_out = corpus(64 * args.seq_len, args.seed + 100).reshape(64, args.seq_len)
    teacher = train_teacher(args, train, held_out)
    teacher_ce = evaluate(teacher, None, held_out)[0]
    print(f"vocabulary {len(WORDS)} words; teacher trained in {time.perf_counter() - start:.0f} s")
    args.results = {}
    curves = {name: distill(args, name, options, teacher, train, held_out) for name, options in RUNS.items()}
    print(f"\n{'model':<10} {'held-out CE':>12} {'perplexity':>11} {'KL(teacher||model)':>19}")
    print(f"{'teacher':<10} {teacher_ce:>12.4f} {math.exp(teacher_ce):>11.3f} {0.0:>19.4f}")
    for name, (ce, kl) in args.results.items():
        print(f"{name:<10} {ce:>12.4f} {math.exp(ce):>11.3f} {kl:>19.4f}")
    plot(curves, teacher_ce, args.out)
    print(f"\nwrote {args.out}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
