"""``python -m bench.vocab_parallel``: wall time of the vocabulary-parallel loss on the CPU (torch backend, gloo).

``--world`` processes (default 2) join a gloo group (rendezvous through a file in a temporary directory), each with
``torch.set_num_threads(max(1, os.cpu_count() // world))``. Every rank draws the same float32 ``(N, V)`` logits from
a fixed seed (student ``2·randn``, teacher ``2·randn``; labels uniform in ``[0, V)`` with every 64th row, at least
one, set to ``-100``) and keeps its own columns, rank ``r`` its part of ``torch.tensor_split(range(V), world)``.

Per divergence, each rank calls ``kdkernels.kd_loss(z_r, t_r, divergence, labels=labels, process_group=group,
backend="torch")``: ``--warmup`` untimed calls (the torch backend may ``torch.compile`` its chunk functions on the
first call; the first call's time is reported apart), then ``--repeat`` timed calls of the forward (under
``torch.no_grad()``) and of the forward + backward (``loss.backward()`` into a leaf ``z_r``, its ``.grad`` cleared
between calls, outside the timing). A ``dist.barrier()`` precedes each timed call; a call's time is the largest
over the ranks (all-reduce MAX of the wall times), and the table gives the median over the calls.

The script uses only ``kdkernels.kd_loss(..., process_group=...)`` (and reads ``kdkernels.__file__``), so it runs
against any checkout of the package that has it, old or new: put that checkout first on ``PYTHONPATH`` and run
this file as a script (``python /path/to/bench/vocab_parallel.py``); ``kdkernels_path``, ``commit`` and
``dirty`` (uncommitted changes under the package) in the JSON say which code ran.

``--json PATH`` writes ``{"rows", "vocab", "world", "threads", "torch", "commit", "kdkernels_path", "results":
{divergence: {"forward_ms", "forward_backward_ms", ...}}, ...}``; ``--compare A.json B.json`` prints two such
files side by side (a Markdown table) with the ratio B / A per divergence.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DIVERGENCES = ("fkl", "rkl", "akl", "todi", "sfkl", "srkl", "jsd", "tvd")
IGNORE_EVERY = 64  # every 64th row's label is -100 (ignored)
SEED = 0


def _comma_list(text: str) -> tuple[str, ...]:
    items = tuple(x for x in text.split(",") if x)
    if not items or any(x not in DIVERGENCES for x in items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {','.join(DIVERGENCES)}, got {text!r}")
    return items


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.vocab_parallel", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=_positive, default=2048, help="N, rows (default 2048)")
    p.add_argument("--vocab", type=_positive, default=32000, help="V, the whole vocabulary (default 32000)")
    p.add_argument("--world", type=_positive, default=2, help="processes, the vocabulary split evenly (default 2)")
    p.add_argument("--divergences", type=_comma_list, default=DIVERGENCES,
                   help=f"comma-separated (default: all, {','.join(DIVERGENCES)})")
    p.add_argument("--warmup", type=_non_negative, default=2, help="untimed calls first, each way (default 2)")
    p.add_argument("--repeat", type=_positive, default=5, help="timed calls, each way (default 5)")
    p.add_argument("--temperature", type=float, default=1.0, help="temperature (default 1.0)")
    p.add_argument("--ce-weight", type=float, default=0.0, help="hard-label weight (default 0.0)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="torch threads per process (default: max(1, cpu_count // world))")
    p.add_argument("--json", metavar="PATH", help="also write the results to PATH as JSON (default: none)")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="print two --json files side by side with the ratio B/A instead of running (default: off)")
    return p


def inputs(rows: int, vocab: int, rank: int, world: int):
    """This rank's float32 slices ``z``, ``t`` ``(rows, V_r)`` (contiguous) and the global labels ``(rows,)``."""
    gen = torch.Generator().manual_seed(SEED)
    z = 2.0 * torch.randn(rows, vocab, generator=gen)
    t = 2.0 * torch.randn(rows, vocab, generator=gen)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[::IGNORE_EVERY] = -100
    columns = torch.tensor_split(torch.arange(vocab), world)[rank]
    lo, hi = (int(columns[0]), int(columns[-1]) + 1) if len(columns) else (0, 0)
    return z[:, lo:hi].contiguous(), t[:, lo:hi].contiguous(), labels


