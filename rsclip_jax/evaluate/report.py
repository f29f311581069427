"""Reports: a JSON with every number and the config behind it, and Markdown tables laid out like
the paper's (published numbers alongside when given).

JSON: {"config": ..., "results": [{task, dataset, model, metrics, config, seconds}, ...]} and, for
each task that ran on exactly one dataset with one model, `report[task]` = that result's metrics
(so `--task retrieval` gives `report["retrieval"]["mean_recall"]`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from importlib import resources
from typing import Any

import numpy as np

from rsclip_jax.evaluate.retrieval import METRIC_KEYS
from rsclip_jax.evaluate.suite import Result


def paper_numbers() -> dict[str, Any]:
    """The bundled published RemoteCLIP numbers (`resources/eval/paper_numbers.json`)."""
    text = resources.files("rsclip_jax").joinpath("resources", "eval", "paper_numbers.json").read_text("utf-8")
    return json.loads(text)


def build_report(results: Sequence[Result], config: dict[str, Any]) -> dict[str, Any]:
    """The JSON report (see the module docstring)."""
    report: dict[str, Any] = {"config": config, "results": []}
    for r in results:
        report["results"].append({"task": r.task, "dataset": r.dataset, "model": r.model, "metrics": r.metrics,
                                  "config": r.config, "seconds": round(r.seconds, 3)})
    for task in dict.fromkeys(r.task for r in results):
        of_task = [r for r in results if r.task == task]
        if len(of_task) == 1:
            report[task] = of_task[0].metrics
    return report


def write_json(report: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_jsonable(report), f, indent=1, allow_nan=False)


def _jsonable(x: Any) -> Any:
    # NaN (a class absent from a test split) is not valid JSON: write null.
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) else float(x)
    return x


# -- Markdown ----------------------------------------------------------------------------------

def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _f(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _norm(s: str) -> str:
    return "".join(c for c in s.lower() if c.isalnum())


def _published(paper: dict | None, task: str, dataset: str) -> list[dict]:
    if not paper or task not in paper:
        return []
    return [row for row in paper[task]["rows"] if _norm(row["dataset"]) == _norm(dataset)]


def _models(results: Sequence[Result]) -> list[str]:
    return list(dict.fromkeys(r.model for r in results))


def retrieval_table(results: Sequence[Result], paper: dict | None = None) -> str:
    header = ["Test set", "Model", "I→T R@1", "R@5", "R@10", "T→I R@1", "R@5", "R@10", "mR"]
    rows = []
    for dataset in dict.fromkeys(r.dataset for r in results):
        for r in (r for r in results if r.dataset == dataset):
            rows.append([dataset, r.model or "this model"] + [_f(r.metrics[k]) for k in METRIC_KEYS])
        for p in _published(paper, "retrieval", dataset):
            rows.append([dataset, f"{p['model']} (paper)"] + [_f(p.get(k)) for k in METRIC_KEYS])
    return _table(header, rows)


def per_dataset_table(results: Sequence[Result], key: str = "top1", paper: dict | None = None,
                      task: str = "") -> str:
    """Rows = models, columns = datasets + their average (the paper's zero-shot layout)."""
    datasets = list(dict.fromkeys(r.dataset for r in results))
    rows = []
    for model in _models(results):
        cells = {r.dataset: r.metrics[key] for r in results if r.model == model}
        values = [cells.get(d) for d in datasets]
        avg = float(np.mean(values)) if all(v is not None for v in values) else None
        rows.append([model or "this model"] + [_f(v) for v in values] + [_f(avg)])
    published: dict[str, dict[str, float]] = {}
    for d in datasets:
        for p in _published(paper, task, d):
            published.setdefault(p["model"], {})[d] = p[key]
    for model, cells in published.items():
        values = [cells.get(d) for d in datasets]
        avg = float(np.mean(values)) if all(v is not None for v in values) else None
        rows.append([f"{model} (paper)"] + [_f(v) for v in values] + [_f(avg)])
    return _table(["Model", *datasets, "Average"], rows)


def fewshot_table(results: Sequence[Result], paper: dict | None = None) -> str:
    shots = list(dict.fromkeys(n for r in results for n in r.metrics["shots"]))
    rows = []
    for r in results:
        s = r.metrics["shots"]
        rows.append([r.model or "this model", r.dataset] +
                    [f"{s[n]['mean']:.2f} ± {s[n]['std']:.2f}" if n in s else "–" for n in shots])
    for dataset in dict.fromkeys(r.dataset for r in results):
        by_model: dict[str, dict[str, float]] = {}
        for p in _published(paper, "fewshot", dataset):
            by_model.setdefault(p["model"], {})[str(p["shots"])] = p["top1"]
        for model, cells in by_model.items():
            rows.append([f"{model} (paper)", dataset] + [_f(cells.get(n)) for n in shots])
    return _table(["Model", "Dataset", *[f"{n}-shot" for n in shots]], rows)


def counting_table(results: Sequence[Result]) -> str:
    ks = [f"top{k}" for k in range(1, max(len(r.metrics["numbers"]) for r in results) + 1)]
    rows = [[r.model or "this model", r.dataset] + [_f(r.metrics.get(k)) for k in ks] for r in results]
    return _table(["Model", "Dataset", *[k.replace("top", "top-") for k in ks]], rows)


def markdown(results: Sequence[Result], paper: dict | None = None, title: str = "Evaluation") -> str:
    """All tables, one section per task that ran (published numbers as '(paper)' rows)."""
    parts = [f"# {title}"]
    of = lambda task: [r for r in results if r.task == task]
    if of("retrieval"):
        parts += ["## Image–text retrieval (%)", retrieval_table(of("retrieval"), paper)]
    if of("zeroshot"):
        parts += ["## Zero-shot classification (top-1 %)", per_dataset_table(of("zeroshot"), "top1", paper, "zeroshot")]
    if of("linear_probe"):
        parts += ["## Linear probe (top-1 %)", per_dataset_table(of("linear_probe"), "top1", paper, "linear_probe")]
    if of("knn"):
        k, t = of("knn")[0].metrics["k"], of("knn")[0].metrics["temperature"]
        parts += [f"## k-NN (top-1 %, k = {k}, T = {t:g})", per_dataset_table(of("knn"), "top1", paper, "knn")]
    if of("fewshot"):
        parts += ["## Few-shot linear probe (top-1 %, mean ± std over seeds)", fewshot_table(of("fewshot"), paper)]
    if of("counting"):
        parts += ["## Counting (top-k accuracy %)", counting_table(of("counting"))]
    skipped = sum(r.metrics.get("num_skipped", 0) for r in results)
    if skipped:
        parts.append(f"Skipped {skipped} missing or unreadable item(s); see `num_skipped` in the JSON report.")
    if paper:
        parts.append(f"Published numbers: {paper['source']}.")
    return "\n\n".join(parts) + "\n"
