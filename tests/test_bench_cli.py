"""``python -m bench``'s options, table, spread warning, progress display and plot, without running a benchmark."""

from __future__ import annotations

import threading
import time

import pytest

from bench import report
from bench.__main__ import main, parse, parser, plan
from bench.run import Progress

INFO = dict(machine="test machine", torch="2.x", triton="3.x")


def test_quick_default_and_full_comparison():
    (cfg,), providers = plan(parse([]), "cpu")
    assert (cfg.n, cfg.v, cfg.dtype, providers) == (256, 8192, "float32", ("kdkernels", "eager"))
    (cfg,), providers = plan(parse(["--full"]), "cpu")
    assert (cfg.n, cfg.v, providers) == (2048, 32000, ("kdkernels", "eager", "compile"))
    (cfg,), providers = plan(parse(["--full", "--n", "256", "--v", "8192"]), "cpu")
    assert (cfg.n, cfg.v, providers) == (256, 8192, ("kdkernels", "eager", "compile"))
    (cfg,), providers = plan(parse(["--providers", "kdkernels,compile", "--repeats", "7"]), "cpu")
    assert (providers, cfg.repeats) == (("kdkernels", "compile"), 7)


def test_list_options_are_comma_separated():
    args = parse(["--divergence", "fkl,akl", "--sweep", "1000,2000"])
    assert args.divergence == ("fkl", "akl")
    assert [c.v for c in plan(args, "cpu")[0]] == [1000, 2000]
    assert [c.v for c in plan(parse(["--sweep"]), "cpu")[0]] == [8000, 16000, 32000, 64000]
    for bad in (["--divergence", "fkl,js"], ["--providers", "kdkernels", "eager"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            parse(bad)


def test_help_names_every_mode_and_default():
    text = parser().format_help()
    for option in ("--full", "--fused-linear", "--gpu-check", "python -m bench --full --n 256 --v 8192"):
        assert option in text
    for action in parser()._actions:
        if action.nargs != 0:  # every option that takes a value says its default
            assert "default" in action.help, action.dest


def test_fused_linear_mode_takes_the_rest(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--fused-linear", "--help"])
    assert exit_info.value.code == 0 and "python -m bench.fused_linear" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parse(["--n", "5", "--fused-linear"])


def rows(vocabs=(8192,)):
    out = []
    for v in vocabs:
        for divergence in ("fkl", "todi"):
            for provider, ms in (("kdkernels", 10.0), ("eager", 100.0)):
                out.append(dict(divergence=divergence, provider=provider, n=256, v=v, dtype="float32", note="",
                                fwd_ms=ms / 2, bwd_ms=ms / 2, fwd_bwd_ms=ms, fwd_bwd_min_ms=ms * 0.95,
                                fwd_bwd_max_ms=ms * (1.5 if provider == "eager" else 1.05), peak_mib=ms))
    return out


def test_table_explains_every_column_and_flags_wide_spread():
    table_rows = rows()
    line = report.flag_wide_spread(table_rows)
    assert line.startswith("warning") and "fkl eager" in line and "fkl kdkernels" not in line
    assert [r["note"] for r in table_rows[:2]] == ["", "spread 55%"]
    text = report.table(table_rows, INFO)
    assert all(k in report.DESCRIPTIONS for k, _, _ in report.COLUMNS)
    legend = text.split("columns:")[1]
    assert all(f"  {header} " in legend for _, header, _ in report.COLUMNS)


def test_progress_redraws_while_a_first_call_runs():
    progress = Progress.__new__(Progress)
    redraws, labels = [], []
    progress.bar = type("Bar", (), dict(refresh=lambda self: redraws.append(threading.current_thread()),
                                        set_description=lambda self, label: labels.append(label)))()
    with progress.waiting("fkl compile: first call"):
        time.sleep(1.3)
    assert labels == ["fkl compile: first call"] and redraws and threading.current_thread() not in redraws


@pytest.mark.parametrize("vocabs", [(8192,), (8000, 16000)])
def test_plot_bars_at_one_vocabulary_lines_for_several(vocabs):
    pytest.importorskip("matplotlib")
    fig = report.figure(rows(vocabs), INFO)
    title = fig._suptitle.get_text()
    assert "N=256" in title and "float32" in title
    time_axis = fig.axes[0]
    if len(vocabs) == 1:
        bars = {c.get_label(): c.patches[0].get_facecolor() for c in time_axis.containers}
        assert len(time_axis.patches) == 4 and bars["kdkernels"] != bars["eager"]
    else:
        lines = {line.get_label(): line for line in time_axis.get_lines()}
        assert lines["fkl kdkernels"].get_linewidth() > lines["fkl eager"].get_linewidth()
        assert lines["fkl kdkernels"].get_color() != lines["fkl eager"].get_color()


def test_liger_on_the_cpu_says_why_nothing_ran(capsys):
    """``--providers liger`` on the CPU: a line saying liger needs CUDA, and no empty table or spread line."""
    assert main(["--providers", "liger", "--device", "cpu", "--n", "4", "--v", "64"]) == 0
    out = capsys.readouterr().out
    assert "left out: liger runs on CUDA only" in out and "nothing ran" in out
    assert "spread" not in out and "columns:" not in out
