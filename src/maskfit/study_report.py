"""The study's tables and plots from its committed result lines (``maskfit experiment``'s results.jsonl).

    python -m maskfit.study_report study/results --out REPORT.md [--plots study/plots]

Reads every ``*.jsonl`` under the results folder and writes, between the markers
``<!-- study_report:begin -->`` and ``<!-- study_report:end -->`` of REPORT.md (text outside them, e.g. the
findings, is kept; a missing file is created from a template, a file without markers gets the block appended):

- the runs: design, keep ratio, objective, fine-tune, seeds, images seen, images/s, peak memory;
- proxy FD (and class accuracy, precision, recall) at every resolution and RoPE method, at equal GPU time
  (each run's final checkpoint, same budget) and at equal images seen (the ``--eval-at-images`` marks);
- PNG plots: proxy FD against GPU time and against images seen, FD against resolution per design and RoPE
  method, images/s and peak memory per design;
- the real-image floor, if ``floor.jsonl`` (:mod:`maskfit.study_floor`) lies beside the results folder;
- links to the sample sheets beside the results folder (``sheets/RUN.jpg``, made by :mod:`maskfit.study_sheets`
  from the runs' archives; only the runs worth showing get one).

A cell is the mean over seeds with the sample standard deviation (n - 1) as the spread and the number of seeds;
one seed shows the value alone. Runs are grouped by variant; lines of one variant made with another config,
budget, sampling setting or proxy classifier form a separate group, flagged in the report, since their
numbers do not compare.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from maskfit.evaluate.report import METRIC_INFO

BEGIN, END = "<!-- study_report:begin -->", "<!-- study_report:end -->"
# The report's column labels (lower case, shorter than evaluate.report's); which way is better comes from
# evaluate.report.METRIC_INFO, the one place that says it.
METRICS = OrderedDict((key, (label, METRIC_INFO[key][1])) for key, label in [
    ("proxy_fd", "proxy FD"),
    ("proxy_class_accuracy", "class accuracy of samples"),
    ("proxy_precision", "proxy precision"),
    ("proxy_recall", "proxy recall"),
    # Pixel statistics of the samples over the references' (maskfit.evaluate.image_stats), from 2026-12-02 on:
    # which way a run's samples differ (blur or noise, washed out or not), where the FD says only how much.
    ("detail_ratio", "samples' detail ÷ references'"),
    ("contrast_ratio", "samples' contrast ÷ references'"),
])
# Decimals per quantity (metrics and the runs table's columns); others get 2.
DIGITS = {"proxy_class_accuracy": 3, "proxy_precision": 3, "proxy_recall": 3, "count": 0, "rate": 0, "mem": 1, "sec": 1}
# The decisive comparison's baselines (issue 12): every other run is read against them where they have results.
REFERENCE_RUNS = ("packed", "fit_padded")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
LINESTYLES = ("-", "--", ":")


def run_style(j: int) -> dict:
    """Line style of the j-th run in a plot: matplotlib's ten colours, then the same colours dashed, then dotted,
    each with its own marker, so no two of the first 30 runs look alike (colour alone repeats after ten)."""
    return {"color": f"C{j % 10}", "marker": MARKERS[j % len(MARKERS)], "linestyle": LINESTYLES[(j // 10) % 3]}

TEMPLATE = """# The study: does masked flexible training reach FiT's quality for less compute, at every resolution?

The tables and plots below are written by `python -m maskfit.study_report study/results --out REPORT.md`
from the committed result lines (`study/results/*.jsonl`); the text around them is written by hand.

## Protocol

README.md, section "The study", says how one experiment runs (`maskfit experiment`, `tools/study.sh`) and
what it measures.

{begin}
{end}

## Findings

None yet.
"""


# --------------------------------------------------------------------------------------------------
# Reading and grouping
# --------------------------------------------------------------------------------------------------


def read_lines(folder: Path) -> List[dict]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"results folder {folder} does not exist (the study's is study/results)")
    lines = []
    for path in sorted(folder.glob("*.jsonl")):
        for i, text in enumerate(path.read_text().splitlines(), 1):
            if not text.strip():
                continue
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{i} is not a JSON line ({err}); fix or remove it") from None
    return lines


def _combo(line: dict) -> tuple:
    """What must agree for numbers to compare: recipe, budget, sampling setting, proxy classifier."""
    return (line["config_digest"], line["budget_seconds"], line["eval_id"], line["proxy_sha256"])


def group_labels(lines: Sequence[dict]) -> Dict[tuple, str]:
    """A label per (variant, combo): the variant's name, with a suffix when a variant has several combos."""
    by_variant: Dict[str, List[tuple]] = OrderedDict()
    for line in lines:
        name = line.get("variant") or line["run"]
        combos = by_variant.setdefault(name, [])
        if _combo(line) not in combos:
            combos.append(_combo(line))
    labels = {}
    for name, combos in by_variant.items():
        for i, combo in enumerate(combos):
            labels[(name, combo)] = name if len(combos) == 1 else f"{name} [{i + 1}]"
    return labels


def label_of(line: dict, labels: Dict[tuple, str]) -> str:
    return labels[(line.get("variant") or line["run"], _combo(line))]


def points_of(line: dict) -> List[str]:
    """The comparison points a line stands for: 'final' (equal GPU time) and/or each image-count mark."""
    return (["final"] if line["is_final"] else []) + [str(m) for m in line.get("marks", [])]


