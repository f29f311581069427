"""`rsclip sweep FILE --collect`: every run's final metrics in one table and one plot, and the best run.

Writes ROOT/results.csv and ROOT/results.md (one row per run of the sweep file, in its order: name,
each swept key, status, final step, final train loss, each final eval metric) and ROOT/results.png
(the ranking metric against each swept key; a log x axis when a key's values span two decades or
more). Runs that have not finished are listed with their status, never dropped; only completed
runs compete for best.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import io
import math
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless
import matplotlib.pyplot as plt

from rsclip_jax.fileio import atomic_write, atomic_write_text
from rsclip_jax.launch.sweep import MODES, Status, Sweep, run_status

LOSS = "loss"  # the final train loss: the ranking metric when nothing else is named
FIXED_COLUMNS = ("status", "step", LOSS)
LOG_SPAN = 100.0  # a numeric key whose values span this factor gets a log x axis


@dataclasses.dataclass
class Collected:
    columns: list[str]
    rows: list[dict[str, Any]]
    statuses: list[Status]
    metric: str
    mode: str
    best: int | None  # index into rows


def _last(workdir: str, name: str) -> dict[str, Any]:
    """The last record of a metrics file (empty when there is none yet)."""
    from rsclip_jax.train.loop import read_metrics  # jax: only when reading a workdir

    if not os.path.isfile(os.path.join(workdir, name)):
        return {}
    records = read_metrics(workdir, "train" if name == "metrics.jsonl" else "eval")
    return records[-1] if records else {}


def choose_metric(sweep: Sweep, metric: str | None, mode: str | None) -> tuple[str, str]:
    """--metric/--mode, else the sweep file's, else the base config's best_metric, else the train loss."""
    config = sweep.runs[0].config
    metric = metric or sweep.metric or config.best_metric or LOSS
    if mode is None and metric == sweep.metric:
        mode = sweep.mode
    if mode is None:
        if metric == LOSS:
            mode = "min"
        elif metric == config.best_metric:
            mode = config.best_mode
        else:
            raise ValueError(f"--metric {metric}: give --mode min or max (or 'mode' in {sweep.path})")
    if mode not in MODES:
        raise ValueError(f"--mode {mode}: must be min or max")
    return metric, mode


def collect(sweep: Sweep, metric: str | None = None, mode: str | None = None) -> Collected:
    """One row per run: its swept values, status, final step and loss, and final eval metrics."""
    metric, mode = choose_metric(sweep, metric, mode)
    rows, statuses, evals = [], [], []
    for run in sweep.runs:
        status = run_status(run)
        train, final_eval = _last(run.workdir, "metrics.jsonl"), _last(run.workdir, "eval_metrics.jsonl")
        final_eval.pop("step", None)
        evals += [k for k in final_eval if k not in evals]
        rows.append({"run": run.name, **run.swept, "status": status.state, "step": status.step,
                     LOSS: train.get(LOSS), **final_eval})
        statuses.append(status)
    columns = ["run", *sweep.swept_keys, *FIXED_COLUMNS, *sorted(evals)]
    logged = [LOSS, *evals]
    if metric not in logged and any(r["status"] == "completed" for r in rows):
        raise ValueError(f"--metric {metric}: no run logged it; metrics: {', '.join(logged)}")
    candidates = [i for i, r in enumerate(rows) if r["status"] == "completed" and _number(r.get(metric))]
    best = None
    if candidates:
        pick = min if mode == "min" else max
        best = pick(candidates, key=lambda i: rows[i][metric])
    return Collected(columns, rows, statuses, metric, mode, best)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _cell(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def best_line(sweep: Sweep, c: Collected) -> str:
    if c.best is None:
        return f"best run: none yet (no completed run logged {c.metric})"
    row = c.rows[c.best]
    return f"best run: {row['run']} ({c.metric} = {row[c.metric]:.4g}, {c.mode}) in {sweep.runs[c.best].workdir}"


def csv_text(c: Collected) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(c.columns)
    for row in c.rows:
        writer.writerow(["" if row.get(k) is None else row[k] for k in c.columns])
    return out.getvalue()


def markdown(sweep: Sweep, c: Collected) -> str:
    lines = [f"# Sweep {sweep.name}", "", f"{sweep.path}: {len(c.rows)} runs of {sweep.config} in {sweep.root}; "
             f"ranked by {c.metric} ({c.mode}).", "", best_line(sweep, c), ""]
    lines.append("| " + " | ".join(c.columns) + " |")
    lines.append("|" + "|".join("---" for _ in c.columns) + "|")
    for i, row in enumerate(c.rows):
        cells = [_cell(row.get(k)).replace("|", "\\|") for k in c.columns]
        if i == c.best:
            cells[0] = f"**{cells[0]}** (best)"
        lines.append("| " + " | ".join(cells) + " |")
    unfinished = [(r["run"], s) for r, s in zip(c.rows, c.statuses) if s.state != "completed"]
    if unfinished:
        lines += ["", f"Not finished ({len(unfinished)}):", ""]
        lines += [f"- {name}: {status}" for name, status in unfinished]
    return "\n".join(lines) + "\n"


def _x_positions(values: list[str], parsed: list[Any]) -> tuple[list[float], list[str] | None, bool]:
    """Numeric keys plot at their values (log when they span >= LOG_SPAN); others as categories."""
    if parsed and all(_number(v) for v in parsed):
        positive = all(v > 0 for v in parsed)
        log = positive and max(parsed) / min(parsed) >= LOG_SPAN
        return [float(v) for v in parsed], None, log
    categories = list(dict.fromkeys(values))
    return [float(categories.index(v)) for v in values], categories, False


def plot(sweep: Sweep, c: Collected, path: str) -> None:
    """The metric against each swept key; hollow markers for unfinished runs, a star for the best."""
    keys = sweep.swept_keys or ["run"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [i for i, r in enumerate(c.rows) if _number(r.get(c.metric)) and key in r]
        values = [str(c.rows[i].get(key, "")) for i in points]
        parsed = []
        for v in values:
            try:
                parsed.append(ast.literal_eval(v))
            except (ValueError, SyntaxError):
                parsed.append(v)
        xs, categories, log = _x_positions(values, parsed)
        for x, i in zip(xs, points):
            done = c.rows[i]["status"] == "completed"
            ax.plot([x], [c.rows[i][c.metric]], "o", color="C0", markerfacecolor="C0" if done else "none")
            if i == c.best:
                ax.plot([x], [c.rows[i][c.metric]], "*", color="C3", markersize=14, label=f"best: {c.rows[i]['run']}")
        if categories is not None:
            ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right", fontsize=8)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(c.metric)
        ax.grid(True, alpha=0.3)
        if not points:
            ax.text(0.5, 0.5, f"no run logged {c.metric} yet", ha="center", va="center", transform=ax.transAxes)
        elif c.best is not None:
            ax.legend(fontsize=8)
    fig.suptitle(f"{sweep.name}: {c.metric} ({c.mode}); hollow: not finished", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def write_results(sweep: Sweep, c: Collected, out_dir: str | None = None) -> list[str]:
    """results.csv, results.md and results.png in `out_dir` (default: the sweep's root), each atomic."""
    out_dir = out_dir or sweep.root
    paths = [os.path.join(out_dir, f"results.{ext}") for ext in ("csv", "md", "png")]
    atomic_write_text(paths[0], csv_text(c))
    atomic_write_text(paths[1], markdown(sweep, c))
    plot(sweep, c, paths[2])
    return paths
