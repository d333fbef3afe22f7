"""python -m bench: time, peak memory and error of kdkernels against eager PyTorch (and torch.compile).

The default is a quick comparison of kdkernels with the eager PyTorch reference on a small shape for fkl, rkl,
akl and todi (under a minute on 2 CPU cores, most of it compiling kdkernels' chunk functions on their first
call). --full is the full comparison of all eight divergences, with torch.compile of the reference (and Liger on
CUDA), on the shape of bench/RESULTS.md.
List options are comma-separated (--divergence fkl,rkl), as in bench.fused_linear.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from dataclasses import dataclass

import torch

from bench import report
from bench.machine import machine
from bench.providers import left_out
from bench.run import Config, Progress, bench_divergence, make_inputs, steps
from kdkernels.torch_ops.reference import DIVERGENCES

CORE = ("fkl", "rkl", "akl", "todi")  # the quick default; --full adds the baselines (sfkl, srkl, jsd, tvd)

PROVIDERS = ("kdkernels", "eager", "compile", "liger")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Defaults:
    n: int
    v: int
    dtype: str
    repeats: int
    warmup: int
    providers: tuple[str, ...]


QUICK = {"cpu": Defaults(256, 8192, "float32", 5, 1, ("kdkernels", "eager")),
         "cuda": Defaults(8192, 128256, "bfloat16", 10, 3, ("kdkernels", "eager", "liger"))}
FULL = {"cpu": Defaults(2048, 32000, "float32", 3, 1, ("kdkernels", "eager", "compile")),
        "cuda": Defaults(8192, 128256, "bfloat16", 10, 3, PROVIDERS)}
SWEEP = {"cuda": (32000, 65536, 128256, 256000), "cpu": (8000, 16000, 32000, 64000)}

EXAMPLES = f"""examples:
  python -m bench                           quick: kdkernels and eager, CPU N={QUICK['cpu'].n} V={QUICK['cpu'].v}
  python -m bench --full                    kdkernels, eager and compile at CPU N={FULL['cpu'].n} V={FULL['cpu'].v}
                                            (bench/RESULTS.md; 2 to 9 minutes on 2 cores)
  python -m bench --full --n 256 --v 8192   the same three providers on the small shape
  python -m bench --sweep --plot            several V, drawn to a PNG
  python -m bench --fused-linear --help     the fused output layer + loss benchmark and its options
  python -m bench.vocab_parallel --help     the vocabulary-parallel loss (process_group=) on gloo CPU processes
  python -m bench.roofline_parallel         its GPU cost model for 2, 4 and 8 ranks (sm_90a, no GPU needed)
