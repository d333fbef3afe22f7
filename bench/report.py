"""Output of the benchmark: an aligned table with a legend on stdout, CSV and JSON under ``bench/results/``, a plot."""

from __future__ import annotations

import csv
import json
import math
import textwrap
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
COLUMNS = [  # (key, header, format)
    ("divergence", "div", "{}"),
    ("provider", "provider", "{}"),
    ("n", "N", "{}"),
    ("v", "V", "{}"),
    ("dtype", "dtype", "{}"),
    ("fwd_ms", "fwd ms", "{:.1f}"),
    ("bwd_ms", "bwd ms", "{:.1f}"),
    ("fwd_bwd_ms", "fwd+bwd ms", "{:.1f}"),
    ("fwd_bwd_min_ms", "min ms", "{:.1f}"),
    ("fwd_bwd_max_ms", "max ms", "{:.1f}"),
    ("first_call_s", "1st call s", "{:.1f}"),
    ("peak_mib", "peak MiB", "{:.0f}"),
    ("extra_over_grad", "extra/grad", "{:.2f}"),
    ("loss_err", "loss err", "{:.1e}"),
    ("grad_err", "grad err", "{:.1e}"),
    ("note", "note", "{}"),
]
# What each column means, printed under the table (keyed like COLUMNS).
DESCRIPTIONS = {
    "divergence": "the loss (fkl forward KL, rkl reverse KL, akl adaptive KL, todi token-wise, sfkl/srkl skewed "
                  "KLs, jsd generalized JSD, tvd total variation)",
    "provider": "kdkernels = kd.kd_loss (backend auto), eager = the plain PyTorch reference, compile = "
                "torch.compile of it, liger = Liger-Kernel's JSD (fkl/rkl, CUDA)",
    "n": "rows (tokens)",
    "v": "vocabulary size",
    "dtype": "dtype of both logits",
    "fwd_ms": "median over the repeats of the forward",
    "bwd_ms": "median of the backward",
    "fwd_bwd_ms": "median of forward + backward",
    "fwd_bwd_min_ms": "fastest forward + backward of the repeats",
    "fwd_bwd_max_ms": "slowest forward + backward of the repeats",
    "first_call_s": "the first forward + backward, compilation included",
    "peak_mib": "peak memory above the inputs during one forward + backward, the gradient included "
                "(CPU: resident-set high-water mark, an upper bound)",
    "extra_over_grad": "(peak - gradient size) / gradient size: temporary memory in units of the gradient",
    "loss_err": "relative norm error of the row losses against float64 on 64 rows (- for a mean-only provider)",
    "grad_err": "relative norm error of the gradient rows against float64 on the same rows",
    "note": "errors, out of memory, wide spread",
    "fwd_over_floor": "forward time over the bandwidth floor of its passes",
    "bwd_over_floor": "backward time over the bandwidth floor of its passes",
    "fwd_bwd_over_floor": "forward + backward time over the bandwidth floor of its passes",
}
WIDE_SPREAD = 0.25  # (max - min) / median of the repeats above which a row is flagged


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def spread(row: dict) -> float | None:
    """``(max - min) / median`` of the forward + backward repeats, None if the row was not timed."""
    if row.get("fwd_bwd_ms") is None:
        return None
    return (row["fwd_bwd_max_ms"] - row["fwd_bwd_min_ms"]) / row["fwd_bwd_ms"]


def flag_wide_spread(rows: list[dict]) -> str:
    """Note ``spread X%`` on the rows whose repeats spread wider than ``WIDE_SPREAD``; a line that says so."""
    wide = []
    for r in rows:
        s = spread(r)
        if s is not None and s > WIDE_SPREAD:
            r["note"] = "; ".join(x for x in (r.get("note"), f"spread {s:.0%}") if x)
            wide.append(f"{r['divergence']} {r['provider']} V={r['v']}")
    if not wide:
        return f"the repeats spread by at most {WIDE_SPREAD:.0%} of their median everywhere"
    return (f"warning: the repeats of {len(wide)} rows spread by more than {WIDE_SPREAD:.0%} of their median "
            f"((max - min) / median, in the note column: {', '.join(wide)}): the machine was busy or the calls "
            "vary; compare their medians with care, or rerun on a quiet machine or with more --repeats")