def column_order(lines: Sequence[dict]) -> List[Tuple[str, str]]:
    """(resolution, method) columns: in-distribution first, resolutions in the order the experiments list them
    (the protocol's), each resolution's methods together (none, VisionNTK, VisionYaRN, then others)."""
    first: Dict[str, int] = {}
    seen: "OrderedDict[Tuple[str, str], tuple]" = OrderedDict()
    method_rank = {"none": 0, "vision_ntk": 1, "vision_yarn": 2}
    for line in lines:
        first.setdefault(line["resolution"], len(first))
        key = (line["resolution"], line["method"])
        seen.setdefault(key, (line["split"] != "ID", first[line["resolution"]], method_rank.get(line["method"], 9),
                              line["method"]))
    return sorted(seen, key=lambda k: seen[k])


def mean_spread(values: Iterable[Optional[float]]) -> Tuple[Optional[float], Optional[float], int]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def fmt_cell(values: Sequence[Optional[float]], key: str, digits: Optional[int] = None, show_n: bool = True,
             grouped: bool = False) -> str:
    """mean ± sample std (n=seeds) of a cell's values, the mean alone for one value, "–" for none; ``digits`` (default
    DIGITS[key]), ``show_n`` off where a header gives the seed count, ``grouped``: thousands separators."""
    mean, spread, n = mean_spread(values)
    if mean is None:
        return "–"
    digits = DIGITS.get(key, 2) if digits is None else digits
    form = f",.{digits}f" if grouped else f".{digits}f"
    if spread is None:
        return f"{mean:{form}}"
    return f"{mean:{form}} ± {spread:{form}}" + (f" (n={n})" if show_n else "")


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def _collect(lines: Sequence[dict], labels) -> Dict[Tuple[str, str, str, str], List[dict]]:
    """(label, point, resolution, method) -> the lines of every seed there."""
    cells: Dict[Tuple[str, str, str, str], List[dict]] = {}
    for line in lines:
        for point in points_of(line):
            cells.setdefault((label_of(line, labels), point, line["resolution"], line["method"]), []).append(line)
    return cells


def metric_table(cells, row_labels: Sequence[str], point: str, columns, key: str) -> List[str]:
    name, better = METRICS[key]
    split = {}
    for cell_lines in cells.values():
        for line in cell_lines:
            split[(line["resolution"], line["method"])] = line["split"]
    header = [f"{split[c]} {c[0]} {c[1]}" for c in columns]
    out = [f"| run ({name}, {better} is better) | " + " | ".join(header) + " |",
           "| --- | " + " | ".join("---:" for _ in columns) + " |"]
    rows = []
    for label in row_labels:
        cells_row = [fmt_cell([l.get(key) for l in cells.get((label, point, r, m), [])], key) for r, m in columns]
        if all(c == "–" for c in cells_row):
            continue
        rows.append(f"| {label} | " + " | ".join(cells_row) + " |")
    return out + rows if rows else []  # a metric no run has (added after the runs were made) gets no table


