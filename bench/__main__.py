"""``python -m bench``: time, peak memory and error of kdkernels against the eager and compiled reference.

Defaults: on CUDA N=8192, V=128256, bfloat16; on the CPU N=2048, V=32000, float32. ``--sweep`` runs several V
(``--plot`` draws them). ``--fused-linear ...`` hands the remaining arguments to ``bench.fused_linear`` and
``--gpu-check`` runs ``bench.gpu_check``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench import report
from bench.machine import machine
from bench.run import Config, Progress, bench_divergence, make_inputs, steps
from kdkernels.torch_ops.reference import DIVERGENCES

PROVIDERS = ("kdkernels", "compile", "eager", "liger")
DEFAULTS = {"cuda": (8192, 128256, "bfloat16", 10, 3), "cpu": (2048, 32000, "float32", 3, 1)}
SWEEP = {"cuda": (32000, 65536, 128256, 256000), "cpu": (8000, 16000, 32000, 64000)}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--divergence", nargs="+", choices=DIVERGENCES, default=list(DIVERGENCES))
    parser.add_argument("--n", type=int, help="rows (tokens); default 8192 on CUDA, 2048 on the CPU")
    parser.add_argument("--v", type=int, help="vocabulary; default 128256 on CUDA, 32000 on the CPU")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--sweep", nargs="?", const="default",
                        help="comma-separated V values to run instead of --v (default list if none given)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--repeats", type=int, help="timed calls per provider (default 10 CUDA, 3 CPU)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 3 CUDA, 1 CPU; at least 1)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--plot", action="store_true", help="write a PNG of time and memory against V")
    parser.add_argument("--tag", default="bench", help="file name prefix under bench/results/")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict]:
    """Run every configuration of ``args``; print and save the table; return the rows."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    n, v, dtype, repeats, warmup = DEFAULTS[device]
    if args.sweep:
        vocabs = SWEEP[device] if args.sweep == "default" else tuple(int(x) for x in args.sweep.split(","))
    else:
        vocabs = (args.v or v,)
    configs = [Config(n=args.n or n, v=vv, dtype=args.dtype or dtype, device=device,
                      repeats=args.repeats or repeats, warmup=max(1, args.warmup or warmup),
                      temperature=args.temperature) for vv in vocabs]
    names = tuple(args.providers)
    progress = Progress(sum(steps(c, args.divergence, names) for c in configs))
    rows = []
    for cfg in configs:
        z, t = make_inputs(cfg)
        for divergence in args.divergence:
            rows += bench_divergence(cfg, divergence, names, z, t, progress)
        del z, t
    progress.close()
    info = machine(device)
    print(report.table(rows, info))
    paths = report.save(rows, info, args.tag)
    print("saved " + ", ".join(str(p) for p in paths))
    if args.plot:
        png = report.plot(rows, info, paths[0].with_suffix(".png"))
        print(f"plot: {png}" if png else "plot skipped: matplotlib is not installed")
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--fused-linear":
        from bench import fused_linear  # imported only for this mode

        return fused_linear.main(argv[1:])
    if argv and argv[0] == "--gpu-check":
        from bench import gpu_check

        return gpu_check.main(argv[1:])
    run(parse(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