def table(rows: list[dict], info: dict[str, str]) -> str:
    """Header line (machine, versions), the rows as an aligned text table, and a legend of the columns."""
    cells = [[h for _, h, _ in COLUMNS]] + [[_cell(r, k, f) for k, _, f in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = [f"machine: {info['machine']} | torch {info['torch']} | triton {info['triton']}"]
    for i, c in enumerate(cells):
        lines.append("  ".join(x.rjust(w) if j > 1 else x.ljust(w) for j, (x, w) in enumerate(zip(c, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    width = max(len(h) for _, h, _ in COLUMNS)
    lines.append("columns:")
    lines += [textwrap.fill(DESCRIPTIONS[k], 110, initial_indent=f"  {h:<{width}}  ",
                            subsequent_indent=" " * (width + 4)) for k, h, _ in COLUMNS if k in DESCRIPTIONS]
    return "\n".join(lines)


def save(rows: list[dict], info: dict[str, str], tag: str) -> tuple[Path, Path]:
    """Write the rows (each with the machine information) to ``bench/results/<tag>-<time>.csv`` and ``.json``."""
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    full = [dict(r, **info) for r in rows]
    keys = [k for k, _, _ in COLUMNS] + list(info)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(full)
    stem.with_suffix(".json").write_text(json.dumps(full, indent=1))
    return stem.with_suffix(".csv"), stem.with_suffix(".json")


def _style(provider: str) -> dict:
    """kdkernels stands out (red, thick, solid); the baselines are muted (grey-blue tones, dashed)."""
    if provider == "kdkernels":
        return dict(color="tab:red", linewidth=2.5, linestyle="-", zorder=3)
    muted = {"eager": "#4a6a8a", "compile": "#8fa9c2", "liger": "#b0b0b0"}
    return dict(color=muted.get(provider, "#707070"), linewidth=1.2, linestyle="--", zorder=2)


def _title(rows: list[dict], info: dict[str, str]) -> str:
    values = lambda key: ",".join(str(x) for x in sorted({r[key] for r in rows}))
    return (f"forward + backward, N={values('n')}, {values('dtype')}: {info['machine']}, torch {info['torch']}, "
            f"triton {info['triton']}")


def figure(rows: list[dict], info: dict[str, str]):
    """Time and peak memory by divergence and provider: grouped bars at one V, lines against V for several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.get("fwd_bwd_ms") is not None]
    providers = list(dict.fromkeys(r["provider"] for r in timed))
    divergences = list(dict.fromkeys(r["divergence"] for r in timed))
    vocabs = sorted({r["v"] for r in timed})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    metrics = (("fwd_bwd_ms", "forward + backward (ms, median)"), ("peak_mib", "peak memory above inputs (MiB)"))
    for ax, (key, label) in zip(axes, metrics):
        if len(vocabs) == 1:
            width = 0.8 / max(len(providers), 1)
            for i, provider in enumerate(providers):
                values = {r["divergence"]: r.get(key) for r in timed if r["provider"] == provider}
                xs = [d + (i - (len(providers) - 1) / 2) * width for d in range(len(divergences))]
                style = _style(provider)
                ax.bar(xs, [values.get(d) or 0 for d in divergences], width, label=provider, color=style["color"],
                       edgecolor="black" if provider == "kdkernels" else "none", zorder=style["zorder"])
            ax.set_xticks(range(len(divergences)), divergences)
            ax.set_xlabel(f"divergence (V={vocabs[0]})")
        else:
            markers = dict(zip(divergences, "osD^v<>"))
            for provider in providers:
                for divergence in divergences:
                    pts = sorted((r["v"], r.get(key)) for r in timed
                                 if (r["provider"], r["divergence"]) == (provider, divergence) and r.get(key))
                    if pts:
                        ax.plot(*zip(*pts), marker=markers[divergence], label=f"{divergence} {provider}",
                                **_style(provider))
            ax.set_xlabel("V")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(True, axis="y", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(_title(timed, info), fontsize=9)
    fig.tight_layout()
    return fig


def plot(rows: list[dict], info: dict[str, str], path: Path) -> Path | None:
    """Write :func:`figure` to ``path``; None when matplotlib is not installed."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = figure(rows, info)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