"""


def _defaults_text(field: str) -> str:
    """``field`` of the defaults by device and mode, for the help."""

    def on(device: str) -> str:
        quick, full = (getattr(d[device], field) for d in (QUICK, FULL))
        quick, full = (",".join(x) if isinstance(x, tuple) else str(x) for x in (quick, full))
        return quick if quick == full else f"{quick} (--full: {full})"

    return f"default: CPU {on('cpu')}; CUDA {on('cuda')}"


def comma_list(choices: tuple[str, ...] | None = None, convert=str):
    """An argparse type: ``a,b,c`` to a tuple, each item converted and, with ``choices``, checked."""

    def parse(text: str) -> tuple:
        items = tuple(convert(x) for x in text.split(",") if x)
        if not items or (choices and any(x not in choices for x in items)):
            allowed = f" of {','.join(choices)}" if choices else ""
            raise argparse.ArgumentTypeError(f"expected a comma-separated list{allowed}, got {text!r}")
        return items

    return parse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n", 1)[1],
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true",
                   help="the full comparison: the defaults marked '--full:' below (the options "
                        "given still apply)")
    p.add_argument("--divergence", type=comma_list(DIVERGENCES),
                   help=f"divergences, comma-separated, of {','.join(DIVERGENCES)} (default: "
                        f"{','.join(CORE)}; --full: all)")
    p.add_argument("--providers", type=comma_list(PROVIDERS),
                   help=f"implementations, comma-separated, of {','.join(PROVIDERS)} (liger: CUDA only); "
                        + _defaults_text("providers"))
    p.add_argument("--n", type=positive_int, help="rows (tokens); " + _defaults_text("n"))
    p.add_argument("--v", type=positive_int, help="vocabulary size; " + _defaults_text("v"))
    p.add_argument("--dtype", choices=DTYPES, help="dtype of the logits; " + _defaults_text("dtype"))
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available, else cpu")
    p.add_argument("--sweep", nargs="?", const=(), type=comma_list(convert=int),
                   help="run several V instead of --v: a comma-separated list, or none for the default list "
                        f"(CPU {','.join(map(str, SWEEP['cpu']))}, CUDA {','.join(map(str, SWEEP['cuda']))})")
    p.add_argument("--repeats", type=positive_int, help="timed calls per provider; " + _defaults_text("repeats"))
    p.add_argument("--warmup", type=positive_int,
                   help="untimed calls first, the first one reported as '1st call s'; " + _defaults_text("warmup"))
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default: 1.0)")
    p.add_argument("--plot", action="store_true",
                   help="also write a PNG of time and memory (bars at one V, lines against V with --sweep; "
                        "needs matplotlib)")
    p.add_argument("--tag", default="bench", help="file name prefix under bench/results/ (default: bench)")
    p.add_argument("--fused-linear", action="store_true",
                   help="run the fused output layer + loss benchmark (bench.fused_linear) instead; it must come "
                        "first, and the options after it are its own: python -m bench --fused-linear --help")
    p.add_argument("--gpu-check", action="store_true",
                   help="run the GPU check (bench.gpu_check) instead; it must come first, the options after it "
                        "are its own")
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    args = parser().parse_args(argv)
    if args.fused_linear or args.gpu_check:
        parser().error("--fused-linear and --gpu-check must be the first option")
    return args


def plan(args: argparse.Namespace, device: str) -> tuple[list[Config], tuple[str, ...]]:
    """The configurations (one per V) and the providers that ``args`` asks for on ``device``."""
    d = (FULL if args.full else QUICK)[device]
    if args.sweep is not None:  # () when given without a list
        vocabs = args.sweep or SWEEP[device]
    else:
        vocabs = (args.v or d.v,)
    configs = [Config(n=args.n or d.n, v=v, dtype=args.dtype or d.dtype, device=device,
                      repeats=args.repeats or d.repeats, warmup=args.warmup or d.warmup,
                      temperature=args.temperature) for v in vocabs]
    return configs, args.providers or d.providers


def run(args: argparse.Namespace) -> list[dict]:
    """Run every configuration of ``args``; print and save the table; return the rows."""
    start = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    configs, names = plan(args, device)
    divergences = args.divergence or (DIVERGENCES if args.full else CORE)
    progress = Progress(sum(steps(c, divergences, names) for c in configs))
    rows = []
    for cfg in configs:
        z, t = make_inputs(cfg)
        for divergence in divergences:
            rows += bench_divergence(cfg, divergence, names, z, t, progress)
        del z, t
    progress.close()
    for note in left_out(names, device, divergences):
        print(f"left out: {note}")
    if not rows:
        print("nothing ran: none of the requested providers runs here")
        return rows
    spread = report.flag_wide_spread(rows)
    info = machine(device)
    print(report.table(rows, info))
    print(textwrap.fill(spread, 110))
    paths = report.save(rows, info, args.tag)
    print("saved " + ", ".join(str(p) for p in paths))
    if args.plot:
        png = report.plot(rows, info, paths[0].with_suffix(".png"))
        print(f"plot: {png}" if png else "plot skipped: matplotlib is not installed")
    print(f"total {time.perf_counter() - start:.0f} s")
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