def welch_p(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """Two-sided p-value of Welch's t-test (unequal variances); None without scipy or with fewer than 2 values."""
    if len(a) < 2 or len(b) < 2:
        return None
    try:
        from scipy.stats import ttest_ind
    except ImportError:
        return None
    p = float(ttest_ind(a, b, equal_var=False).pvalue)
    return p if math.isfinite(p) else None


def difference_cell(run: Sequence[float], ref: Sequence[float], digits: int) -> str:
    """Δ = mean(run) - mean(ref), called only when both have seeds and |Δ| exceeds the two spreads together
    (their mean ± std intervals do not overlap); Welch's p beside it."""
    if not run or not ref:
        return "–"
    delta = statistics.fmean(run) - statistics.fmean(ref)
    if len(run) < 2 or len(ref) < 2:
        return f"{delta:+.{digits}f} (n={len(run)}/{len(ref)})"
    spread = statistics.stdev(run) + statistics.stdev(ref)
    p = welch_p(run, ref)
    called = abs(delta) > spread
    return f"{delta:+.{digits}f}" + (f" (p={p:.2f})" if p is not None else "") + (" **called**" if called else "")


def _against_references(cells, row_labels: Sequence[str], columns, key: str, cell, caption: str) -> List[str]:
    """One table per reference run of the decisive comparison that has results (final checkpoints): every other run
    against it, ``cell(run_lines, ref_lines)`` per (resolution, method); ``caption`` follows "<metric> minus <ref>'s"."""
    out = []
    name, better = METRICS[key]
    for ref in (r for r in REFERENCE_RUNS if r in row_labels):
        rows = []
        for label in row_labels:
            if label == ref:
                continue
            row = [cell(cells.get((label, "final", r, m), []), cells.get((ref, "final", r, m), [])) for r, m in columns]
            if any(c != "–" for c in row):
                rows.append(f"| {label} | " + " | ".join(row) + " |")
        if rows:
            out += [f"**{name} minus {ref}'s{caption.format(better=better)}", "",
                    "| run | " + " | ".join(f"{r} {m}" for r, m in columns) + " |",
                    "| --- | " + " | ".join("---:" for _ in columns) + " |"] + rows + [""]
    return out


def difference_tables(cells, row_labels: Sequence[str], columns, key: str = "proxy_fd") -> List[str]:
    """Every run against each reference run: difference of the means over seeds, called beyond both spreads."""
    digits = DIGITS.get(key, 2)

    def cell(run_lines, ref_lines):
        values = [[float(l[key]) for l in lines if l.get(key) is not None] for lines in (run_lines, ref_lines)]
        return difference_cell(values[0], values[1], digits)

    return _against_references(cells, row_labels, columns, key, cell,
                               "** ({better} is better; **called** = the difference exceeds the two runs' spreads "
                               "together, i.e. their mean ± std intervals do not overlap; p = Welch's t-test; (n=a/b) = "
                               "seeds, too few to call anything)")


def paired_p(differences: Sequence[float]) -> Optional[float]:
    """Two-sided p-value of the paired t-test (one-sample t-test of the per-seed differences against 0); None
    without scipy, with fewer than 2 pairs, or when every difference is equal."""
    if len(differences) < 2:
        return None
    try:
        from scipy.stats import ttest_1samp
    except ImportError:
        return None
    p = float(ttest_1samp(differences, 0.0).pvalue)
    return p if math.isfinite(p) else None


def paired_cell(run: Dict[int, float], ref: Dict[int, float], digits: int) -> str:
    """Per-seed differences run[s] - ref[s] over the seeds both have: mean ± std (n pairs), paired p. Seed s gives
    every variant the same initial weights and the same crops in the same order (the noise draws follow the
    stream's length, so they differ where layouts or designs do): a pair shares much of its luck."""
    seeds = sorted(set(run) & set(ref))
    if len(seeds) < 2:
        return "–"
    diffs = [run[s] - ref[s] for s in seeds]
    p = paired_p(diffs)
    return (f"{statistics.fmean(diffs):+.{digits}f} ± {statistics.stdev(diffs):.{digits}f} (n={len(seeds)}"
            + (f", p={p:.2f})" if p is not None else ")"))


def paired_difference_tables(cells, row_labels: Sequence[str], columns, key: str = "proxy_fd") -> List[str]:
    """Like difference_tables, over the seeds the two runs share, seed by seed (cells with 2 pairs or more)."""
    digits = DIGITS.get(key, 2)

    def cell(run_lines, ref_lines):
        by_seed = [{l["seed"]: float(l[key]) for l in lines if l.get(key) is not None} for lines in (run_lines, ref_lines)]
        return paired_cell(by_seed[0], by_seed[1], digits)

    return _against_references(cells, row_labels, columns, key, cell,
                               ", paired by seed** ({better} is better; mean ± std of the per-seed differences over "
                               "the seeds both runs have, n pairs, paired t-test p; a seed gives both runs the same "
                               "initial weights and crops, so this is more sensitive than the unpaired table above, "
                               "which alone calls differences)")


def runs_table(lines: Sequence[dict], labels, row_labels: Sequence[str]) -> List[str]:
    out = ["| run | design | keep | objective | unmasked fine-tune | seeds | budget (s) | images seen (final) | "
           "images/s (average, steady) | peak GiB | compile (s) | config | proxy | sampling |",
           "| --- | --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for label in row_labels:
        finals = [l for l in lines if label_of(l, labels) == label and l["is_final"]]
        if not finals:
            continue
        per_seed = OrderedDict()
        for line in finals:
            per_seed.setdefault(line["seed"], line)  # one line per seed: run-level fields are equal across its lines
        runs = list(per_seed.values())
        first = runs[0]
        keep = first["keep_ratio"] if first.get("keep_count") is None else f"K={first['keep_count']}"
        design = first["design"] + (f" ({first['strategy']}" + (", beta" if first.get("ratio_distribution") == "beta" else "")
                                    + (", res-dep" if first.get("resolution_dependent") else "") + ")"
                                    if first.get("strategy") else "")
        rate = fmt_cell([r["images_per_s"] for r in runs], "rate")
        steady = fmt_cell([r.get("images_per_s_steady") for r in runs], "rate")
        out.append(
            f"| {label} | {design} | {keep} | {first['objective']} | {first['finetune_unmasked']:.0%} | "
            f"{', '.join(str(s) for s in per_seed)} | {first['budget_seconds']:g} | "
            f"{fmt_cell([r['images_seen'] for r in runs], 'count')} | {rate}; {steady} | "
            f"{fmt_cell([r.get('peak_mem_gib') for r in runs], 'mem')} | "
            f"{fmt_cell([r.get('compile_seconds') for r in runs], 'sec')} | `{first['config_digest']}` | "
            f"`{first['proxy_sha256'][:12]}` | {first['sampler']} {first['sampler_steps']}, CFG {first['cfg_scale']:g}, "
            f"{first['num_samples']} samples, {first['weights'].upper()} |")
    return out


GLANCE_SEEDS = 3  # issue 12: the decisive comparison has at least three seeds a run


def glance_runs(lines: Sequence[dict], labels, row_labels: Sequence[str]) -> List[Tuple[str, List[dict]]]:
    """(label, one final line per seed) of every run with at least GLANCE_SEEDS seeds; empty when fewer than two
    runs have that many (nothing to set side by side)."""
    chosen = []
    for label in row_labels:
        finals = {l["seed"]: l for l in lines if label_of(l, labels) == label and l["is_final"]}
        if len(finals) >= GLANCE_SEEDS:
            chosen.append((label, list(finals.values())))
    return chosen if len(chosen) >= 2 else []


def glance_columns(chosen: Sequence[Tuple[str, List[dict]]], cells, columns) -> List[Tuple[str, str, str]]:
    """(resolution, method, split) of every column at least one of the :func:`glance_runs` has a final value in."""
    out = []
    for res, method in columns:
        found = [l for label, _ in chosen for l in cells.get((label, "final", res, method), [])]
        if any(l.get("proxy_fd") is not None for l in found):
            out.append((res, method, found[0]["split"]))
    return out


def glance_table(chosen: Sequence[Tuple[str, List[dict]]], cells, columns) -> List[str]:
    """The :func:`glance_runs` side by side (a column each): how fast they trained, how many images they saw in the
    budget, and their proxy FD at every resolution and method at the final checkpoint."""
    if not chosen:
        return []

    def plain(values, digits: int) -> str:  # mean ± std, the seed count is in the header
        return fmt_cell(values, "", digits=digits, show_n=False, grouped=True)

    out = [f"### At a glance: the runs with {GLANCE_SEEDS} or more seeds", "",
           "_Final checkpoints after the same training budget; mean ± sample std over seeds; proxy FD, lower is "
           "better. Their differences, with p-values and paired by seed, are in the tables below._", "",
           "| | " + " | ".join(f"{label} ({len(runs)} seeds)" for label, runs in chosen) + " |",
           "| --- | " + " | ".join("---:" for _ in chosen) + " |",
           "| images/s (average over the budget) | " + " | ".join(plain([r["images_per_s"] for r in runs], 0)
                                                          for _, runs in chosen) + " |",
           "| images seen | " + " | ".join(plain([r["images_seen"] for r in runs], 0) for _, runs in chosen) + " |"]
    for res, method, split in glance_columns(chosen, cells, columns):
        row = [plain([l.get("proxy_fd") for l in cells.get((label, "final", res, method), [])], 2) for label, _ in chosen]
        out.append(f"| {split} {res} {method} | " + " | ".join(row) + " |")
    return out + [""]


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def _figure(panels: int, columns: int, width: float = 4.2, height: float = 3.4):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("the study plots need matplotlib: pip install matplotlib (the project's [dev] extra)") from None
    cols = min(columns, panels)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(width * cols + 1.5, height * rows + 1.0), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, rows, cols


def curve_points(cells, row_labels, columns, x_key: str) -> Dict[Tuple[str, str], Dict[str, list]]:
    """(resolution, method) -> {run label: sorted (x, mean FD, FD std) points}, for the panels of
    :func:`plot_curves` that hold a curve: a (resolution, method) evaluated at the final checkpoint only (one
    point per run) has no curve to draw; the tables carry it. If no panel has a curve, every panel is kept."""
    panels: Dict[Tuple[str, str], Dict[str, list]] = {}
    for res, method in columns:
        runs = {}
        for label in row_labels:
            points = []
            for (lab, point, r, m), group in cells.items():
                if (lab, r, m) != (label, res, method):
                    continue
                x, _, _ = mean_spread(l[x_key] for l in group)
                y, dy, _ = mean_spread(l.get("proxy_fd") for l in group)
                if x is not None and y is not None:
                    points.append((x, y, dy or 0.0))
            if points:
                runs[label] = sorted(set(points))
        panels[(res, method)] = runs
    curves = {c: runs for c, runs in panels.items() if any(len(pts) > 1 for pts in runs.values())}
    return curves or panels


def _log_fd_axis(ax) -> None:
    """A logarithmic proxy-FD axis with plain-number ticks (5, 10, 20, 30, 50): the designs' FDs span a decade, and on
    a linear axis the worst run flattens every other curve."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter  # present: _figure checked

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("proxy FD (log scale, lower is better)")


def plot_curves(cells, row_labels, columns, x_key: str, x_label: str, path: Path) -> None:
    """Proxy FD against ``x_key`` (train_seconds or images_seen): a panel per (resolution, method) evaluated at
    more than one checkpoint (:func:`curve_points`), a line per run, the x axis from 0."""
    panels = curve_points(cells, row_labels, columns, x_key)
    fig, rows, cols = _figure(len(panels), 4)
    for i, ((res, method), runs) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for label, points in runs.items():
            j = list(row_labels).index(label)
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                        capsize=3, label=label, **run_style(j))
        ax.set_xlim(left=0)
        _log_fd_axis(ax)
        ax.set_title(f"{res}, {method}")
        ax.set_xlabel(x_label)
        ax.grid(True, alpha=0.3)
    handles, names = [], []
    for ax in fig.axes:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    if handles:
        fig.legend(handles, names, loc="outside lower center", ncols=min(4, len(names)), fontsize="small")
    fig.suptitle(f"Proxy FD against {x_label}\nmean over seeds, bars = sample std")  # fits one panel's width
    fig.savefig(path, dpi=100)


def plot_resolution(cells, row_labels, columns, path: Path):
    """Final checkpoints: proxy FD against resolution, a panel per run, a line per RoPE method. Every panel has
    the same logarithmic y axis, so runs compare across panels (their FDs span a decade)."""
    resolutions = list(dict.fromkeys(r for r, _ in columns))
    methods = list(dict.fromkeys(m for _, m in columns))
    labels = [l for l in row_labels if any(k[0] == l and k[1] == "final" for k in cells)]
    fig, rows, cols = _figure(max(len(labels), 1), 3)
    first = None
    for i, label in enumerate(labels):
        ax = fig.add_subplot(rows, cols, i + 1, sharey=first)
        first = first or ax
        for j, method in enumerate(methods):
            xs, ys, es = [], [], []
            for x, res in enumerate(resolutions):
                y, dy, _ = mean_spread(l.get("proxy_fd") for l in cells.get((label, "final", res, method), []))
                if y is not None:
                    xs.append(x)
                    ys.append(y)
                    es.append(dy or 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker=MARKERS[j % len(MARKERS)], capsize=3, label=method)
        ax.set_xticks(range(len(resolutions)), resolutions, rotation=30)
        _log_fd_axis(ax)
        ax.set_title(label)
        ax.set_xlabel("resolution (height x width, px)")
        ax.grid(True, alpha=0.3)
        ax.legend(title="RoPE method", fontsize="small")
    fig.suptitle("Proxy FD against resolution at equal GPU time (final checkpoints), mean over seeds")
    fig.savefig(path, dpi=100)
    return fig


def plot_glance(chosen: Sequence[Tuple[str, List[dict]]], row_labels: Sequence[str], cells, columns, path: Path):
    """The :func:`glance_runs` at equal GPU time in one panel: proxy FD (mean ± sample std over seeds) at every
    resolution and method evaluated at the final checkpoint, a series per run (in its colour and marker of the other
    plots), side by side at each position."""
    fig, _, _ = _figure(1, 1, width=max(6.0, 0.55 * len(columns) + 2), height=4.0)
    ax = fig.add_subplot(1, 1, 1)
    shown = glance_columns(chosen, cells, columns)
    width = 0.6 / max(len(chosen), 1)
    for j, (label, runs) in enumerate(chosen):
        xs, ys, es = [], [], []
        for x, (res, method, _) in enumerate(shown):
            y, dy, _ = mean_spread(l.get("proxy_fd") for l in cells.get((label, "final", res, method), []))
            if y is not None:
                xs.append(x + (j - (len(chosen) - 1) / 2) * width)
                ys.append(y)
                es.append(dy or 0.0)
        style = {k: v for k, v in run_style(list(row_labels).index(label)).items() if k != "linestyle"}
        ax.errorbar(xs, ys, yerr=es, capsize=3, linestyle="none", label=f"{label} ({len(runs)} seeds)", **style)
    ax.set_xticks(range(len(shown)), [f"{split} {res}\n{method}" for res, method, split in shown], rotation=45,
                  ha="right", fontsize="small")
    # A linear axis from 0: these runs' FDs span less than a decade, and equal heights should read as equal FDs.
    ax.set_ylim(bottom=0)
    ax.set_ylabel("proxy FD (lower is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.suptitle("At equal GPU time, the runs with 3 or more seeds: proxy FD at the final checkpoint\n"
                 "mean over seeds, bars = sample std")
    fig.savefig(path, dpi=100)
    return fig


def plot_throughput(lines, labels, row_labels, path: Path) -> None:
    """Images/s (steady, mean over seeds) and peak memory per run."""
    fig, _, _ = _figure(2, 2, width=max(4.2, 0.6 * len(row_labels) + 2))
    for i, (key, name) in enumerate((("images_per_s_steady", "images/s (steady)"), ("peak_mem_gib", "peak memory (GiB)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        means, errs, names = [], [], []
        for label in row_labels:
            per_seed = {l["seed"]: l.get(key) for l in lines if label_of(l, labels) == label and l["is_final"]}
            m, s, _ = mean_spread(per_seed.values())
            if m is not None:
                means.append(m)
                errs.append(s or 0.0)
                names.append(label)
        ax.bar(range(len(means)), means, yerr=errs, capsize=3)
        if not means:
            ax.text(0.5, 0.5, "no values recorded (e.g. CPU runs have no peak GPU memory)", ha="center",
                    transform=ax.transAxes)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_ylabel(name)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Training speed and memory per run (mean over seeds, bars = sample std)")
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------------------------------
# The report block
# --------------------------------------------------------------------------------------------------


def split_extra(lines: Sequence[dict]) -> Tuple[List[dict], List[dict]]:
    """(the lines of the tables, the extra evaluations): a run's tables use its main evaluation setting (the
    eval_id most of its lines share); ``maskfit experiment --raw-final`` (the final raw weights), ``--also-cfg``
    (another guidance scale) and ``--also-attn-scale`` (scaled attention logits) add a few lines of the final
    checkpoint under other settings, which get tables of their own."""
    counts: Dict[str, Dict[str, int]] = {}
    for l in lines:
        per_run = counts.setdefault(l["run"], {})
        per_run[l["eval_id"]] = per_run.get(l["eval_id"], 0) + 1
    main_eval = {run: max(c, key=c.get) for run, c in counts.items()}
    is_extra = [l["eval_id"] != main_eval[l["run"]] for l in lines]
    return ([l for l, x in zip(lines, is_extra) if not x], [l for l, x in zip(lines, is_extra) if x])


def _extra_table(lines: Sequence[dict], extra: Sequence[dict], labels, heading: str, note: str,
                 metric: str = "proxy_fd") -> List[str]:
    """``metric`` (proxy FD unless named) of each run's final checkpoint under its main setting beside the extra
    setting, per resolution; nothing when no extra line has the metric."""
    if not any(l.get(metric) is not None for l in extra):
        return []
    label_of_run = {l["run"]: label_of(l, labels) for l in lines}
    columns = list(dict.fromkeys((l["resolution"], l["method"]) for l in extra))
    rows = list(dict.fromkeys(label_of_run[l["run"]] for l in extra if l["run"] in label_of_run))
    out = [f"### {heading}", "", f"_{note}_", "",
           "| run | " + " | ".join(f"{r} {m}" for r, m in columns) + " |",
           "| --- | " + " | ".join("---:" for _ in columns) + " |"]
    for label in rows:
        runs = {run for run, lab in label_of_run.items() if lab == label}
        cells = []
        for res, method in columns:
            pick = lambda group: [l.get(metric) for l in group if l["run"] in runs and l.get("is_final")
                                  and (l["resolution"], l["method"]) == (res, method)]
            cells.append(f"{fmt_cell(pick(lines), metric)} / {fmt_cell(pick(extra), metric)}")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out + [""]


def extra_setting(line: dict, main: dict) -> Tuple[str, str]:
    """(kind, words) of an extra evaluation's line against its run's main line: what it changed, the first
    difference in the order raw weights, token subsets, attention scale, guidance scale."""
    if line.get("weights") != main.get("weights"):
        return "raw", f"{line.get('weights')} weights"
    if line.get("subset_keep", 1.0) != main.get("subset_keep", 1.0):
        return "subsets", f"token subsets of {line['subset_keep']:g}"
    if line.get("attn_scale", "none") != main.get("attn_scale", "none"):
        return "attn", f"attention scale {line['attn_scale']}"
    return "cfg", f"CFG {line['cfg_scale']:g}"


def extra_tables(lines: Sequence[dict], extra: Sequence[dict], labels) -> List[str]:
    """One table per kind of extra evaluation: the final raw weights, each other guidance scale, each attention
    scale and subset sampling (these two with their FD and their samples' contrast). Every extra line's run has
    main lines too (split_extra takes the main setting from the run's own lines)."""
    main_of_run = {l["run"]: l for l in lines}
    kinds = {"raw": [], "subsets": [], "attn": [], "cfg": []}
    for l in extra:
        kinds[extra_setting(l, main_of_run[l["run"]])[0]].append(l)
    raw, other_attn, other_cfg, subsets = kinds["raw"], kinds["attn"], kinds["cfg"], kinds["subsets"]
    out = _extra_table(lines, raw, labels, "The final checkpoint's raw weights beside its EMA",
                       "A short last phase (the unmasked fine-tune) barely moves an EMA with a memory of hundreds of "
                       "steps: the raw weights show what that phase reached. Proxy FD, lower is better; EMA / raw.")
    for scale in sorted({l["cfg_scale"] for l in other_cfg}):
        at_scale = [l for l in other_cfg if l["cfg_scale"] == scale]
        main = "/".join(f"{m:g}" for m in sorted({main_of_run[l["run"]]["cfg_scale"] for l in at_scale}))
        out += _extra_table(lines, at_scale, labels, f"The final checkpoint with CFG {scale:g} beside CFG {main}",
                            f"`maskfit experiment --also-cfg {scale:g}`: the same weights and sampler"
                            + (" without guidance (FiT's and MaskDiT's no-CFG setting; MaskDiT's CFG numbers rely on "
                               "its unmasked fine-tune, its no-CFG numbers do not)" if scale == 1.0 else "")
                            + f". Proxy FD, lower is better; CFG {main} / CFG {scale:g}.")
    for scale in sorted({l["attn_scale"] for l in other_attn}):
        at_scale = [l for l in other_attn if l["attn_scale"] == scale]
        out += _fd_and_contrast_tables(
            lines, at_scale, labels, f"The final checkpoint with attention scale `{scale}` beside none",
            f"`maskfit experiment --also-attn-scale {scale}`: the same weights, sampler and guidance, with the "
            "attention logits scaled (models/rope.py; `kept`: ln n / ln(keys attended in training), n the image's "
            "tokens). ", "none / scaled")
    out += _fd_and_contrast_tables(
        lines, subsets, labels, "The final checkpoint sampled on token subsets beside the full grid",
        "`maskfit experiment --also-subset-sampling`: the same weights, sampler and guidance, every network call "
        "through the model's masked forward on random subsets of the run's keep ratio of each image's tokens that "
        "together cover it, as it trained (maskfit.sample.subset_denoiser). ", "full grid / subsets")
    return out


def _fd_and_contrast_tables(lines, extra, labels, heading: str, note: str, order: str) -> List[str]:
    """Two extra tables for a sampling-time change aimed at the masked runs' washout: its FD, then its contrast."""
    return (_extra_table(lines, extra, labels, heading, f"{note}Proxy FD, lower is better; {order}.")
            + _extra_table(lines, extra, labels, heading + ": contrast",
                           f"{note}Samples' contrast over the references' (1 = as real, below = washed out); {order}.",
                           metric="contrast_ratio"))


def report_block(lines: Sequence[dict], plots: Path, report: Path, sheets: Optional[Path] = None,
                 floor: Optional[Path] = None, gap: Optional[Path] = None) -> str:
    """The generated part of REPORT.md (between the markers), plots written under ``plots``; the sample sheets
    found in ``sheets`` are linked, the decoder probe's files in ``gap`` tabled."""
    if not lines:
        return "\n".join([BEGIN, "", "_No result lines yet: study/results/ holds no experiment's results.jsonl._", "", END])
    lines, extra = split_extra(lines)
    labels = group_labels(lines)
    row_labels = list(dict.fromkeys(label_of(l, labels) for l in lines))
    columns = column_order(lines)
    cells = _collect(lines, labels)
    plots.mkdir(parents=True, exist_ok=True)
    rel = Path(os.path.relpath(plots, report.parent))
    files = {"time": plots / "fd_vs_gpu_time.png", "images": plots / "fd_vs_images_seen.png",
             "resolution": plots / "fd_vs_resolution.png", "throughput": plots / "throughput_memory.png"}
    plot_curves(cells, row_labels, columns, "train_seconds", "training seconds (GPU wall clock)", files["time"])
    plot_curves(cells, row_labels, columns, "images_seen", "images seen", files["images"])
    plot_resolution(cells, row_labels, columns, files["resolution"])
    plot_throughput(lines, labels, row_labels, files["throughput"])

    out = [BEGIN, "", f"_Generated by `python -m maskfit.study_report` from {len(lines)} result lines "
                      f"({len({l['run'] for l in lines})} runs). Cells: mean ± sample std over seeds (n seeds); one "
                      "seed shows its value alone. Call a difference only where it exceeds the spread._", ""]
    multi = [l for l in row_labels if l.endswith("]")]
    if multi:
        out += [f"> **Note:** {', '.join(multi)}: one variant measured with different configs, budgets, sampling "
                "settings or proxy classifiers (see the runs table); their numbers do not compare.", ""]
    proxies = {l["proxy_sha256"] for l in lines}
    if len(proxies) > 1:
        out += [f"> **Warning:** {len(proxies)} proxy classifiers ({', '.join(sorted(p[:12] for p in proxies))}); proxy "
                "numbers compare only within one.", ""]
    chosen = glance_runs(lines, labels, row_labels)
    out += glance_table(chosen, cells, columns)
    if chosen:
        glance_png = plots / "glance.png"
        plot_glance(chosen, row_labels, cells, columns, glance_png)
        out += [f"![The runs with {GLANCE_SEEDS} or more seeds at equal GPU time]({(rel / glance_png.name).as_posix()})", ""]
    out += ["### Runs", ""] + runs_table(lines, labels, row_labels) + [""]
    out += ["### At equal GPU time (final checkpoints, equal training budget)", ""]
    for key in METRICS:
        table = metric_table(cells, row_labels, "final", columns, key)
        out += table + [""] if table else []
    differences = difference_tables(cells, row_labels, columns)
    if differences:
        out += ["### Differences at equal GPU time", ""] + differences + paired_difference_tables(cells, row_labels, columns)
    out += extra_tables(lines, extra, labels)
    marks = sorted({int(p) for l in lines for p in points_of(l) if p != "final"})
    if marks:
        out += ["### At equal images seen (first checkpoint at or past each mark)", ""]
        for m in marks:
            mark_cols = [c for c in columns if any(k[1] == str(m) and (k[2], k[3]) == c for k in cells)]
            out += [f"**{m:,} images**", ""] + metric_table(cells, row_labels, str(m), mark_cols, "proxy_fd") + [""]
    out += ["### Plots", ""]
    for key, title in (("time", "Proxy FD against GPU time"), ("images", "Proxy FD against images seen"),
                       ("resolution", "Proxy FD against resolution per design and RoPE method"),
                       ("throughput", "Images/s and peak memory per design")):
        out += [f"![{title}]({(rel / files[key].name).as_posix()})", ""]
    out += floor_table(floor)
    out += gap_table(gap)
    out += trajectory_table(gap)
    out += sample_sheets(sheets, report, lines, extra)
    out.append(END)
    return "\n".join(out)


def floor_table(floor: Optional[Path]) -> List[str]:
    """The real-image floor (:mod:`maskfit.study_floor`): training images scored as samples, per resolution."""
    if floor is None or not floor.is_file():
        return []
    from maskfit.study_floor import METRIC_KEYS, summarise

    lines = [json.loads(l) for l in floor.read_text().splitlines() if l.strip()]
    if not lines:
        return []
    summary = summarise(lines)
    draws = len({l["draw"] for l in lines})
    head = ["metric"] + list(summary)
    out = ["### Real-image floor (training images scored as samples)", "",
           f"_`python -m maskfit.study_floor`: {lines[0]['num_samples']} training-split images per set brought to each "
           f"size by the references' rule, against the same held-out references, {draws} draws: mean ± std. What a "
           "generator of the training images would score at this sample count; the std is one sample set's noise._", "",
           "| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for key in (k for k in METRIC_KEYS if any(k in summary[res] for res in summary)):
        cells = []
        for res in summary:
            mean, std = summary[res].get(key, (None, None))
            digits = DIGITS.get(key, 2)
            cells.append("–" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}")
        out.append(f"| {METRICS[key][0]} | " + " | ".join(cells) + " |")
    return out + [""]


GAP_WAYS = ("unmasked", "masked", "full_encoder")
GAP_RATIO_STEPS = (750, 950)


def read_gap_files(gap: Optional[Path]) -> List[Tuple[str, List[dict]]]:
    """(run, lines) of each gap-probe file in ``gap`` (RUN_gap.jsonl; RUN_decoder_gap.jsonl before 2026-12-02)."""
    files = sorted(gap.glob("*.jsonl")) if gap is not None and gap.is_dir() else []
    return [(path.stem.removesuffix("_gap").removesuffix("_decoder"),
             [json.loads(l) for l in path.read_text().splitlines() if l.strip()]) for path in files]


def gap_table(gap: Optional[Path]) -> List[str]:
    """The gap probe's numbers (tools/probes/decoder_mask_token_gap.py, RUN_gap.jsonl files): held-out
    epsilon MSE per checkpoint and weights, three ways, mean over t (t = 950 in brackets), and the sampling path's
    MSE over the training forward's at the two highest noise levels, where the mean over t (dominated by t = 50)
    hides a gap: a decoder that needs its mask tokens is worst there (REPORT, decoder)."""
    rows = []
    for run, lines in read_gap_files(gap):
        per, slopes = {}, {}
        for line in lines:
            if "eps_mse" not in line:  # the probe's trajectory lines: trajectory_table
                continue
            key = (Path(line["checkpoint"]).name, line["weights"])
            per.setdefault(key, {}).setdefault(line["way"], {})[int(line["t"])] = float(line["eps_mse"])
            if "x0_slope" in line:
                slopes.setdefault(key, {}).setdefault(line["way"], {})[int(line["t"])] = float(line["x0_slope"])
        for (step, weights), ways in sorted(per.items()):
            cells = []
            for way in GAP_WAYS:
                values = ways.get(way, {})
                cells.append("–" if not values else
                             f"{sum(values.values()) / len(values):.4f}" + (f" ({values[950]:.4f})" if 950 in values else ""))
            unmasked, masked = ways.get("unmasked", {}), ways.get("masked", {})
            ratios = [f"{unmasked[t] / masked[t]:.2f}" for t in GAP_RATIO_STEPS
                      if unmasked.get(t) is not None and masked.get(t)]
            cells.append(" / ".join(ratios) if len(ratios) == len(GAP_RATIO_STEPS) else "–")
            slope = slopes.get((step, weights), {})
            pair = [slope.get(way, {}).get(950) for way in ("unmasked", "masked")]
            cells.append("–" if None in pair else f"{pair[0]:.3f} / {pair[1]:.3f}")
            rows.append(f"| {run} | {step} | {weights} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["### Does the decoder lean on mask tokens? (held-out epsilon MSE)", "",
            "_`tools/probes/decoder_mask_token_gap.py` on each checkpoint of a DDPM decoder run (and of a masked run probed "
            "as its control): unmasked (what "
            "sampling runs), masked (the training forward, kept tokens), the encoder on every token with mask tokens "
            "in the decoder's input (kept tokens); mean over t = 50, 250, 500, 750, 950, t = 950 in brackets; last "
            "column: unmasked ÷ masked at t = 750 and 950 (above 1: sampling gets a worse prediction than training "
            "trained); x0 slope: the regression slope of the implied x0 prediction on the clean image at t = 950 "
            "(below 1: shrunk toward the image's mean; probe files from 2026-12-02 (second session) on)._", "",
            "| run | checkpoint | weights | unmasked | masked | full encoder + mask tokens | unmasked ÷ masked, t = 750 / 950 "
            "| x0 slope at t = 950, unmasked / masked |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |", *rows, ""]


TRAJECTORY_STEPS = (999, 749, 500, 250, 125, 42, 0)  # of the probe's 25 DDIM steps (round(i * 999 / 24))


def trajectory_table(gap: Optional[Path]) -> List[str]:
    """The gap probe's sampler-path lines: the x0 prediction's per-image std along an unguided DDIM run (EMA
    weights), beside the samples' and the held-out images' own."""
    rows = []
    for run, lines in read_gap_files(gap):
        data = next((l["x0_std"] for l in lines if l["way"] == "data"), None)
        per: Dict[str, Dict] = {}
        for line in lines:
            if line["way"] in ("trajectory", "trajectory_final") and line["weights"] == "ema":
                step = Path(line["checkpoint"]).name
                per.setdefault(step, {})["final" if line["way"] == "trajectory_final" else int(line["t"])] = line["x0_std"]
        for step, stds in sorted(per.items()):
            cells = [f"{stds[t]:.3f}" if t in stds else "–" for t in TRAJECTORY_STEPS]
            cells += [f"{stds['final']:.3f}" if "final" in stds else "–", "–" if data is None else f"{data:.3f}"]
            rows.append(f"| {run} | {step} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    head = " | ".join(f"t = {t}" for t in TRAJECTORY_STEPS)
    return ["### Along the sampler's path (x0 prediction's per-image std)", "",
            "_`tools/probes/decoder_mask_token_gap.py`: an unguided DDIM run of 25 steps from fixed noise, 32 images "
            "at the training grid, EMA weights; the std of each image's x0 prediction over its tokens and channels, "
            "averaged over images, at some of the steps; then the samples' own and the held-out images'. Samples "
            "that wash out stay below the data's._", "",
            f"| run | checkpoint | {head} | samples | held-out images |",
            "| --- | --- |" + " ---: |" * (len(TRAJECTORY_STEPS) + 2), *rows, ""]


def sample_sheets(sheets: Optional[Path], report: Path, lines: Sequence[dict] = (),
                  extra: Sequence[dict] = ()) -> List[str]:
    """Links to the sample sheets of :mod:`maskfit.study_sheets` (RUN.jpg with its strip order in RUN.txt), each
    followed by its extra evaluations' sheet (RUN.extras.jpg) where there is one, every strip's eval id named by
    the setting it changed (from the result lines ``extra`` of that run)."""
    from maskfit.study_sheets import EXTRAS

    found = sorted(p for p in sheets.glob("*.jpg") if not p.stem.endswith(EXTRAS)) \
        if sheets is not None and sheets.is_dir() else []
    if not found:
        return []
    rel = Path(os.path.relpath(sheets, report.parent))
    out = ["### Samples (final checkpoints, first 8 samples of each set)", "",
           "_A caption that names no evaluation is a sheet written before 2026-12-02's third session: where that run "
           "also sampled its final checkpoint unguided or with raw weights, its 64x64 strip may be from that "
           "evaluation instead of the main one (REPORT.md, Findings)._", ""]
    for image in found:
        order = image.with_suffix(".txt")
        caption = order.read_text().strip() if order.is_file() else "strip order not recorded"
        out += [f"**{image.stem}** ({caption})", "", f"![samples of {image.stem}]({(rel / image.name).as_posix()})", ""]
        extras = image.with_name(image.stem + EXTRAS + ".jpg")
        if extras.is_file():
            out += [f"**{image.stem}, extra evaluations of the same checkpoint** ({_extras_caption(extras, image.stem, lines, extra)})",
                    "", f"![extra evaluations of {image.stem}]({(rel / extras.name).as_posix()})", ""]
    return out


def _extras_caption(extras: Path, run: str, lines: Sequence[dict], extra: Sequence[dict]) -> str:
    """The extras sheet's strip order with each eval id replaced by the setting its result lines say it changed."""
    order = extras.with_suffix(".txt")
    if not order.is_file():
        return "strip order not recorded"
    text = order.read_text().strip()
    main = next((l for l in lines if l["run"] == run), None)
    if main is None:
        return text
    for l in extra:
        if l["run"] == run:
            text = text.replace(f"(eval {l['eval_id']})", f"({extra_setting(l, main)[1]})")
    return text


def write_report(results: Path, report: Path, plots: Optional[Path] = None) -> Path:
    lines = read_lines(results)
    plots = plots if plots is not None else Path(results).parent / "plots"
    block = report_block(lines, plots, report, sheets=Path(results).parent / "sheets",
                         floor=Path(results).parent / "floor.jsonl", gap=Path(results).parent / "gap")
    text = report.read_text() if report.exists() else TEMPLATE.format(begin=BEGIN, end=END)
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    report.write_text(text)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m maskfit.study_report", description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="folder of result lines (*.jsonl), e.g. study/results")
    p.add_argument("--out", default="REPORT.md", help="the report (its generated block is replaced)")
    p.add_argument("--plots", default=None, help="folder for the PNG plots (default: beside the results folder, plots/)")
    args = p.parse_args(argv)
    try:
        path = write_report(Path(args.results), Path(args.out), Path(args.plots) if args.plots else None)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as exc:
        print(f"study_report: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
