"""PNG plots of evaluation results (matplotlib, Agg backend: no display needed).

* `fewshot.png`: accuracy vs images per class (log2 axis), mean ± std band, per model and dataset;
* `recall_<dataset>.png`: R@K for K = 1..50 in both directions, per model;
* `confusion_<model>_<dataset>.png`: the zero-shot confusion matrix (row-normalised);
* `tsne_<model>_<dataset>.png`: t-SNE of a scene dataset's image embeddings (train + test), by class
  (`tsne.py`, exact t-SNE in numpy on at most 1000 points);
* `counting.png`: top-k counting accuracy, k = 1..10 (RemoteCount's numbers).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless
import matplotlib.pyplot as plt
import numpy as np

from rsclip_jax.evaluate.suite import Result
from rsclip_jax.evaluate.tsne import embed_2d


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "model"


def _label(r: Result) -> str:
    return r.model or "this model"


def _save(fig: plt.Figure, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fewshot_plot(results: Sequence[Result], path: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        shots = r.metrics["shots"]
        n = np.array([int(k) for k in shots])
        mean = np.array([v["mean"] for v in shots.values()])
        std = np.array([v["std"] for v in shots.values()])
        line, = ax.plot(n, mean, marker="o", label=f"{_label(r)} · {r.dataset}")
        ax.fill_between(n, mean - std, mean + std, alpha=0.2, color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("images per class")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Few-shot linear probe")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def recall_plot(results: Sequence[Result], path: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        for direction, style in (("image_to_text", "-"), ("text_to_image", "--")):
            curve = r.metrics["recall_curve"][direction]
            arrow = "I→T" if direction == "image_to_text" else "T→I"
            ax.plot(np.arange(1, len(curve) + 1), curve, style, label=f"{_label(r)} {arrow}")
    ax.set_xlabel("K")
    ax.set_ylabel("R@K (%)")
    ax.set_title(f"Retrieval recall@K · {results[0].dataset}")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def confusion_plot(r: Result, path: str) -> str:
    cm = np.asarray(r.metrics["confusion"], np.float64)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    names = r.metrics["classnames"]
    size = max(4.0, 0.28 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Zero-shot · {r.dataset} · top-1 {r.metrics['top1']:.1f}%", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def tsne_plot(r: Result, path: str, seed: int = 0) -> str:
    x, labels = r.artifacts["embeddings"], r.artifacts["labels"]
    coords, labels = embed_2d(x, labels, seed=seed)
    names = r.artifacts["classnames"]
    fig, ax = plt.subplots(figsize=(6, 5))
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    for c in np.unique(labels):
        m = labels == c
        ax.scatter(coords[m, 0], coords[m, 1], s=10, color=cmap(int(c) % cmap.N), label=names[int(c)])
    ax.set_title(f"t-SNE of image embeddings · {r.dataset}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(names) <= 30:
        ax.legend(fontsize=6, markerscale=1.5, loc="best")
    return _save(fig, path)


def counting_plot(results: Sequence[Result], path: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ks = np.arange(1, len(r.metrics["numbers"]) + 1)
        ax.plot(ks, [r.metrics[f"top{k}"] for k in ks], marker="o", label=f"{_label(r)} · {r.dataset}")
    ks = np.arange(1, max(len(r.metrics["numbers"]) for r in results) + 1)
    ax.plot(ks, 100.0 * ks / ks[-1], ":", color="gray", label="chance")
    ax.set_xlabel("k")
    ax.set_ylabel("top-k accuracy (%)")
    ax.set_title("Counting")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_all(results: Sequence[Result], out_dir: str, tsne: bool = True) -> list[str]:
    """Writes every plot the results allow into out_dir; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    of = lambda task: [r for r in results if r.task == task]
    if of("fewshot"):
        paths.append(fewshot_plot(of("fewshot"), os.path.join(out_dir, "fewshot.png")))
    for dataset in dict.fromkeys(r.dataset for r in of("retrieval")):
        rs = [r for r in of("retrieval") if r.dataset == dataset]
        paths.append(recall_plot(rs, os.path.join(out_dir, f"recall_{_safe(dataset)}.png")))
    stem = lambda r: f"{_safe(r.model)}_{_safe(r.dataset)}" if r.model else _safe(r.dataset)
    for r in of("zeroshot"):
        paths.append(confusion_plot(r, os.path.join(out_dir, f"confusion_{stem(r)}.png")))
    if tsne:  # one per model and scene dataset, from the task that embedded the most images
        best: dict[tuple[str, str], Result] = {}
        for r in results:
            n, key = len(r.artifacts.get("labels", ())), (r.model, r.dataset)
            if n >= 2 and (key not in best or n > len(best[key].artifacts["labels"])):
                best[key] = r
        for r in best.values():
            paths.append(tsne_plot(r, os.path.join(out_dir, f"tsne_{stem(r)}.png")))
    if of("counting"):
        paths.append(counting_plot(of("counting"), os.path.join(out_dir, "counting.png")))
    return paths