def package_info() -> dict:
    """Where ``kdkernels`` is imported from, its repository's ``HEAD`` and whether the package has changes."""
    import kdkernels

    path = Path(kdkernels.__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--", ".")
    return dict(kdkernels_path=str(path), commit=git("rev-parse", "HEAD"),
                dirty=None if status is None else bool(status))


def _worker(rank: int, world: int, store: str, cfg: dict, out_path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(cfg["threads"])
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(hours=2))
    try:
        import kdkernels

        group = dist.group.WORLD
        z, t, labels = inputs(cfg["rows"], cfg["vocab"], rank, world)
        z_leaf = z.clone().requires_grad_()
        options = dict(labels=labels, process_group=group, backend="torch", temperature=cfg["temperature"],
                       ce_weight=cfg["ce_weight"])

        def forward(divergence):
            with torch.no_grad():
                kdkernels.kd_loss(z, t, divergence, **options)

        def forward_backward(divergence):
            kdkernels.kd_loss(z_leaf, t, divergence, **options).backward()

        def timed(fn, divergence) -> float:
            z_leaf.grad = None
            dist.barrier()
            start = time.perf_counter()
            fn(divergence)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            return elapsed.item()

        results = {}
        for divergence in cfg["divergences"]:
            row = {}
            for name, fn in (("forward", forward), ("forward_backward", forward_backward)):
                warm = [timed(fn, divergence) for _ in range(cfg["warmup"])]
                samples = [1e3 * timed(fn, divergence) for _ in range(cfg["repeat"])]
                row[f"{name}_ms"] = statistics.median(samples)
                row[f"{name}_samples_ms"] = samples
                row[f"{name}_first_call_s"] = warm[0] if warm else None
            results[divergence] = row
            if rank == 0:
                print(f"  {divergence:<5} forward {row['forward_ms']:10.2f} ms   fwd+bwd "
                      f"{row['forward_backward_ms']:10.2f} ms", file=sys.stderr, flush=True)
        if rank == 0:
            Path(out_path).write_text(json.dumps(dict(results=results, kdkernels_file=kdkernels.__file__)))
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()
    leave_rank()


def leave_rank() -> None:
    """End a spawned rank that has written its results and destroyed its group, without finalising the interpreter.

    Once ``torch._dynamo`` is imported (the functional collectives of kdkernels' vocabulary-parallel path import
    it), the gloo group and its worker threads outlive ``destroy_process_group`` (torch 2.13). A worker thread that
    frees its last collective's tensors after the interpreter started finalising waits for the GIL, is ended by
    Python, and aborts the process ("terminate called without an active exception", SIGABRT; about one run in 20).
    ``os._exit`` ends the process before finalisation."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(args: argparse.Namespace) -> dict:
    """Spawn the ranks, time every divergence, return the JSON object."""
    import torch.multiprocessing as mp

    threads = args.threads or max(1, (os.cpu_count() or 1) // args.world)
    cfg = dict(rows=args.rows, vocab=args.vocab, divergences=list(args.divergences), warmup=args.warmup,
               repeat=args.repeat, temperature=args.temperature, ce_weight=args.ce_weight, threads=threads)
    info = package_info()
    print(f"vocabulary-parallel kd_loss, torch backend, CPU: N={args.rows} V={args.vocab} float32 over "
          f"{args.world} gloo processes x {threads} threads; warmup {args.warmup}, repeat {args.repeat}; "
          f"kdkernels {info['kdkernels_path']} @ {(info['commit'] or '?')[:12]}{' +changes' if info['dirty'] else ''}",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="kdkernels-vp-") as tmp:
        out = Path(tmp) / "results.json"
        mp.spawn(_worker, args=(args.world, str(Path(tmp) / "store"), cfg, str(out)), nprocs=args.world, join=True)
        worker = json.loads(out.read_text())
    imported = str(Path(worker["kdkernels_file"]).resolve().parent)
    if imported != info["kdkernels_path"]:  # the spawned ranks found another kdkernels than this process
        raise RuntimeError(f"the ranks imported kdkernels from {imported}, this process from {info['kdkernels_path']}")
    return dict(rows=args.rows, vocab=args.vocab, world=args.world, threads=threads, torch=torch.__version__,
                **info, dtype="float32", backend="torch", temperature=args.temperature, ce_weight=args.ce_weight,
                warmup=args.warmup, repeat=args.repeat, cpu_count=os.cpu_count(), machine=platform.platform(),
                python=platform.python_version(), date=datetime.datetime.now().isoformat(timespec="seconds"),
                results=worker["results"])


def table(data: dict) -> str:
    lines = [f"N={data['rows']} V={data['vocab']} world={data['world']} threads={data['threads']} "
             f"torch {data['torch']}; median of {data.get('repeat', '?')} calls, the slowest rank each",
             f"{'divergence':<10} {'forward ms':>12} {'fwd+bwd ms':>12}"]
    lines.append("-" * len(lines[-1]))
    for divergence, r in data["results"].items():
        lines.append(f"{divergence:<10} {r['forward_ms']:>12.2f} {r['forward_backward_ms']:>12.2f}")
    return "\n".join(lines)


def _describe(name: str, data: dict) -> str:
    commit = (data.get("commit") or "?")[:12] + (" +changes" if data.get("dirty") else "")
    return (f"{name}: {data.get('kdkernels_path')} @ {commit}; N={data['rows']} V={data['vocab']} "
            f"world={data['world']} threads={data['threads']} torch {data['torch']}")


def compare(a: dict, b: dict) -> str:
    """A Markdown table of two runs: forward and forward + backward ms of each, and B / A."""
    lines = [_describe("A", a), _describe("B", b)]
    for key in ("rows", "vocab", "world", "threads"):
        if a.get(key) != b.get(key):
            lines.append(f"warning: {key} differs ({a.get(key)} vs {b.get(key)})")
    lines += ["", "| divergence | forward A ms | forward B ms | B/A | fwd+bwd A ms | fwd+bwd B ms | B/A |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for divergence in [d for d in a["results"] if d in b["results"]]:
        ra, rb = a["results"][divergence], b["results"][divergence]
        cells = []
        for key in ("forward_ms", "forward_backward_ms"):
            cells += [f"{ra[key]:.1f}", f"{rb[key]:.1f}", f"{rb[key] / ra[key]:.2f}"]
        lines.append(f"| {divergence} | " + " | ".join(cells) + " |")
    missing = sorted(set(a["results"]) ^ set(b["results"]))
    if missing:
        lines.append(f"(in one file only: {', '.join(missing)})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.compare:
        a, b = (json.loads(Path(p).read_text()) for p in args.compare)
        print(compare(a, b))
        return 0
    data = run(args)
    print(table(data))
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
