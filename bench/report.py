"""Output of the benchmark: an aligned table on stdout, CSV and JSON under ``bench/results/``, a PNG plot."""

from __future__ import annotations

import csv
import json
import math
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
    ("first_call_s", "1st call s", "{:.1f}"),
    ("peak_mib", "peak MiB", "{:.0f}"),
    ("extra_over_grad", "extra/grad", "{:.2f}"),
    ("loss_err", "loss err", "{:.1e}"),
    ("grad_err", "grad err", "{:.1e}"),
    ("note", "note", "{}"),
]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def table(rows: list[dict], info: dict[str, str]) -> str:
    """Header line (machine, versions) and the rows as an aligned text table."""
    cells = [[h for _, h, _ in COLUMNS]] + [[_cell(r, k, f) for k, _, f in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = [f"machine: {info['machine']} | torch {info['torch']} | triton {info['triton']}"]
    for i, c in enumerate(cells):
        lines.append("  ".join(x.rjust(w) if j > 1 else x.ljust(w) for j, (x, w) in enumerate(zip(c, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
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


def plot(rows: list[dict], info: dict[str, str], path: Path) -> Path | None:
    """PNG of forward + backward time and peak memory against V, one line per divergence and provider."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for key in sorted({(r["divergence"], r["provider"]) for r in rows}):
        pts = sorted((r["v"], r.get("fwd_bwd_ms"), r.get("peak_mib")) for r in rows
                     if (r["divergence"], r["provider"]) == key and r.get("fwd_bwd_ms") is not None)
        if pts:
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="/".join(key))
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label="/".join(key))
    for ax, label in zip(axes, ("forward + backward (ms)", "peak memory above inputs (MiB)")):
        ax.set_xlabel("V")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{info['machine']}, torch {info['torch']}, triton {info['triton']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
